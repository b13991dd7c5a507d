"""Decode attention in ONE launch per layer: rotary on q and k, the new token's KV-cache write, split-K attention
over the paged cache and the log-sum-exp merge of the splits, all in `_decode_fused_kernel`.

Grid (num_seqs, num_kv_heads, num_splits); num_splits comes from host values only (under CUDA graphs from the
model's max length), so the grid is graph-safe. Every program derives the same split plan from the device-side
seq_len: each non-empty split reads at least FUSED_MIN_TOKENS_PER_SPLIT keys (a sequence of at most
FUSED_ONE_SPLIT_TOKENS keys: one split, its tiles in turn, no merge), so a short sequence has only `n_eff` non-empty
splits and the programs past them return at once. n_eff == 1: split 0 writes the output directly (no partials, no
atomics). Otherwise each split stores its partial (out, lse), syncs its threads and bumps a per-(sequence, kv head)
counter with an acq_rel atomic; the program that arrives last (count n_eff - 1) merges the partials (the log-sum-exp
merge of `_decode_reduce_kernel`, online a chunk of splits at a time so the usual few splits take one round trip;
read with .cg: L2, not a stale L1), stores the output and resets the counter (zeroed once, left at 0: no memset).

Order: at short contexts the time is a chain of dependent global-memory round trips, not bytes, so each step
issues everything that needs only the one before: (1) qsl[seq], qsl[seq + 1] and seq_lens[seq] together; programs
with no query token or past n_eff return; (2) the block-table entries of the split's first two tiles, q, the
position, the slot, the new k and v rows; (3) the cos/sin rows and the first tile's K and V; then the dots. Each
tile's K and V load together; with PREFETCH (K/V tiles of <= PREFETCH_TILE_BYTES, e.g. 64 keys x head_dim 64 at
16 bits) tile j + 1's load is issued before tile j's dots, else after them; block-table entries run one tile ahead.
With PDL on (kernels/pdl.py, QUANTA_PDL=1, Hopper+) the kernel may launch while the previous one (the qkv GEMV)
drains; with PDL_PRELOAD (QUANTA_PDL_PRELOAD, default on) round trips 1-3 (lengths, block table, position, slot,
cos/sin, the first K/V tile: nothing that kernel writes) run before the wait, and only q, k, v after it.

KV write (k, v given): the program whose key range holds position seq_len - 1 (the new token; in a decode step
slot_mapping[token] is that position's slot, as the model runner builds it) rotates k, rounds k and v as the
cache stores them and stores them at the slot for later steps; its tile takes that row from registers (tl.where),
not from the cache, so the tile loads neither wait for the store nor need a barrier. No other program reads that
tile. Slot < 0 (padding): no write, and the row is what the cache holds (as in the twin). q is rotated in
registers only: the q tensor is left as it is. Rotary is full-rotary neox style with the conventions of
kernels/rotary.py (cos/sin rows picked by `positions[token]`, rounded once to the input dtype).
Twin: decode_attention_fused_ref = apply_rotary_emb_ref + kv_cache_write_ref + paged_attention_ref.
"""

from __future__ import annotations

import torch

from quanta import envs
from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.counters import zeroed_counters
from quanta.kernels.paged_attention import LOG2E, _check, _dot_precision, _head_dim_pad, _num_sms
from quanta.kernels.paged_attention_decode import decode_num_splits
from quanta.kernels.paged_attention_ref import decode_attention_fused_ref  # noqa: F401 (the twin lives there)
from quanta.kernels.pdl import pdl_begin, pdl_enabled, pdl_launch_kwargs, preload_enabled

# Launch settings (H200, benchmarks/RESULTS.md sessions 7, 13-15). K / V tiles of <= PREFETCH_TILE_BYTES are double-
# buffered (1B batch 1 1,116.9 / 1,122.3 tok/s vs 1,072.2 / 1,084.3 never). A split reads >= FUSED_MIN_TOKENS_PER_SPLIT
# keys, a sequence of <= FUSED_ONE_SPLIT_TOKENS is one split. One sequence: FUSED_TILE_N keys a tile (head_dim > 128:
# half), 4 warps up to head_dim 64, else 8 (4 spill at 128: 8B AWQ 480.3 / 479.9 vs 475.3 / 476.0; 1B at 8: 1,097.5
# vs 1,122.7; 32- / 16-key tiles: 1B 1,070.6 / 1,063.3 vs 1,114.6, 8B AWQ 458.2 / 449.3 vs 480.8). Several, MANY =
# (tile keys, warps, prefetch bytes): 32, 4 (244 registers at head_dim 128, no spills): 8B batch 16 AWQ 5,633.6 /
# 5,668.3 vs 5,536.5 / 5,526.3 on the three-launch path, bf16 3,333.8 vs 3,323.1.
PREFETCH_TILE_BYTES = envs.get("QUANTA_FUSED_DECODE_PREFETCH_BYTES")
FUSED_MIN_TOKENS_PER_SPLIT = envs.get("QUANTA_FUSED_DECODE_MIN_SPLIT_TOKENS")
FUSED_ONE_SPLIT_TOKENS = envs.get("QUANTA_FUSED_DECODE_ONE_SPLIT_TOKENS")
FUSED_TILE_N = envs.get("QUANTA_FUSED_DECODE_TILE_N")
FUSED_NUM_WARPS = envs.get("QUANTA_FUSED_DECODE_WARPS")
MANY = tuple(int(v) for v in envs.get("QUANTA_FUSED_DECODE_MANY").split(","))


def fused_num_warps(head_dim_pad: int) -> int:  # QUANTA_FUSED_DECODE_WARPS, or (0) 4 up to head_dim 64, else 8
    return FUSED_NUM_WARPS or (4 if head_dim_pad <= 64 else 8)


def launch_shape(head_dim_pad: int, num_seqs: int, elt: int) -> tuple[int, int, bool]:
    """(keys a tile, warps, double-buffered) of a launch over num_seqs sequences of elt-byte K / V."""
    one = (FUSED_TILE_N, fused_num_warps(head_dim_pad), PREFETCH_TILE_BYTES)
    tile_n, warps, pf_bytes = one if num_seqs == 1 else MANY
    tile_n = tile_n if head_dim_pad <= 128 else tile_n // 2
    return tile_n, warps, tile_n * head_dim_pad * elt <= pf_bytes


# The split merge loads [query heads of a kv head, splits, head_dim] partials of at most this many fp32 values at once
MERGE_VALUES = 8192


# fmt: off
@triton.jit
def _rope_rows(row_ptr, offs_d, mask, HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    # Rows x (row_ptr: [R, 1] or a scalar pointer) and, with rotary, their rotation partners x[d +- half].
    x = tl.load(row_ptr + offs_d, mask=mask, other=0.0)
    partner = x
    if HAS_ROPE:
        partner = tl.load(row_ptr + tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF), mask=mask, other=0.0)
    return x, partner


@triton.jit
def _rope(x, partner, cos, sin, offs_d, HALF: tl.constexpr, HAS_ROPE: tl.constexpr):
    # out[d] = x[d] * cos - x[d + half] * sin for d < half, x[d] * cos + x[d - half] * sin above (the same
    # products as kernels/rotary.py), in float32.
    if HAS_ROPE:
        x = x.to(tl.float32) * cos + partner.to(tl.float32) * tl.where(offs_d < HALF, -sin, sin)
    return x


@triton.jit
def _tile_blocks(bt_row, j, kv_lo, kv_end, offs_n, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    # Physical block of each key of tile j (keys outside [kv_lo, kv_end) masked: block 0, not loaded).
    k_pos = j * TILE_N + offs_n
    valid = (k_pos >= kv_lo) & (k_pos < kv_end)
    return tl.load(bt_row + k_pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)


@triton.jit
def _load_kv(k_cache_ptr, v_cache_ptr, blk, j, kv_lo, kv_end, kv_head, offs_n, offs_d, d_valid,
             stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch,
             BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr):
    # K and V of tile j, issued together ([TILE_N, D_PAD] each; masked keys 0).
    k_pos = j * TILE_N + offs_n
    in_blk = (k_pos % BLOCK_SIZE).to(tl.int64)
    mask = ((k_pos >= kv_lo) & (k_pos < kv_end))[:, None] & d_valid[None, :]
    kt = tl.load(k_cache_ptr + blk[:, None] * stride_kb + in_blk[:, None] * stride_ko + kv_head * stride_kch
                 + offs_d[None, :], mask=mask, other=0.0)
    vt = tl.load(v_cache_ptr + blk[:, None] * stride_vb + in_blk[:, None] * stride_vo + kv_head * stride_vch
                 + offs_d[None, :], mask=mask, other=0.0)
    return kt, vt


@triton.jit
def _attend_loaded(q, m_i, l_i, acc, kt, vt, j, kv_lo, kv_end, offs_n, new_pos, k_new, v_new, scale_log2,
                   TILE_N: tl.constexpr, WRITE_KV: tl.constexpr, DOT_PREC: tl.constexpr):
    # One online-softmax step over loaded tile j (the arithmetic of paged_attention._attend_tile). The row at
    # position new_pos takes the new token's k and v from registers: the values just stored to the cache.
    k_pos = j * TILE_N + offs_n
    if WRITE_KV:
        is_new = (k_pos == new_pos)[:, None]
        kt = tl.where(is_new, k_new[None, :], kt)
        vt = tl.where(is_new, v_new[None, :], vt)
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale_log2  # [G_PAD, TILE_N]
    s = tl.where(((k_pos >= kv_lo) & (k_pos < kv_end))[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
    return m_new, l_i, acc


@triton.jit
def _load_qkv(q_ptr, k_ptr, v_ptr, tok, head, kv_head, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt,
              stride_vh, offs_d, d_valid, io_mask, HALF: tl.constexpr, HAS_ROPE: tl.constexpr, WRITE_KV: tl.constexpr):
    # The token's q rows (rotation partners too) and, writing the cache, its k and v rows.
    q, q_partner = _rope_rows(q_ptr + tok * stride_qt + head[:, None] * stride_qh, offs_d, io_mask, HALF, HAS_ROPE)
    k_new = 0.0
    k_partner = 0.0
    v_new = 0.0
    if WRITE_KV:
        k_new, k_partner = _rope_rows(k_ptr + tok * stride_kt + kv_head * stride_kh, offs_d, d_valid, HALF, HAS_ROPE)
        v_new = tl.load(v_ptr + tok * stride_vt + kv_head * stride_vh + offs_d, mask=d_valid, other=0.0)
    return q, q_partner, k_new, k_partner, v_new


@triton.jit
def _merge_store(part_out_ptr, part_lse_ptr, head0, num_splits, n_splits, out_rows, stride_oh, offs_d, d_valid,
                 QUERIES_PER_KV: tl.constexpr, G: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SCH: tl.constexpr):
    # The merge of _decode_reduce_kernel for query heads head0 .. head0 + QUERIES_PER_KV - 1 (G: that, padded to a
    # power of two), stored at out_rows (+ head * stride_oh). Partials load in chunks of SCH splits ([G, SCH, D]),
    # every head at once, each chunk's lse with its outputs and merged online (the running max rescales what came
    # before): n splits take ceil(n / SCH) dependent round trips, one for the usual few (reads with .cg: L2, not a
    # stale L1).
    offs_h = tl.arange(0, G)
    h_valid = offs_h < QUERIES_PER_KV
    rows = (head0 + offs_h).to(tl.int64) * num_splits  # [G]: split 0's partial of each head
    m = tl.full([G], float("-inf"), tl.float32)  # log2 domain
    denom = tl.zeros([G], tl.float32)
    acc = tl.zeros([G, HEAD_DIM_PAD], tl.float32)
    offs_c = tl.arange(0, SCH)
    for c in range(0, n_splits, SCH):
        s_valid = h_valid[:, None] & ((c + offs_c)[None, :] < n_splits)  # [G, SCH]
        idx = rows[:, None] + c + offs_c[None, :]
        lse_c = tl.load(part_lse_ptr + idx, mask=s_valid, other=float("-inf"), cache_modifier=".cg")
        part = tl.load(part_out_ptr + idx[:, :, None] * HEAD_DIM_PAD + offs_d[None, None, :],
                       mask=s_valid[:, :, None], other=0.0, cache_modifier=".cg")  # [G, SCH, D]
        m_new = tl.maximum(m, tl.max(lse_c, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # empty splits weigh 0
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse_c - m_safe[:, None])
        denom = denom * alpha + tl.sum(w, 1)
        acc = acc * alpha[:, None] + tl.sum(part * w[:, :, None], 1)
        m = m_new
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(out_rows + offs_h[:, None] * stride_oh + offs_d[None, :], out.to(out_rows.dtype.element_ty),
             mask=h_valid[:, None] & d_valid[None, :])


@triton.jit
def _decode_fused_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, cnt_ptr,
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr,
    k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, qsl_ptr,
    scale_log2, num_heads, num_kv_heads, num_splits, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_cos, stride_sin,
    stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch, stride_bt,
    QUERIES_PER_KV: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, MIN_TILES: tl.constexpr, ONE_SPLIT_TILES: tl.constexpr,
    HAS_WINDOW: tl.constexpr, WRITE_KV: tl.constexpr, HAS_ROPE: tl.constexpr, MULTI_SPLIT: tl.constexpr,
    DOT_PREC: tl.constexpr, PREFETCH: tl.constexpr, USE_PDL: tl.constexpr, G_MERGE: tl.constexpr = 1,
    MERGE_CHUNK: tl.constexpr = 1, PDL_PRELOAD: tl.constexpr = False,
):
    if not PDL_PRELOAD:
        pdl_begin(USE_PDL)  # everything below may read what the kernel before this one wrote
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Round trip 1: the three independent scalars together.
    q_start = tl.load(qsl_ptr + seq)
    q_end = tl.load(qsl_ptr + seq + 1)
    seq_len = tl.load(seq_lens_ptr + seq)
    if q_end - q_start != 1:  # no query token: nothing to write, nothing to read
        return
    # The split plan, from the device-side length; identical in every program of this (seq, kv head).
    num_tiles = tl.cdiv(seq_len, TILE_N)
    kv_lo = 0
    if HAS_WINDOW:
        kv_lo = tl.maximum(seq_len - window, 0)
    first_tile = kv_lo // TILE_N
    tiles_per_split = tl.maximum(tl.cdiv(num_tiles - first_tile, num_splits), MIN_TILES)
    if num_tiles - first_tile <= ONE_SPLIT_TILES:  # short: one split reads every tile (no partials, no merge)
        tiles_per_split = tl.maximum(num_tiles - first_tile, 1)
    n_eff = tl.maximum(tl.cdiv(num_tiles - first_tile, tiles_per_split), 1)  # splits with work (seq_len 0: 1)
    if split >= n_eff:
        return
    tile_lo = first_tile + split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    kv_end = tl.minimum(seq_len, tile_hi * TILE_N)  # keys past this split's tiles are masked

    # Round trip 2: what needs only the token index and the plan (the first tiles' blocks, q, position, slot,
    # the new k and v rows).
    HALF: tl.constexpr = HEAD_DIM // 2
    tok = q_start.to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_valid = offs_d < HEAD_DIM
    offs_n = tl.arange(0, TILE_N)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    blk = _tile_blocks(bt_row, tile_lo, kv_lo, kv_end, offs_n, BLOCK_SIZE, TILE_N)
    blk_next = _tile_blocks(bt_row, tile_lo + 1, kv_lo, kv_end, offs_n, BLOCK_SIZE, TILE_N)
    offs_g = tl.arange(0, G_PAD)
    g_valid = offs_g < QUERIES_PER_KV
    head = kv_head * QUERIES_PER_KV + offs_g
    io_mask = g_valid[:, None] & d_valid[None, :]
    if not PDL_PRELOAD:
        q, q_partner, k_new, k_partner, v_new = _load_qkv(q_ptr, k_ptr, v_ptr, tok, head, kv_head, stride_qt,
                                                          stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                                          offs_d, d_valid, io_mask, HALF, HAS_ROPE, WRITE_KV)
    pos = 0
    if HAS_ROPE:
        pos = tl.load(pos_ptr + tok).to(tl.int64)
    new_pos = -1
    if WRITE_KV:
        slot = tl.load(slot_ptr + tok).to(tl.int64)

    # Round trip 3: the cos/sin rows and the first tile's K and V.
    cos = 0.0
    sin = 0.0
    if HAS_ROPE:
        cs_mask = offs_d < 2 * HALF
        cos = tl.load(cos_ptr + pos * stride_cos + offs_d % HALF, mask=cs_mask, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + pos * stride_sin + offs_d % HALF, mask=cs_mask, other=0.0).to(tl.float32)
    kt, vt = _load_kv(k_cache_ptr, v_cache_ptr, blk, tile_lo, kv_lo, kv_end, kv_head, offs_n, offs_d, d_valid,
                      stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch, BLOCK_SIZE, TILE_N)
    if PDL_PRELOAD:  # all of the above reads nothing the kernel before this one writes; q, k and v come from it
        pdl_begin(USE_PDL)
        q, q_partner, k_new, k_partner, v_new = _load_qkv(q_ptr, k_ptr, v_ptr, tok, head, kv_head, stride_qt,
                                                          stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                                                          offs_d, d_valid, io_mask, HALF, HAS_ROPE, WRITE_KV)
    q = _rope(q, q_partner, cos, sin, offs_d, HALF, HAS_ROPE).to(q_ptr.dtype.element_ty)  # [G_PAD, D_PAD]
    if WRITE_KV:  # the new token: rounded as the twin stores it, kept in registers for its tile
        k_new = _rope(k_new, k_partner, cos, sin, offs_d, HALF, HAS_ROPE)
        k_new = k_new.to(k_ptr.dtype.element_ty).to(k_cache_ptr.dtype.element_ty)
        v_new = v_new.to(v_cache_ptr.dtype.element_ty)
        last_tile = (seq_len - 1) // TILE_N
        owner = (slot >= 0) & (last_tile >= tile_lo) & (last_tile < tile_hi)  # one program stores it
        own_d = offs_d < tl.where(owner, HEAD_DIM, 0)  # (d_valid & owner: the interpreter's scalar & misbehaves)
        s_blk = tl.maximum(slot, 0) // BLOCK_SIZE
        s_off = tl.maximum(slot, 0) % BLOCK_SIZE
        tl.store(k_cache_ptr + s_blk * stride_kb + s_off * stride_ko + kv_head * stride_kch + offs_d, k_new,
                 mask=own_d)
        tl.store(v_cache_ptr + s_blk * stride_vb + s_off * stride_vo + kv_head * stride_vch + offs_d, v_new,
                 mask=own_d)
        new_pos = tl.where(slot >= 0, seq_len - 1, -1)  # slot < 0 (padding): the tile keeps what the cache holds

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, HEAD_DIM_PAD], tl.float32)
    for j in range(tile_lo, tile_hi):
        if PREFETCH:  # tile j + 1's K and V in flight during tile j's dots (two tiles in registers)
            kt_next, vt_next = _load_kv(k_cache_ptr, v_cache_ptr, blk_next, j + 1, kv_lo, kv_end, kv_head, offs_n,
                                        offs_d, d_valid, stride_kb, stride_ko, stride_kch, stride_vb, stride_vo,
                                        stride_vch, BLOCK_SIZE, TILE_N)
            blk_next = _tile_blocks(bt_row, j + 2, kv_lo, kv_end, offs_n, BLOCK_SIZE, TILE_N)
        m_i, l_i, acc = _attend_loaded(q, m_i, l_i, acc, kt, vt, j, kv_lo, kv_end, offs_n, new_pos, k_new, v_new,
                                       scale_log2, TILE_N, WRITE_KV, DOT_PREC)
        if PREFETCH:
            kt, vt = kt_next, vt_next
        else:
            kt, vt = _load_kv(k_cache_ptr, v_cache_ptr, blk_next, j + 1, kv_lo, kv_end, kv_head, offs_n, offs_d,
                              d_valid, stride_kb, stride_ko, stride_kch, stride_vb, stride_vo, stride_vch,
                              BLOCK_SIZE, TILE_N)
            blk_next = _tile_blocks(bt_row, j + 2, kv_lo, kv_end, offs_n, BLOCK_SIZE, TILE_N)
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
                head0 = seq.to(tl.int64) * num_heads + kv_head * QUERIES_PER_KV
                _merge_store(part_out_ptr, part_lse_ptr, head0, num_splits, n_eff,
                             out_ptr + tok * stride_ot + kv_head * QUERIES_PER_KV * stride_oh, stride_oh, offs_d,
                             d_valid, QUERIES_PER_KV, G_MERGE, HEAD_DIM_PAD, MERGE_CHUNK)
                tl.atomic_xchg(cnt, 0)  # back to 0 for the next launch (graph replays, the next layer)
    else:
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=io_mask)
# fmt: on


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
    tile_n, warps, prefetch = launch_shape(d_pad, num_seqs, k_cache.element_size())
    if num_splits is None:
        span = max_seq_len if window is None else min(max_seq_len, window + tile_n)
        num_splits = decode_num_splits(num_seqs, num_kv_heads, span, _num_sms(q.device), FUSED_MIN_TOKENS_PER_SPLIT)
    cnt = decode_counters(q.device, num_seqs * num_kv_heads) if num_splits > 1 else None
    num_splits = num_splits if cnt is not None else 1
    group = num_heads // num_kv_heads
    if num_splits > 1:
        part_out = torch.empty(num_seqs, num_heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = cnt = out  # unused
    use_pdl = pdl_enabled(q.device)
    merge_chunk = max(1, min(next_pow2(num_splits), MERGE_VALUES // (next_pow2(group) * d_pad)))  # splits a load
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
        G_MERGE=next_pow2(group), MERGE_CHUNK=merge_chunk,
        BLOCK_SIZE=block_size, TILE_N=tile_n, MIN_TILES=-(-FUSED_MIN_TOKENS_PER_SPLIT // tile_n),
        ONE_SPLIT_TILES=FUSED_ONE_SPLIT_TOKENS // tile_n,
        HAS_WINDOW=window is not None, WRITE_KV=write_kv, HAS_ROPE=rope is not None,
        MULTI_SPLIT=num_splits > 1, DOT_PREC=_dot_precision(q.dtype),
        PREFETCH=prefetch, USE_PDL=use_pdl, PDL_PRELOAD=use_pdl and preload_enabled(),
        num_warps=warps, **pdl_launch_kwargs(use_pdl),
    )
    # fmt: on
    return out
