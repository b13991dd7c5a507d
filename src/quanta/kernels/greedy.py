"""Greedy sampling in two small kernels: argmax and its log-probability over the vocabulary.

torch's argmax + gather + logsumexp take six to eight launches over [R, vocab] float32 logits; here stage 1
reads each row in chunks (grid rows x chunks, so one row still fills the GPU) and keeps per chunk the max,
its first index and sum(exp(x - max)); stage 2 combines the chunks: the id is the first index of the row's
max (torch.argmax's tie rule) and its log-probability is -log(sum_i s_i * exp(m_i - M)).
Reads bf16 / fp16 / fp32 logits alike. Twin: quanta.sampling.sampler.greedy_sample.

Under a CUDA graph (worker/cuda_graph.py GraphTokens) the kernels can also hand the tokens over without copies of
their own: stage 1's first program counts the replay (a device counter), stage 2 writes the ids, log-probabilities
and the count into slot count % 2 of pinned host buffers (the host reads them once the step's event has passed;
two slots, as the engine launches step N + 1 before it reads step N) and the ids into the next step's input ids.
On an H200 the separate device -> host copy after the graph cost ~10 us a step and the device -> device input
feed ~5 us (1B bf16 batch 1, 0.865 ms replays; `benchmarks/profile_step.py --bubble`).
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton

CHUNK = 4096


# fmt: off
@triton.jit
def _greedy_chunk_kernel(logits_ptr, part_m_ptr, part_i_ptr, part_s_ptr, V, stride_r, num_chunks, count_ptr,
                         CHUNK: tl.constexpr, COUNT: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    if COUNT:  # one more replay: stage 2 (after this kernel) reads the count
        if row == 0 and chunk == 0:
            tl.store(count_ptr, tl.load(count_ptr) + 1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    mask = offs < V
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_r + offs, mask=mask, other=-float("inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    i = tl.argmax(x, axis=0)
    s = tl.sum(tl.where(mask, tl.exp(x - m), 0.0), axis=0)
    out = row * num_chunks + chunk
    tl.store(part_m_ptr + out, m)
    tl.store(part_i_ptr + out, chunk * CHUNK + i)
    tl.store(part_s_ptr + out, s)


@triton.jit
def _greedy_combine_kernel(part_m_ptr, part_i_ptr, part_s_ptr, ids_ptr, lps_ptr, num_chunks, count_ptr,
                           host_ids_ptr, host_lps_ptr, ids_stride, lps_stride, feed_ptr,
                           CHUNKS_PAD: tl.constexpr, HOST: tl.constexpr, FEED: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, CHUNKS_PAD)
    mask = offs < num_chunks
    base = row * num_chunks
    m = tl.load(part_m_ptr + base + offs, mask=mask, other=-float("inf"))
    idx = tl.load(part_i_ptr + base + offs, mask=mask, other=2147483647)
    s = tl.load(part_s_ptr + base + offs, mask=mask, other=0.0)
    big = tl.max(m, axis=0)
    first = tl.min(tl.where(m == big, idx, 2147483647), axis=0)
    total = tl.sum(tl.where(mask, s * tl.exp(m - big), 0.0), axis=0)
    tok = first.to(tl.int64)
    lp = -tl.log(total)
    tl.store(ids_ptr + row, tok)
    tl.store(lps_ptr + row, lp)
    if HOST:  # slot count % 2: [count, ids...] and [logprobs...]
        count = tl.load(count_ptr)
        slot = count % 2
        tl.store(host_ids_ptr + slot * ids_stride + 1 + row, tok)
        tl.store(host_lps_ptr + slot * lps_stride + row, lp)
        if row == 0:
            tl.store(host_ids_ptr + slot * ids_stride, count)
    if FEED:
        tl.store(feed_ptr + row, tok)
# fmt: on


def greedy_sample_fused(logits: torch.Tensor, handoff=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, vocab] -> (argmax ids [R] int64, their log-probabilities [R] float32).

    handoff: (count [1] int64 on the device, host ids [2, >= R + 1] int64, host logprobs [2, >= R] float32, feed
    [R] int64 or None): the replay count and the two-slot host hand-over described above, the ids also into feed."""
    require_triton()
    r, v = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n = triton.cdiv(v, CHUNK)
    dev = logits.device
    part_m = torch.empty(r, n, dtype=torch.float32, device=dev)
    part_i = torch.empty(r, n, dtype=torch.int32, device=dev)
    part_s = torch.empty(r, n, dtype=torch.float32, device=dev)
    both = torch.empty(2 * r, dtype=torch.int64, device=dev)  # ids, then the logprobs: one device -> host copy
    ids, lps = both[:r], both[r:].view(torch.float32)[:r]  # (worker/pending.py joint_base)
    if r == 0:
        return ids, lps
    count, host_ids, host_lps, feed = handoff if handoff is not None else (ids, ids, lps, None)
    if handoff is not None:
        _check_handoff(r, count, host_ids, host_lps, feed)
    _greedy_chunk_kernel[(r, n)](logits, part_m, part_i, part_s, v, logits.stride(0), n, count, CHUNK=CHUNK,
                                 COUNT=handoff is not None, num_warps=8)
    _greedy_combine_kernel[(r,)](part_m, part_i, part_s, ids, lps, n, count, host_ids, host_lps, host_ids.stride(0),
                                 host_lps.stride(0), ids if feed is None else feed, CHUNKS_PAD=max(next_pow2(n), 2),
                                 HOST=handoff is not None, FEED=feed is not None, num_warps=1)
    return ids, lps


def _check_handoff(r, count, host_ids, host_lps, feed) -> None:
    ok = (count.dtype == torch.int64 and count.numel() == 1 and host_ids.dtype == torch.int64
          and host_lps.dtype == torch.float32 and host_ids.dim() == host_lps.dim() == 2
          and host_ids.shape[0] == host_lps.shape[0] == 2 and host_ids.shape[1] > r and host_lps.shape[1] >= r
          and host_ids.stride(1) == host_lps.stride(1) == 1
          and (feed is None or (feed.dtype == torch.int64 and feed.numel() >= r and feed.is_contiguous())))
    if not ok:
        raise ValueError("greedy_sample_fused handoff: count [1] int64, host ids [2, > R] int64, host logprobs "
                         "[2, >= R] float32 (rows contiguous), feed [>= R] int64 contiguous or None")
