"""Greedy sampling in two small kernels: argmax and its log-probability over the vocabulary.

torch's argmax + gather + logsumexp take six to eight launches over [R, vocab] float32 logits; here stage 1
reads each row in chunks (grid rows x chunks, so one row still fills the GPU) and keeps per chunk the max,
its first index and sum(exp(x - max)); stage 2 combines the chunks: the id is the first index of the row's
max (torch.argmax's tie rule) and its log-probability is -log(sum_i s_i * exp(m_i - M)).
Reads bf16 / fp16 / fp32 logits alike. Twin: quanta.sampling.sampler.greedy_sample.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton

CHUNK = 4096


# fmt: off
@triton.jit
def _greedy_chunk_kernel(logits_ptr, part_m_ptr, part_i_ptr, part_s_ptr, V, stride_r, num_chunks,
                         CHUNK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
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
def _greedy_combine_kernel(part_m_ptr, part_i_ptr, part_s_ptr, ids_ptr, lps_ptr, num_chunks,
                           CHUNKS_PAD: tl.constexpr):
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
    tl.store(ids_ptr + row, first.to(tl.int64))
    tl.store(lps_ptr + row, -tl.log(total))
# fmt: on


def greedy_sample_fused(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, vocab] -> (argmax ids [R] int64, their log-probabilities [R] float32)."""
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
    _greedy_chunk_kernel[(r, n)](logits, part_m, part_i, part_s, v, logits.stride(0), n, CHUNK=CHUNK, num_warps=8)
    _greedy_combine_kernel[(r,)](part_m, part_i, part_s, ids, lps, n, CHUNKS_PAD=max(next_pow2(n), 2), num_warps=1)
    return ids, lps
