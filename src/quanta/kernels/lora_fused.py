"""Fused multi-LoRA: y[t] += (x[t] @ A[slot[t]]^T) @ B[slot[t]]^T in ONE kernel per LoRA'd linear.

Each program takes a tile of one adapter's tokens (tokens grouped by slot: `LoRAMeta`) and a range of
output columns inside ONE shard (q | k | v, gate | up; a shard's last range is masked at its end, so no
range straddles two shards and any shard size works). It computes the rank-R intermediate
`x_tile @ A[slot, shard rows]^T` over the whole K in registers (fp32), then walks its columns in
`block_n` tiles: `y_tile += intermediate @ B_tile^T`, in place. No intermediate buffer, no split-K
partial sums, one launch instead of two.

The shrink is recomputed by every column range of the same (adapter, token tile): it costs R x K of A
(L2-resident: all adapters' A of one layer is ~1.5 MB at the bench shape) plus the tokens' x rows per
range. So a range covers `block_n * n_tiles` columns, wide enough that the recomputation stays small
next to the B tile and y traffic, and few enough ranges that the grid still fills the GPU.

`lora_apply` dispatches: the fused kernel while an adapter has at most FUSED_MAX_ROWS tokens (decode,
small prefill chunks; under CUDA-graph capture the bound is the batch), else the two-kernel shrink +
expand of kernels/lora.py (large prefill chunks, where recomputing x @ A^T per column range would
re-read x many times). `lora_apply_ref` is the PyTorch twin (the reference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.lora import LoRAMeta, _rows_bound, lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref


@dataclass(frozen=True)
class FusedConfig:
    block_n: int  # output columns per inner tile
    n_tiles: int  # inner tiles per program: a program covers block_n * n_tiles columns of one shard
    block_k: int  # K step of the shrink loop
    num_warps: int = 4
    num_stages: int = 3
    block_m_max: int = 32  # token tile: next_pow2(tokens per adapter bound), clamped to [16, block_m_max]


# Launch parameters, the first row whose bounds hold wins: (K <=, widest shard <=, config); None = any.
# Reasoned for an H100 (132 SMs, ~50 MB L2) at Llama-3.2-1B decode, batch 32 = 8 adapters x 4 tokens,
# rank 16: a program's time is mostly its shrink (A_shard R*K*2 B = 64 KB at K 2048, 256 KB at 8192, from
# L2 after the first range); its expand reads block_n*n_tiles*(2R + 4 tokens*4) B of B and y. Ranges are
# as wide as keeps the expand under ~1/3 of the shrink, so the grid's total L2 traffic stays low.
FUSED_TABLE: tuple[tuple[int | None, int | None, FusedConfig], ...] = (
    # qkv (K 2048; shards 2048|512|512): 4+1+1 ranges x 8 adapters = 48 programs; o (2048; 2048): 32
    (4096, 4096, FusedConfig(block_n=256, n_tiles=2, block_k=256, num_warps=4, num_stages=4)),
    # gate_up (K 2048; shards 8192|8192): 8+8 ranges x 8 = 128 programs (one wave)
    (4096, None, FusedConfig(block_n=256, n_tiles=4, block_k=256, num_warps=4, num_stages=4)),
    # down (K 8192; 2048): 4 ranges x 8 = 32 programs, each streaming 256 KB of A: wider K steps, 8 warps
    (None, None, FusedConfig(block_n=256, n_tiles=2, block_k=512, num_warps=8, num_stages=3)),
)
# Tokens of one adapter (the batch, under graph capture) up to which the fused kernel runs, else shrink + expand.
# NOTE: 0 = never fused. Measured on an H100 (bench_lora.py --eager --trace, 1B shape, rank 16, 8 adapters x 4
# tokens, 2026-11-28): the fused kernel averaged 11.8 us per LoRA'd linear against 4.8 + 3.1 us for shrink +
# expand with FUSED_TABLE as it is; re-enable (e.g. 128) once a table row beats the pair on the card.
FUSED_MAX_ROWS = 0


def fused_config(k: int, widest_shard: int) -> FusedConfig:
    for max_k, max_n, cfg in FUSED_TABLE:
        if (max_k is None or k <= max_k) and (max_n is None or widest_shard <= max_n):
            return cfg
    return FUSED_TABLE[-1][2]


# fmt: off
@triton.jit
def _lora_fused_kernel(
    x_ptr, a_ptr, b_ptr, y_ptr, sorted_ptr, counts_ptr, starts_ptr,
    K, R, SPLIT1, SPLIT2, OUT, stride_xm, stride_as, stride_ar, stride_bs, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, N_TILES: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (token tiles * column ranges, num_slots). Shards: [0, SPLIT1), [SPLIT1, SPLIT2), [SPLIT2, OUT)
    # (SPLIT1 = SPLIT2 = OUT for one shard); each shard has cdiv(size, width) column ranges.
    slot = tl.program_id(1)
    width = BLOCK_N * N_TILES
    t0 = tl.cdiv(SPLIT1, width)
    t1 = tl.cdiv(SPLIT2 - SPLIT1, width)
    num_c = t0 + t1 + tl.cdiv(OUT - SPLIT2, width)
    pid_m = tl.program_id(0) // num_c
    pid_c = tl.program_id(0) % num_c
    count = tl.load(counts_ptr + slot)
    if pid_m * BLOCK_M >= count:
        return
    s1 = (pid_c >= t0).to(tl.int32)
    s2 = (pid_c >= t0 + t1).to(tl.int32)
    shard = s1 + s2
    col_end = SPLIT1 + s1 * (SPLIT2 - SPLIT1) + s2 * (OUT - SPLIT2)
    col0 = s1 * SPLIT1 + s2 * (SPLIT2 - SPLIT1) + (pid_c - s1 * t0 - s2 * t1) * width

    start = tl.load(starts_ptr + slot)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < count
    rows = tl.load(sorted_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    offs_k = tl.arange(0, BLOCK_K)
    # shrink: inter[m, r] = sum_k x[row m, k] * A[slot, shard * R + r, k]
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + (shard * R + offs_r)[:, None] * stride_ar
              + offs_k[None, :])
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            xt = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            at = tl.load(a_ptrs, mask=mask_r[:, None], other=0.0)
        else:
            mask_k = offs_k < K - k0
            xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            at = tl.load(a_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if IEEE:  # float32 weights: no TF32 rounding
            acc += tl.dot(xt, tl.trans(at.to(xt.dtype)), input_precision="ieee")
        else:
            acc += tl.dot(xt, tl.trans(at.to(xt.dtype)))
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    inter = acc.to(b_ptr.dtype.element_ty)

    # expand: y[row m, n] += sum_r inter[m, r] * B[slot, n, r], BLOCK_N columns at a time
    b_base = b_ptr + slot.to(tl.int64) * stride_bs
    y_rows = y_ptr + rows[:, None] * stride_ym
    for j in tl.static_range(N_TILES):
        offs_n = col0 + j * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < col_end
        bt = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :],
                     mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        if IEEE:
            delta = tl.dot(inter, tl.trans(bt), input_precision="ieee")
        else:
            delta = tl.dot(inter, tl.trans(bt))
        mask = mask_m[:, None] & mask_n[None, :]
        yv = tl.load(y_rows + offs_n[None, :], mask=mask, other=0.0)
        tl.store(y_rows + offs_n[None, :], (yv.to(tl.float32) + delta).to(y_ptr.dtype.element_ty), mask=mask)
# fmt: on


def lora_fused(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: LoRAMeta,
               splits: tuple[int, ...] = (), config: FusedConfig | None = None) -> torch.Tensor:
    """y: [T, O] += per token (x[t] @ a[slot, shard rows]^T) @ b[slot, shard cols]^T, in place.

    x: [T, K]; a: [S, num_shards * R, K]; b: [S, O, R]; `splits`: output offsets where shards 1, 2 begin.
    `config`: launch parameters (default: FUSED_TABLE)."""
    require_triton()
    num_tokens, k = x.shape
    num_slots, o, r = b.shape
    assert len(splits) <= 2 and a.shape[1] == (len(splits) + 1) * r and a.shape[2] == k and y.shape[1] == o
    assert x.stride(1) == 1 and a.stride(2) == 1 and b.stride(2) == 1 and y.stride(1) == 1
    rows = _rows_bound(meta, num_tokens)
    if rows == 0 or num_tokens == 0:
        return y
    bounds = list(zip((0, *splits), (*splits, o)))
    cfg = config or fused_config(k, max(c1 - c0 for c0, c1 in bounds))
    width = cfg.block_n * cfg.n_tiles
    num_ranges = sum(triton.cdiv(c1 - c0, width) for c0, c1 in bounds)
    s1, s2 = (*splits, o, o)[:2]
    bm = min(cfg.block_m_max, max(16, next_pow2(rows)))
    bk = min(cfg.block_k if x.element_size() <= 2 else cfg.block_k // 2, max(16, next_pow2(k)))  # fp32: smem
    grid = (triton.cdiv(rows, bm) * num_ranges, num_slots)
    _lora_fused_kernel[grid](
        x, a, b, y, meta.sorted_idx, meta.counts, meta.starts,
        k, r, s1, s2, o, x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1), y.stride(0),
        BLOCK_M=bm, BLOCK_N=cfg.block_n, N_TILES=cfg.n_tiles, BLOCK_K=bk, BLOCK_R=max(16, next_pow2(r)),
        EVEN_K=k % bk == 0, IEEE=x.dtype == torch.float32, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def lora_apply(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: LoRAMeta,
               splits: tuple[int, ...] = ()) -> torch.Tensor:
    """The LoRA delta added into y in place: fused while adapters have few tokens, else shrink + expand."""
    if _rows_bound(meta, x.shape[0]) <= FUSED_MAX_ROWS:
        return lora_fused(y, x, a, b, meta, splits)
    return lora_expand(y, lora_shrink(x, a, meta), b, meta, splits)


def lora_apply_ref(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: LoRAMeta,
                   splits: tuple[int, ...] = ()) -> torch.Tensor:
    """Twin of lora_apply / lora_fused (the reference): the dense one-hot shrink and expand twins."""
    return lora_expand_ref(y, lora_shrink_ref(x, a, meta), b, meta, splits)
