"""Split-K decode attention over the paged KV cache (flash-decoding): one query token per sequence, each
(sequence, kv head) split over key ranges, then a reduce kernel merges the splits by log-sum-exp. Shares the
tile loop and conventions of kernels/paged_attention.py; the twin is kernels/paged_attention_ref.py. The Triton
backend's decode steps run kernels/decode_attention_fused.py (these tunables, empty splits skipped, one launch with
the cache write and the merge folded in); this pair stays for `TritonBackend.fused_decode = False` and tests."""

from __future__ import annotations

import math

import torch

from quanta import envs
from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.paged_attention import LOG2E, _attend_tile, _check, _dot_precision, _head_dim_pad, _num_sms

# Tunables (H100 first guesses; benchmarks/bench_kernels.py measures them).
# Offline (benchmarks/sass_sig.py SPLIT_COMBOS, Triton 3.6, sm_90): the split kernel at head_dim 128 takes 255
# registers and 264 bytes of stack (spills) at 64-key tiles and 4 warps, 250 and none at 8 warps, yet slower at 8
# (H200, 8B W4A16_AWQ batch 16: 5,387.8 vs 5,535.6 tok/s, h200_s14c_*); 244 and none at 32-key tiles, 4 warps (not
# timed: env QUANTA_DECODE_TILE_N=32).
DECODE_TILE_N = envs.get("QUANTA_DECODE_TILE_N")
DECODE_NUM_WARPS = envs.get("QUANTA_DECODE_WARPS")
DECODE_MIN_TOKENS_PER_SPLIT = envs.get("QUANTA_DECODE_MIN_SPLIT_TOKENS")  # keys a split reads, at least
DECODE_MAX_SPLITS = envs.get("QUANTA_DECODE_MAX_SPLITS")  # splits per (sequence, kv head), at most
DECODE_WAVES = 2  # aim for this many programs per SM when splitting


# fmt: off
@triton.jit
def _decode_split_kernel(
    out_ptr, part_out_ptr, part_lse_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    scale_log2, num_heads, num_splits, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    HAS_WINDOW: tl.constexpr,  # only the last `window` keys
    G_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,  # write the final output directly, no reduce pass
    DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    q_start = tl.load(qsl_ptr + seq)
    has_query = (tl.load(qsl_ptr + seq + 1) - q_start) == 1
    # This split's share of the sequence's key tiles, from the device-side length (graph-safe).
    num_tiles = tl.cdiv(seq_len, TILE_N)
    k_lo = 0
    if HAS_WINDOW:
        k_lo = tl.maximum(seq_len - window, 0)
    first_tile = k_lo // TILE_N
    tiles_per_split = tl.cdiv(num_tiles - first_tile, num_splits)
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    head = kv_head * QUERIES_PER_KV + offs_g
    g_valid = offs_g < QUERIES_PER_KV
    g_live = offs_g < tl.where(has_query, QUERIES_PER_KV, 0)  # rows that own an output token
    tok = q_start.to(tl.int64)
    q = tl.load(
        q_ptr + tok * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=g_live[:, None] & d_valid[None, :], other=0.0,
    )  # [G_PAD, D_PAD]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, TILE_N)
    for j in range(tile_lo, tile_hi):
        k_pos = j * TILE_N + offs_n
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_pos, (k_pos < seq_len) & (k_pos >= k_lo), k_pos, kv_head, bt_row, offs_d, d_valid,
            k_cache_ptr, v_cache_ptr, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
            scale_log2, window, BLOCK_SIZE, False, False, DOT_PREC,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if SINGLE_SPLIT:
        mask = g_live[:, None] & d_valid[None, :]
        tl.store(
            out_ptr + tok * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=mask,
        )
    else:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))  # log2 domain
        row = (seq.to(tl.int64) * num_heads + head) * num_splits + split  # [G_PAD]
        tl.store(part_lse_ptr + row, lse, mask=g_valid)
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], out, mask=g_valid[:, None])
# fmt: on


# fmt: off
@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, qsl_ptr,
    num_heads, num_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_start = tl.load(qsl_ptr + seq)
    has_query = (tl.load(qsl_ptr + seq + 1) - q_start) == 1
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    s_valid = offs_s < num_splits
    row = (seq.to(tl.int64) * num_heads + head) * num_splits + offs_s
    lse = tl.load(part_lse_ptr + row, mask=s_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # empty splits weigh 0
    denom = tl.sum(w, 0)
    part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=s_valid[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0) / tl.where(denom == 0.0, 1.0, denom)
    tl.store(
        out_ptr + q_start.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
        out.to(out_ptr.dtype.element_ty), mask=offs_d < tl.where(has_query, HEAD_DIM, 0),
    )
# fmt: on


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int = 132,
                      min_tokens: int = DECODE_MIN_TOKENS_PER_SPLIT) -> int:
    """Splits per (sequence, kv head) so that the decode grid covers ~DECODE_WAVES programs per SM,
    each split reading at least `min_tokens` keys of a max_seq_len-long sequence.
    Depends on host values only: under CUDA graphs, capture with max_seq_len = the model's max length."""
    want = math.ceil(DECODE_WAVES * num_sms / max(num_seqs * num_kv_heads, 1))
    by_len = math.ceil(max(max_seq_len, 1) / min_tokens)
    return max(1, min(want, by_len, DECODE_MAX_SPLITS))


def paged_attention_decode(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], at most one token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    num_splits: int | None = None,
    window: int | None = None,  # sliding window: only the last `window` keys
) -> torch.Tensor:
    """Split-K decode (flash-decoding). The grid depends only on host values (num_seqs, num_kv_heads,
    num_splits), loop bounds come from seq_lens on the device: safe to capture in a CUDA graph.
    A sequence with seq_len 0 gets zeros; a sequence with no query token writes nothing."""
    require_triton()
    num_heads, num_kv_heads, head_dim, block_size = _check(q, k_cache, v_cache)
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    if num_splits is None:
        span = max_seq_len if window is None else min(max_seq_len, window + DECODE_TILE_N)
        num_splits = decode_num_splits(num_seqs, num_kv_heads, span, _num_sms(q.device))
    group = num_heads // num_kv_heads
    d_pad = _head_dim_pad(head_dim)
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(num_seqs, num_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    # fmt: off
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part_out, part_lse, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, num_heads, num_splits, window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        QUERIES_PER_KV=group, HAS_WINDOW=window is not None, G_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_SIZE=block_size, TILE_N=DECODE_TILE_N if d_pad <= 128 else DECODE_TILE_N // 2, SINGLE_SPLIT=single,
        DOT_PREC=_dot_precision(q.dtype), num_warps=DECODE_NUM_WARPS,
    )
    # fmt: on
    if not single:
        # fmt: off
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_lse, query_start_loc, num_heads, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, SPLITS_PAD=next_pow2(num_splits), num_warps=1 if d_pad <= 64 else 2,
        )
        # fmt: on
    return out
