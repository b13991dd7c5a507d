"""Weight-only int GEMV for one row (W4A16 / W8A16 batch-1 decode), reading the packed weight as int32 words.

`_w_int_gemv_kernel`'s broadcast path (w_int_kernel.py) loads the packed weight byte by byte and spends ~8
instructions per weight (widening each byte, splitting nibbles, two products and a reduction): at one row it is
bound by instruction issue, not by HBM (25-48% of copy bandwidth on H100, 8B shapes). Here a K step loads
[BLOCK_N, BLOCK_K / VPW] int32 words (VPW = 32 / BITS values a word; quanta's layout puts value k of a row at
nibble / byte k % VPW of word k // VPW, little-endian), and value i of every word becomes a float with a shift and
one AND-OR (the magic-mantissa trick):

    f_i = float_bits(((word << (23 - BITS - BITS * i)) & MANT) | 0x3F800000) = 1 + q_i / 2^BITS  (exact)

then one FMA with x[k]: ~3 instructions per weight. As in the byte kernel, zero point and scale come once per
(row, group chunk):  sum_k x_k (q_k - z) = 2^BITS * sum_k x_k f_k - (2^BITS + z) * sum_k x_k,  times the scale.
x is read with stride VPW per value index (a few KiB, from L1 / L2), its per-chunk sums shared by the rows.

Same grid, split-K epilogue and CUDA-graph safety as kernels/gemv.py. The twin is w_int_kernel.w_int_linear_ref.

MEASURED SLOWER, so OFF by default (env QUANTA_INT_GEMV_WORDS=1 turns it on; it then wants the GEMV config
bn16_bk512_sk0_w2_s3 or bn64_bk256_sk0_w4_s3): H100, 8B shapes at one row (benchmarks/bench_int_gemv.py,
benchmarks/results/h100_s4_int_gemv_8b.json) qkv 16.4-20.4 us vs 13.5 for the byte kernel, gate_up 47.0 vs 43.6,
down 28.0 vs 25.8. Fewer instructions per weight did not make it faster: the byte kernel is not issue-bound there.
"""

from __future__ import annotations

import os

import torch

from quanta.kernels._compat import tl, triton
from quanta.kernels.gemv import gemv_epilogue

WORDS_ENABLED = os.environ.get("QUANTA_INT_GEMV_WORDS", "0") == "1"


def words_ok(bits: int, packed: torch.Tensor, m: int, sub: int, half_dot: bool, even_k: bool) -> bool:
    """The word kernel takes this launch: one row (at 2 its SASS per weight doubles or spills, at 4 it spills), no
    tl.dot path, whole K steps (masked loads cost ~2.5x the instructions), rows of whole aligned words."""
    vpw = 32 // bits
    return (
        WORDS_ENABLED
        and not half_dot
        and m == 1
        and even_k
        and packed.shape[1] % 4 == 0
        and packed.stride(0) % 4 == 0
        and packed.storage_offset() % 4 == 0
        and sub % vpw == 0
    )


def as_words(packed: torch.Tensor) -> torch.Tensor:
    """[N, K_pad * BITS / 8] uint8 -> the same bytes as [N, K_pad * BITS / 32] int32 (no copy)."""
    return packed.view(torch.int32)


# fmt: off
@triton.jit
def _w_int_gemv_words_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_PAD, K_SPLIT, num_splits,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, SUB: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr, NUM_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr = False,
):
    """Program (pid_n, pid_k): BLOCK_N rows over K range [pid_k * K_SPLIT, +K_SPLIT) (whole steps of BLOCK_K
    values); w_ptr / stride_wn in int32 words. A step is [BLOCK_N, NG, WPG] words (NG chunks of SUB values: the
    group, or BLOCK_K when the group is wider; WPG words a chunk) against x as [NG, WPG, VPW]. Scale and zero
    are applied per (row, chunk, word) and everything is summed once after the loop: no reduction across threads
    inside it."""
    VPW: tl.constexpr = 32 // BITS  # values per word
    NG: tl.constexpr = BLOCK_K // SUB
    WPG: tl.constexpr = SUB // VPW
    QS: tl.constexpr = 1 << BITS
    MANT: tl.constexpr = ((1 << BITS) - 1) << (23 - BITS)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked
    offs_g = tl.arange(0, NG)
    word = offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG]: step-relative word index
    w_rows = w_ptr + rows[:, None, None] * stride_wn  # [BN, 1, 1]
    s_rows = s_ptr + rows[:, None, None] * stride_sn
    z_rows = z_ptr + rows[:, None, None] * stride_zn
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K_PAD)
    acc = tl.zeros((BLOCK_M, BLOCK_N, NG, WPG), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ww = k0 // VPW + word
        kg = (k0 + offs_g * SUB)[None, :, None]  # [1, NG, 1]
        if EVEN_K:  # every step is whole and K == K_PAD: no masks
            q = tl.load(w_rows + ww[None, :, :])  # [BN, NG, WPG] int32
            s = tl.load(s_rows + kg // GROUP).to(tl.float32)  # [BN, NG, 1]
        else:
            q = tl.load(w_rows + ww[None, :, :], mask=ww[None, :, :] < K_PAD // VPW, other=0)
            s = tl.load(s_rows + kg // GROUP, mask=kg < K_PAD, other=0.0).to(tl.float32)
        if HAS_ZERO:
            zq = tl.load(z_rows + kg // GROUP, mask=kg < K_PAD, other=0).to(tl.float32) + QS
        else:
            zq = tl.full((BLOCK_N, NG, 1), 2 ** (BITS - 1) + QS, tl.float32)
        kx = k0 + word * VPW  # [NG, WPG]: k of each word's value 0
        for m in tl.static_range(NUM_M):
            part = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)
            xs = tl.zeros((NG, WPG), dtype=tl.float32)
            for i in tl.static_range(VPW):
                # value i as 1 + q_i / QS: its bits moved to the top of the mantissa of 1.0 (constexpr shifts)
                if 23 - BITS - BITS * i >= 0:
                    f = ((q << (23 - BITS - BITS * i)) & MANT) | 0x3F800000
                else:
                    f = ((q >> (BITS * i + BITS - 23)) & MANT) | 0x3F800000
                if EVEN_K:
                    xi = tl.load(x_ptr + m * stride_xm + kx + i).to(tl.float32)
                else:
                    xi = tl.load(x_ptr + m * stride_xm + kx + i, mask=kx + i < K, other=0.0).to(tl.float32)
                part += f.to(tl.float32, bitcast=True) * xi[None, :, :]
                xs += xi
            val = (part * QS - zq * xs[None, :, :]) * s  # per (row, chunk, word): no reduction in the loop
            acc += tl.where(offs_m[:, None, None, None] == m, val[None, :, :, :], 0.0)
    out = tl.sum(tl.sum(acc, axis=3), axis=2)  # [BLOCK_M, BLOCK_N]
    gemv_epilogue(out, offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr,
                  HAS_BIAS, USE_SPLIT)
# fmt: on
