"""Attention over the paged KV cache: a unified varlen kernel (prefill / chunked prefill / mixed batches)
and (kernels/paged_attention_decode.py) a split-K decode kernel (flash-decoding) with its reduce kernel; the twin
is kernels/paged_attention_ref.py.

Cache layout: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. Query token j of
sequence s (q_len_s = query_start_loc[s+1] - query_start_loc[s]) sits at position seq_lens[s] - q_len_s + j
and sees keys 0..that position. Key tiles of TILE_N tokens are gathered through the block table one key
at a time, so TILE_N and the page size are independent. GQA: one program owns one kv head and all the
query heads that share it, so each K/V tile is loaded once for the whole group. head_dim is padded to a
power of two (>= 16) with masks, so e.g. 8 or 80 work. Softmax runs in float32 in the exp2 domain.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton

LOG2E = 1.4426950408889634
# Tunables (H100 first guesses; benchmarks/bench_kernels.py measures them).
PREFILL_BLOCK_M = 64  # query rows (tokens x heads of one kv group) per program
PREFILL_TILE_N = 64  # keys per inner step (halved for head_dim > 128)


# fmt: off
@triton.jit
def _find_seq_idx(qsl_ptr, q_block_gid, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence s owns the q blocks [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1): an upper bound
    # of its cdiv(q_len, BLOCK_Q) blocks, so the grid never needs a host read of the lengths.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if start <= q_block_gid:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1
# fmt: on


# fmt: off
@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, k_pos, k_valid, q_pos, kv_head, bt_row, offs_d, d_valid,
    k_cache_ptr, v_cache_ptr, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
    scale_log2, window,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,  # keys more than `window` - 1 positions before the query are masked
    DOT_PREC: tl.constexpr,
):
    # One online-softmax step over a TILE_N-key tile; keys are gathered page by page via the block table.
    blk = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
    in_blk = (k_pos % BLOCK_SIZE).to(tl.int64)
    kv_mask = k_valid[:, None] & d_valid[None, :]
    k = tl.load(
        k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ko + kv_head * stride_kh + offs_d[None, :],
        mask=kv_mask, other=0.0,
    )  # [TILE_N, D_PAD]
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2  # [M, TILE_N]
    keep = k_valid[None, :]
    if CAUSAL:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if HAS_WINDOW:
        keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vo + kv_head * stride_vh + offs_d[None, :],
        mask=kv_mask, other=0.0,
    )  # [TILE_N, D_PAD]
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return m_new, l_i, acc
# fmt: on


# fmt: off
@triton.jit
def _unified_attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    scale_log2, num_seqs, window,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh, stride_bt,
    QUERIES_PER_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows = BLOCK_Q tokens x QUERIES_PER_KV heads (flattened, token-major)
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    q_block_gid = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_seq_idx(qsl_ptr, q_block_gid, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    q_block = q_block_gid - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    q_in_seq = q_block * BLOCK_Q + offs_m // QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + offs_m % QUERIES_PER_KV
    row_valid = (offs_m // QUERIES_PER_KV < BLOCK_Q) & (q_in_seq < q_len)
    tok = (q_start + q_in_seq).to(tl.int64)
    io_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=io_mask, other=0.0)
    q_pos = ctx_len + q_in_seq

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, TILE_N)
    # Keys before the block's first query are visible to every row: no causal mask needed there.
    num_full_tiles = (ctx_len + q_block * BLOCK_Q + 1) // TILE_N
    kv_end = ctx_len + tl.minimum((q_block + 1) * BLOCK_Q, q_len)  # one past the last key needed
    num_tiles = tl.cdiv(kv_end, TILE_N)
    first_tile = 0
    if HAS_WINDOW:  # tiles before the first query's window are skipped; every tile is masked
        first_tile = tl.maximum(ctx_len + q_block * BLOCK_Q - window + 1, 0) // TILE_N
        num_full_tiles = first_tile
    for j in range(first_tile, num_full_tiles):
        k_pos = j * TILE_N + offs_n
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_pos, k_pos < seq_len, q_pos, kv_head, bt_row, offs_d, d_valid,
            k_cache_ptr, v_cache_ptr, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
            scale_log2, window, BLOCK_SIZE, False, False, DOT_PREC,
        )
    for j in range(num_full_tiles, num_tiles):
        k_pos = j * TILE_N + offs_n
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_pos, k_pos < kv_end, q_pos, kv_head, bt_row, offs_d, d_valid,
            k_cache_ptr, v_cache_ptr, stride_kb, stride_ko, stride_kh, stride_vb, stride_vo, stride_vh,
            scale_log2, window, BLOCK_SIZE, True, HAS_WINDOW, DOT_PREC,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=io_mask,
    )
# fmt: on


def _dot_precision(dtype: torch.dtype) -> str:
    # NOTE: fp32 inputs would otherwise run as tf32 on the GPU (~1e-3 error); 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def _head_dim_pad(head_dim: int) -> int:
    return max(16, next_pow2(head_dim))  # tl.dot wants K >= 16


@lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only matters for the interpreter


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int, int]:
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return num_heads, num_kv_heads, head_dim, block_size


def paged_attention_prefill(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    window: int | None = None,  # sliding window: a query at position p sees keys p-window+1..p
) -> torch.Tensor:
    """Unified varlen attention (any mix of prefill chunks and decodes). Tokens past
    query_start_loc[-1] are left unwritten."""
    require_triton()
    num_heads, num_kv_heads, head_dim, block_size = _check(q, k_cache, v_cache)
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    d_pad = _head_dim_pad(head_dim)
    block_m = max(16, next_pow2(group), min(PREFILL_BLOCK_M, next_pow2(max(max_query_len, 1) * group)))
    block_q = block_m // group
    tile_n = PREFILL_TILE_N if d_pad <= 128 else PREFILL_TILE_N // 2
    grid = (q.shape[0] // block_q + num_seqs, num_kv_heads)
    # fmt: off
    _unified_attention_kernel[grid](
        out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, num_seqs, window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        QUERIES_PER_KV=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad, BLOCK_SIZE=block_size,
        HAS_WINDOW=window is not None, BLOCK_M=block_m, BLOCK_Q=block_q, TILE_N=tile_n, DOT_PREC=_dot_precision(q.dtype),
        num_warps=4 if block_m * d_pad <= 64 * 128 else 8,
    )
    # fmt: on
    return out


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Decode kernel when max_query_len == 1, the unified kernel otherwise."""
    if max_query_len <= 1:
        from quanta.kernels.paged_attention_decode import paged_attention_decode

        return paged_attention_decode(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_seq_len, scale, out, num_splits,
            window,
        )
    return paged_attention_prefill(
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, out, window
    )
