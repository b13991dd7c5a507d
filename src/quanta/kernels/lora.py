"""Batched multi-LoRA product: y[t] += (x[t] @ A[slot[t]]^T) @ B[slot[t]]^T for every token t at once.

Every token of the flat batch carries the device slot of its request's adapter (-1 = none). The adapters'
weights are stacked per layer, zero-padded to the largest rank R:
`A: [num_slots, num_shards * R, in]` (a merged q|k|v or gate|up layer stacks one A per shard) and
`B: [num_slots, out, R]` (each output row belongs to one shard, whose R rank columns it reads).

Decode steps (few tokens per adapter) run ONE fused kernel per layer (kernels/lora_fused.py, which also
dispatches). Large prefill chunks run the two kernels here, both grouped by adapter (tokens sorted by slot,
so each program multiplies one adapter's weights with a tile of that adapter's tokens):
- shrink: `buf[t, :] = x[t] @ A[slot[t]]^T` -> `[T, num_shards * R]`
- expand: `y[t, shard cols] += buf[t, shard*R : (shard+1)*R] @ B[slot[t], shard rows]^T` (in place)

The grouping (`LoRAMeta`: tokens sorted by slot, tokens per slot, group starts) is computed once per step
on the host and read from persistent device buffers, so the kernels replay inside CUDA graphs: the grid is
sized for the worst case (every token in one group) and surplus programs exit at once.

The `*_ref` twins compute the same thing with dense one-hot matmuls (no host sync, no per-adapter loop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton


@dataclass
class LoRAMeta:
    """Per-step token -> adapter mapping (device tensors may be longer than the batch: only the first
    `num_tokens` entries of `slots` and the first `sum(counts)` of `sorted_idx` are read)."""

    slots: torch.Tensor  # [>= T] int32: each token's adapter slot, -1 = no adapter
    sorted_idx: torch.Tensor  # [>= T] int32: indices of tokens with an adapter, grouped by slot (stable)
    counts: torch.Tensor  # [num_slots] int32: tokens per slot
    starts: torch.Tensor  # [num_slots] int32: offset of each slot's group in sorted_idx
    max_count: int | None = None  # host bound on counts (sizes the grid); None = the number of tokens


def group_by_slot(slots: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host side of LoRAMeta: (token indices with an adapter sorted by slot, counts [S], starts [S])."""
    slots = np.asarray(slots, dtype=np.int64)
    order = np.argsort(slots, kind="stable")
    num_none = int((slots < 0).sum())
    counts = np.bincount(slots[slots >= 0], minlength=num_slots)[:num_slots]
    starts = np.cumsum(counts) - counts
    return order[num_none:], counts, starts


def make_lora_meta(slots: torch.Tensor, num_slots: int) -> LoRAMeta:
    """A LoRAMeta for `slots` (tests and one-off calls; the runner fills persistent buffers instead)."""
    idx, counts, starts = group_by_slot(slots.cpu().numpy(), num_slots)
    dev = slots.device

    def t(a):
        return torch.as_tensor(np.asarray(a, dtype=np.int32), device=dev)

    return LoRAMeta(t(slots.cpu().numpy()), t(idx), t(counts), t(starts), int(counts.max(initial=0)))


# fmt: off
@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, sorted_ptr, counts_ptr, starts_ptr,
    K, N, K_PER_SPLIT, stride_xm, stride_as, stride_an, stride_ok, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (m blocks * n blocks, num_slots, K splits); program = (a tile of one adapter's tokens) x
    # (rank columns) x (a K range), written to out[split] (the expand kernel sums the splits)
    slot = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    a_base = a_ptr + slot.to(tl.int64) * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_begin = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        at = tl.load(a_base + offs_n[:, None] * stride_an + offs_k[None, :],
                     mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if IEEE:  # float32 weights: no TF32 rounding
            acc += tl.dot(xt, tl.trans(at.to(xt.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at.to(xt.dtype)))
    out_ptrs = out_ptr + tl.program_id(2) * stride_ok + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_expand_kernel(
    buf_ptr, b_ptr, y_ptr, sorted_ptr, counts_ptr, starts_ptr,
    col0, ncols, R, stride_bufk, stride_bufm, stride_bs, stride_bn, stride_ym,
    SPLIT1: tl.constexpr, SPLIT2: tl.constexpr, NUM_K_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (m blocks * n blocks, num_slots); output columns col0 .. col0 + ncols, one shard per block
    slot = tl.program_id(1)
    num_n = tl.cdiv(ncols, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M >= count:
        return
    start = tl.load(starts_ptr + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    n_first = col0 + pid_n * BLOCK_N
    shard = (n_first >= SPLIT1).to(tl.int32) + (n_first >= SPLIT2).to(tl.int32)
    offs_n = n_first + tl.arange(0, BLOCK_N)
    mask_n = offs_n < col0 + ncols
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    buf_ptrs = buf_ptr + rows[:, None] * stride_bufm + shard * R + offs_r[None, :]
    bt = tl.load(buf_ptrs, mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    for ks in range(1, NUM_K_SPLITS):  # the shrink's split-K partial sums
        bt += tl.load(buf_ptrs + ks * stride_bufk, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    wt = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + offs_n[:, None] * stride_bn + offs_r[None, :],
                 mask=mask_n[:, None] & mask_r[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(bt.to(wt.dtype), tl.trans(wt), input_precision="ieee")
    else:
        acc = tl.dot(bt.to(wt.dtype), tl.trans(wt))
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    yv = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (yv.to(tl.float32) + acc).to(y_ptr.dtype.element_ty), mask=mask)
# fmt: on


_NO_SPLIT = 1 << 30


def _block_m(num_rows: int) -> int:
    return min(64, max(16, next_pow2(num_rows)))


def _rows_bound(meta: LoRAMeta, num_tokens: int) -> int:
    if meta.max_count is None or (meta.slots.is_cuda and torch.cuda.is_current_stream_capturing()):
        return num_tokens  # a captured graph must cover any grouping
    return min(num_tokens, meta.max_count)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """x: [T, K], a: [S, N, K] -> float32 partial sums [K splits, T, N] (lora_expand adds them up; rows of
    tokens without an adapter are left unset).

    NOTE: split-K when K is long: decode steps have a few tokens per adapter, so without it a handful of
    programs would each stream a whole [N, K] A matrix. Partials, not atomics: no zeroing pass."""
    require_triton()
    num_tokens, k = x.shape
    num_slots, n, _ = a.shape
    assert x.stride(1) == 1 and a.stride(2) == 1
    rows = _rows_bound(meta, num_tokens)
    bk = 64 if k >= 64 else max(16, next_pow2(k))
    split_k = max(1, min(16, k // 512))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), bk) * bk
    split_k = triton.cdiv(k, k_per_split)
    out = torch.empty(split_k, num_tokens, n, dtype=torch.float32, device=x.device)
    if rows == 0 or num_tokens == 0:
        return out
    bm = _block_m(rows)
    bn = min(32, max(16, next_pow2(n)))
    grid = (triton.cdiv(rows, bm) * triton.cdiv(n, bn), num_slots, split_k)
    _lora_shrink_kernel[grid](
        x, a, out, meta.sorted_idx, meta.counts, meta.starts,
        k, n, k_per_split, x.stride(0), a.stride(0), a.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, IEEE=x.dtype == torch.float32, num_warps=4,
    )
    return out


def lora_expand(y: torch.Tensor, buf: torch.Tensor, b: torch.Tensor, meta: LoRAMeta,
                splits: tuple[int, ...] = ()) -> torch.Tensor:
    """y: [T, O] += per shard buf[:, shard*R:(shard+1)*R] @ b[slot, shard rows]^T; b: [S, O, R].

    buf: [T, N] or lora_shrink's partial sums [K splits, T, N]. `splits`: the output offsets where
    shards 1, 2 begin (q|k|v: (q, q + kv); gate|up: (inter,))."""
    require_triton()
    num_tokens, o = y.shape
    num_slots, _, r = b.shape
    if buf.dim() == 2:
        buf = buf.unsqueeze(0)
    assert y.stride(1) == 1 and b.stride(2) == 1 and buf.stride(2) == 1 and len(splits) <= 2
    rows = _rows_bound(meta, num_tokens)
    if rows == 0 or num_tokens == 0:
        return y
    s1, s2 = (tuple(splits) + (_NO_SPLIT, _NO_SPLIT))[:2]
    bm = _block_m(rows)
    br = max(16, next_pow2(r))
    g = 0
    for v in splits:
        g = math.gcd(g, v)
    bn = 64
    while g and bn > 16 and g % bn:
        bn //= 2
    # one launch when no column block straddles two shards, else one launch per shard
    ranges = [(0, o)] if not g or g % bn == 0 else list(zip((0, *splits), (*splits, o)))
    for c0, c1 in ranges:
        grid = (triton.cdiv(rows, bm) * triton.cdiv(c1 - c0, bn), num_slots)
        _lora_expand_kernel[grid](
            buf, b, y, meta.sorted_idx, meta.counts, meta.starts,
            c0, c1 - c0, r, buf.stride(0), buf.stride(1), b.stride(0), b.stride(1), y.stride(0),
            SPLIT1=s1, SPLIT2=s2, NUM_K_SPLITS=buf.shape[0], BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=br,
            IEEE=b.dtype == torch.float32, num_warps=4,
        )
    return y


def lora_shrink_ref(x: torch.Tensor, a: torch.Tensor, meta: LoRAMeta) -> torch.Tensor:
    """Twin of lora_shrink: all adapters' products in one matmul, each token keeps its own (0 for none)."""
    num_tokens = x.shape[0]
    num_slots, n, k = a.shape
    slots = meta.slots[:num_tokens].long()
    every = (x @ a.reshape(num_slots * n, k).t()).view(num_tokens, num_slots, n)  # [T, S, N]
    picked = every.gather(1, slots.clamp(min=0).view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)
    return picked * (slots >= 0).unsqueeze(1).to(picked.dtype)


def lora_expand_ref(y: torch.Tensor, buf: torch.Tensor, b: torch.Tensor, meta: LoRAMeta,
                    splits: tuple[int, ...] = ()) -> torch.Tensor:
    """Twin of lora_expand: each token's rank vector placed in its slot's block of a one-hot
    [T, S, R] tensor, contracted with every adapter's B at once (zeros elsewhere add nothing).
    buf: [T, N] or [K splits, T, N] (summed)."""
    if buf.dim() == 3:
        buf = buf.sum(0)
    num_tokens, o = y.shape
    num_slots, _, r = b.shape
    slots = meta.slots[:num_tokens].long()
    # NOTE: a comparison, not F.one_hot (which checks its input on the host: no CUDA-graph capture)
    onehot = (slots.unsqueeze(1) == torch.arange(num_slots, device=slots.device)).unsqueeze(2)  # [T, S, 1]; -1: none
    bounds = list(zip((0, *splits), (*splits, o)))
    for shard, (c0, c1) in enumerate(bounds):
        part = buf[:, shard * r : (shard + 1) * r].to(b.dtype)  # [T, R]
        spread = torch.where(onehot, part.unsqueeze(1), torch.zeros((), dtype=b.dtype, device=b.device))  # [T, S, R]
        delta = torch.einsum("tsr,sor->to", spread, b[:, c0:c1, :])
        y[:, c0:c1] += delta.to(y.dtype)
    return y
