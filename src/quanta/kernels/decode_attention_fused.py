"""Decode attention in ONE launch per layer: rotary on q and k, the new token's KV-cache write, split-K attention
over the paged cache and the log-sum-exp merge of the splits, all in `_decode_fused_kernel`.

Grid (num_seqs, num_kv_heads, num_splits); num_splits comes from host values only (under CUDA graphs from the
model's max length), so the grid is graph-safe. Every program derives the same split plan from the device-side
seq_len: each non-empty split reads at least DECODE_MIN_TOKENS_PER_SPLIT keys, so a short sequence has only
`n_eff` non-empty splits and the programs past them return at once. n_eff == 1: split 0 writes the output
directly (no partials, no atomics). Otherwise each split stores its partial (out, lse), syncs its threads and
bumps a per-(sequence, kv head) counter with an acq_rel atomic; the program that arrives last (count n_eff - 1)
merges the partials exactly as `_decode_reduce_kernel` does (read with .cg: L2, not a stale L1), stores the
output and resets the counter. Counters are zeroed once and every launch leaves them at 0: no memset.

KV write (k, v given): the program whose key range holds position seq_len - 1 (the new token; in a decode step
slot_mapping[token] is that position's slot, as the model runner builds it) rotates k, stores k and v at the
slot, syncs its threads, then reads its tiles; no other program reads that tile. Slot < 0 (padding): no write.
q is rotated in registers only: the q tensor is left as it is. Rotary is full-rotary neox style with the
conventions of kernels/rotary.py (cos/sin rows picked by `positions[token]`, rounded once to the input dtype).

Twin: decode_attention_fused_ref = apply_rotary_emb_ref + kv_cache_write_ref + paged_attention_ref.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.counters import zeroed_counters
from quanta.kernels.kv_cache_write import kv_cache_write_ref
from quanta.kernels.paged_attention import LOG2E, _attend_tile, _check, _dot_precision, _head_dim_pad, _num_sms
from quanta.kernels.paged_attention_decode import (
    DECODE_MIN_TOKENS_PER_SPLIT,
    DECODE_NUM_WARPS,
    DECODE_TILE_N,
    decode_num_splits,
)
from quanta.kernels.paged_attention_ref import paged_attention_ref
from quanta.kernels.rotary import apply_rotary_emb_ref


# fmt: off
@triton.jit
def _rope_load(row_ptr, offs_d, mask, pos, cos_ptr, sin_ptr, stride_cos, stride_sin,
               HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    # Load rows (row_ptr: [R, 1] or a scalar pointer) and rotate them: out[d] = x[d] * cos - x[d + half] * sin
    # for d < half, x[d] * cos + x[d - half] * sin above (the same products as kernels/rotary.py), in float32.
    x = tl.load(row_ptr + offs_d, mask=mask, other=0.0)
    if HAS_ROPE:
        lo = offs_d < HALF
        partner = tl.load(row_ptr + tl.where(lo, offs_d + HALF, offs_d - HALF), mask=mask, other=0.0)
        f = offs_d % HALF
        cs_mask = offs_d < 2 * HALF
        cos = tl.load(cos_ptr + pos * stride_cos + f, mask=cs_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_sin + f, mask=cs_mask, other=0.0).to(tl.float32)
        x = x.to(tl.float32) * cos + partner.to(tl.float32) * tl.where(lo, -sin, sin)
    return x


@triton.jit
def _write_new_kv(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, tok, slot, kv_head, pos, cos_ptr, sin_ptr, stride_cos, stride_sin,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch,
    offs_d, d_valid,
    BLOCK_SIZE: tl.constexpr, HALF: tl.constexpr, HAS_ROPE: tl.constexpr,
):
    # This token's k (rotated) and v of one kv head -> the paged cache at `slot` (rounded as the twin rounds).
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    k = _rope_load(k_ptr + tok * stride_kt + kv_head * stride_kh, offs_d, d_valid, pos, cos_ptr, sin_ptr,
                   stride_cos, stride_sin, HALF, HAS_ROPE)
    k = k.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + blk * stride_kb + off * stride_ko + kv_head * stride_kch + offs_d, k, mask=d_valid)
    v = tl.load(v_ptr + tok * stride_vt + kv_head * stride_vh + offs_d, mask=d_valid)
    tl.store(v_cache_ptr + blk * stride_vb + off * stride_vo + kv_head * stride_vch + offs_d,
             v.to(v_cache_ptr.dtype.element_ty), mask=d_valid)


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, row, n_splits, g_valid, offs_d,
                  G_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    # row: [G_PAD] index of split 0's partial of each query head. The merge of _decode_reduce_kernel.
    offs_s = tl.arange(0, SPLITS_PAD)
    lse_mask = g_valid[:, None] & (offs_s[None, :] < n_splits)
    lse = tl.load(part_lse_ptr + row[:, None] + offs_s[None, :], mask=lse_mask, other=float("-inf"),
                  cache_modifier=".cg")  # [G_PAD, SPLITS_PAD], log2 domain
    m = tl.max(lse, 1)
    m = tl.where(m == float("-inf"), 0.0, m)  # empty splits weigh 0
    denom = tl.sum(tl.exp2(lse - m[:, None]), 1)
    acc = tl.zeros([G_PAD, HEAD_DIM_PAD], tl.float32)
    for s in range(n_splits):
        lse_s = tl.load(part_lse_ptr + row + s, mask=g_valid, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + (row + s)[:, None] * HEAD_DIM_PAD + offs_d[None, :], mask=g_valid[:, None],
                       other=0.0, cache_modifier=".cg")
        acc += part * tl.exp2(lse_s - m)[:, None]
    return acc / tl.where(denom == 0.0, 1.0, denom)[:, None]


@triton.jit
def _decode_fused_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, cnt_ptr,
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    scale_log2, num_heads, num_kv_heads, num_splits, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cos, stride_sin,
    stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch, stride_bt,
    QUERIES_PER_KV: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MIN_TILES: tl.constexpr, SPLITS_PAD: tl.constexpr,
    HAS_WINDOW: tl.constexpr, WRITE_KV: tl.constexpr, HAS_ROPE: tl.constexpr, MULTI_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    if tl.load(qsl_ptr + seq + 1) - q_start != 1:  # no query token: nothing to write, nothing to read
        return
    # The split plan, from the device-side length; identical in every program of this (seq, kv head).
    seq_len = tl.load(seq_lens_ptr + seq)
    num_tiles = tl.cdiv(seq_len, TILE_N)
    k_lo = 0
    if HAS_WINDOW:
        k_lo = tl.maximum(seq_len - window, 0)
    first_tile = k_lo // TILE_N
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles - first_tile, num_splits), MIN_TILES)
    n_eff = tl.maximum(tl.cdiv(num_tiles - first_tile, tiles_per_split), 1)  # splits with work (seq_len 0: 1)
    if split >= n_eff:
        return
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    tok = q_start.to(tl.int64)
    pos = 0
    if HAS_ROPE:
        pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    if WRITE_KV:
        slot = tl.load(slot_ptr + tok).to(tl.int64)
        last_tile = (seq_len - 1) // TILE_N
        if (slot >= 0) & (last_tile >= tile_lo) & (last_tile < tile_hi):  # this program reads the new key's tile
            _write_new_kv(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, tok, slot, kv_head, pos, cos_ptr, sin_ptr,
                          stride_cos, stride_sin, stride_kt, stride_kh, stride_vt, stride_vh,
                          stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch, offs_d, d_valid,
                          BLOCK_SIZE, HEAD_DIM // 2, HAS_ROPE)
        tl.debug_barrier()  # every thread's cache stores land before any thread loads the tile

    offs_g = tl.arange(0, G_PAD)
    g_valid = offs_g < QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + offs_g
    io_mask = g_valid[:, None] & d_valid[None, :]
    q = _rope_load(q_ptr + tok * stride_qt + head[:, None] * stride_qh, offs_d, io_mask, pos, cos_ptr, sin_ptr,
                   stride_cos, stride_sin, HEAD_DIM // 2, HAS_ROPE).to(q_ptr.dtype.element_ty)  # [G_PAD, D_PAD]
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM_PAD], tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    offs_n = tl.arange(0, TILE_N)
    for j in range(tile_lo, tile_hi):
        k_pos = j * TILE_N + offs_n
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, k_pos, (k_pos < seq_len) & (k_pos >= k_lo), k_pos, kv_head, bt_row, offs_d, d_valid,
            k_cache_ptr, v_cache_ptr, stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch,
            scale_log2, window, BLOCK_SIZE, False, False, DOT_PREC,
        )
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_ptrs = out_ptr + tok * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if MULTI_SPLIT:
        if n_eff == 1:
            tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
        else:
            row = (seq.to(tl.int64) * num_heads + head) * num_splits  # [G_PAD]: split 0's partial
            lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)))
            tl.store(part_lse_ptr + row + split, lse, mask=g_valid)
            tl.store(part_out_ptr + (row + split)[:, None] * HEAD_DIM_PAD + offs_d[None, :], out,
                     mask=g_valid[:, None])
            tl.debug_barrier()  # every thread's partial is stored before the (single-thread) atomic releases them
            cnt = cnt_ptr + seq * num_kv_heads + kv_head
            if tl.atomic_add(cnt, 1) == n_eff - 1:  # acq_rel: the last to arrive sees every partial
                merged = _merge_splits(part_out_ptr, part_lse_ptr, row, n_eff, g_valid, offs_d,
                                       G_PAD, HEAD_DIM_PAD, SPLITS_PAD)
                tl.store(out_ptrs, merged.to(out_ptr.dtype.element_ty), mask=io_mask)
                tl.atomic_xchg(cnt, 0)  # back to 0 for the next launch (graph replays, the next layer)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
# fmt: on


# ------------------------------------------------------------------ per-(sequence, kv head) counters
def decode_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 counters (>= n) for the split decode kernel (kernels/counters.py)."""
    return zeroed_counters("decode_attention", device, n)


def decode_attention_fused(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim], at most one token per sequence (not rotated in place)
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    max_seq_len: int,
    scale: float,
    k: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]: new keys to write (None: attend only)
    v: torch.Tensor | None = None,  # [num_tokens, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor | None = None,  # [num_tokens] int64, -1 = padding (no write)
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,  # (positions [T], cos, sin [max_pos, D/2])
    window: int | None = None,  # sliding window: only the last `window` keys
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    num_splits: int | None = None,  # grid splits per (sequence, kv head); None: decode_num_splits
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]; rows of tokens in no sequence are left unwritten
    """One launch: (rotary on q and k +) the KV-cache write of each sequence's new token + split-K decode
    attention + the merge. Equals decode_attention_fused_ref. Tokens past query_start_loc[-1] are padding: their
    slots must be -1 (they are not written). A sequence with seq_len 0 gets zeros, one with no query token
    nothing."""
    require_triton()
    num_heads, num_kv_heads, head_dim, block_size = _check(q, k_cache, v_cache)
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.shape[0]
    if q.shape[0] == 0 or num_seqs == 0:
        return out
    write_kv = k is not None
    assert not write_kv or (v is not None and slot_mapping is not None and k.stride(-1) == 1 and v.stride(-1) == 1)
    assert rope is None or write_kv, "rope is applied to q and the new k: pass k, v and slot_mapping"
    positions, cos_cache, sin_cache = rope if rope is not None else (q, q, q)  # placeholders when unused
    if rope is not None:
        assert 2 * cos_cache.shape[-1] == head_dim, "full rotary only (kernels/rotary.py covers partial rotary)"
        assert cos_cache.stride(-1) == 1 and sin_cache.stride(-1) == 1
    d_pad = _head_dim_pad(head_dim)
    tile_n = DECODE_TILE_N if d_pad <= 128 else DECODE_TILE_N // 2
    if num_splits is None:
        span = max_seq_len if window is None else min(max_seq_len, window + tile_n)
        num_splits = decode_num_splits(num_seqs, num_kv_heads, span, _num_sms(q.device))
    cnt = decode_counters(q.device, num_seqs * num_kv_heads) if num_splits > 1 else None
    num_splits = num_splits if cnt is not None else 1
    group = num_heads // num_kv_heads
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = cnt = out  # unused
    kk, vv, slots = (k, v, slot_mapping) if write_kv else (q, q, seq_lens)  # placeholders when unused
    # fmt: off
    _decode_fused_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part_out, part_lse, cnt, q, kk, vv, positions, cos_cache, sin_cache, slots,
        k_cache, v_cache, block_tables, seq_lens, query_start_loc,
        scale * LOG2E, num_heads, num_kv_heads, num_splits, window or 0,
        q.stride(0), q.stride(1), kk.stride(0), kk.stride(1), vv.stride(0), vv.stride(1), out.stride(0), out.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        QUERIES_PER_KV=group, G_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim, HEAD_DIM_PAD=d_pad,
        BLOCK_SIZE=block_size, TILE_N=tile_n, MIN_TILES=-(-DECODE_MIN_TOKENS_PER_SPLIT // tile_n),
        SPLITS_PAD=next_pow2(num_splits), HAS_WINDOW=window is not None, WRITE_KV=write_kv, HAS_ROPE=rope is not None,
        MULTI_SPLIT=num_splits > 1, DOT_PREC=_dot_precision(q.dtype), num_warps=DECODE_NUM_WARPS,
    )
    # fmt: on
    return out


def decode_attention_fused_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """The twin: rotary (q not in place), the cache write, then paged attention, one op at a time."""
    if rope is not None:
        q, k = apply_rotary_emb_ref(q, k, *rope, inplace=False)
    if k is not None:
        kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window=window)
