"""Swap-AB weight-only int GEMV (W4A16 / W8A16 decode, M <= 16; issue 6): y^T = dequant(W) @ x^T.

The `_dot` path of `_w_int_gemv_kernel` (w_int_kernel.py) dots x [16, BK] with the dequantized weight as the
right operand; here the weight tile [BLOCK_N, BK] is the LEFT operand (on Hopper, wgmma can read A from
registers, where the tile is dequantized) and x^T [BK, 16] the right one: acc [BLOCK_N, 16] += W_tile @ x^T,
transposed at the end for the shared split-K epilogue (`gemv_epilogue`, [BLOCK_M, BLOCK_N] tiles).

When a K step lies in one group (BLOCK_K divides the group: NG == 1) the scale goes AFTER the dot, once per
[BLOCK_N, 16] partial instead of once per weight, and the weight tile holds integer values:
- `_dott` (OFFSET_BITS = 0): q - z exactly, as (q | 0x4B000000) - (2^23 + z) in fp32 bits, then x.dtype
  (|q - z| <= 255: exact in fp16 and bf16);
- `_dotto` (OFFSET_BITS > 0): no fp32 arithmetic per weight: the x.dtype bits OFFSET_BITS | q are OFFSET + q
  (bf16 0x4300 = 128, int4 only; fp16 0x6400 = 1024, int4 / int8), minus OFFSET + z in x.dtype (a packed
  half2 / bf16x2 subtract for two weights): q - z, exact as well.
Static SASS of the K loop (sm_90, bf16, int4 g128, M = 16; instructions / weight, compiled offline, not timed):
`_dot` bn64_bk128_w4 7.5 (bn32_bk512, the default, 8.2); `_dott` bn64_bk128_w4 5.7, bn128_bk128_w4 4.8;
`_dotto` 5.3 / 4.4. The weight tile is a register-A wgmma operand (HGMMA 64x16x16); what is left per byte:
one LDS.U8 (the tile reaches the A-fragment layout through shared memory a byte at a time), nibble split and
pack, the half2 subtract. Keeping up with an H200's HBM needs roughly 3.5 - 4 / weight (issue-bound estimate).
BLOCK_K wider than the group (NG > 1): (q - z) * s per weight before the dot, as the `_dot` path does.
int4: low nibble = even k, high = odd k; the two [BLOCK_N, BK / 2] halves are interleaved (tl.join) back into
k order, so one dot takes the tile and x needs no even / odd split.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import tl, triton
from quanta.kernels.gemv import gemv_epilogue
from quanta.kernels.pdl import pdl_begin


# fmt: off
@triton.jit
def _t_step(acc, q, k0, x_rows, offs_m, offs_x, rows, s_ptr, z_ptr, M, K, K_PAD, stride_sn, stride_zn,
            GROUP: tl.constexpr, SUB: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
            OFFSET_BITS: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc [BN, 16] += the K step at k0 of the weight bytes q [BN, KB] (int32) times x^T."""
    NG: tl.constexpr = BLOCK_K // SUB
    CB: tl.constexpr = SUB * BITS // 8  # bytes of one chunk of one row
    dt = x_rows.dtype.element_ty
    kx = k0 + offs_x
    x = tl.load(x_rows + kx[None, :], mask=(offs_m[:, None] < M) & (kx[None, :] < K), other=0.0)  # [BM, BK]
    if NG == 1:  # the step lies in one group (k0 < K_PAD): one scale / zero per row
        g = k0 // GROUP
        s = tl.load(s_ptr + rows * stride_sn + g).to(tl.float32)  # [BN]
        if HAS_ZERO:
            z = tl.load(z_ptr + rows * stride_zn + g).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 2 ** (BITS - 1), tl.float32)
        if OFFSET_BITS > 0:  # OFFSET + q straight from the bits, minus OFFSET + z in x.dtype (half2 ops)
            if BITS == 4:
                lo = ((q & 0xF) | OFFSET_BITS).to(tl.int16).to(dt, bitcast=True)  # even k
                hi = ((q >> 4) | OFFSET_BITS).to(tl.int16).to(dt, bitcast=True)  # odd k
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))
            else:
                w = (q | OFFSET_BITS).to(tl.int16).to(dt, bitcast=True)
            part = tl.dot(w - (z + OFFSET).to(dt)[:, None], tl.trans(x))
        else:  # q - z exactly (integer-valued in x.dtype)
            zb = z + 8388608.0
            if BITS == 4:
                lo = ((q & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, None]
                hi = ((q >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, None]
                w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(dt)
            else:
                w = ((q | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, None]).to(dt)
            part = tl.dot(w, tl.trans(x))
        acc += part * s[:, None]
    else:  # NG groups a step: (q - z) * s per weight, as the `_dot` path
        q3 = tl.reshape(q, (BLOCK_N, NG, CB))
        kg = k0 + tl.arange(0, NG) * SUB
        gidx = kg // GROUP
        s3 = tl.load(s_ptr + rows[:, None] * stride_sn + gidx[None, :], mask=kg[None, :] < K_PAD, other=0.0)
        s3 = s3.to(tl.float32)[:, :, None]  # [BN, NG, 1]
        if HAS_ZERO:
            z3 = tl.load(z_ptr + rows[:, None] * stride_zn + gidx[None, :], mask=kg[None, :] < K_PAD, other=0)
            zb3 = z3.to(tl.float32)[:, :, None] + 8388608.0
        else:
            zb3 = tl.full((BLOCK_N, NG, 1), 2 ** (BITS - 1) + 8388608.0, tl.float32)
        if BITS == 4:
            lo = (((q3 & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zb3) * s3
            hi = (((q3 >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - zb3) * s3
            w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K)).to(dt)
        else:
            w = tl.reshape(((q3 | 0x4B000000).to(tl.float32, bitcast=True) - zb3) * s3, (BLOCK_N, BLOCK_K))
            w = w.to(dt)
        acc += tl.dot(w, tl.trans(x))
    return acc


@triton.jit
def _w_int_gemv_t_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_PAD, K_SPLIT, num_splits,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, SUB: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr, OFFSET_BITS: tl.constexpr, OFFSET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False, PRELOAD: tl.constexpr = False,
):
    """Program (pid_n, pid_k): BLOCK_N packed rows over K range [pid_k * K_SPLIT, +K_SPLIT) (whole steps), as
    `_w_int_gemv_kernel`; SUB = the group (NG = BLOCK_K / SUB chunks a step) or BLOCK_K (dividing the group).
    PRELOAD (PDL): the first step's weight bytes load before the wait; that step runs before the loop."""
    KB: tl.constexpr = BLOCK_K * BITS // 8  # bytes of one row per step
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked
    offs_b = tl.arange(0, KB)
    offs_x = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K_PAD)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    if PRELOAD:  # PDL: the first step's weight bytes in flight before the wait (kernels/pdl.py)
        bb = k_lo * BITS // 8 + offs_b
        q0 = tl.load(w_rows + bb[None, :], mask=bb[None, :] < K_PAD * BITS // 8, other=0).to(tl.int32)
    pdl_begin(USE_PDL)
    k_start = k_lo
    if PRELOAD:
        acc = _t_step(acc, q0, k_lo, x_rows, offs_m, offs_x, rows, s_ptr, z_ptr, M, K, K_PAD, stride_sn, stride_zn,
                      GROUP, SUB, BITS, HAS_ZERO, OFFSET_BITS, OFFSET, BLOCK_N, BLOCK_K)
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        bb = k0 * BITS // 8 + offs_b
        q = tl.load(w_rows + bb[None, :], mask=bb[None, :] < K_PAD * BITS // 8, other=0).to(tl.int32)  # [BN, KB]
        acc = _t_step(acc, q, k0, x_rows, offs_m, offs_x, rows, s_ptr, z_ptr, M, K, K_PAD, stride_sn, stride_zn,
                      GROUP, SUB, BITS, HAS_ZERO, OFFSET_BITS, OFFSET, BLOCK_N, BLOCK_K)
    gemv_epilogue(tl.trans(acc), offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr,
                  cnt_ptr, HAS_BIAS, USE_SPLIT)
# fmt: on


def offset_bits(dtype: torch.dtype, bits: int) -> tuple[int, float]:
    """(OFFSET_BITS, OFFSET) of the `_dotto` weights in `dtype`; (0, 0.0) where OFFSET + q does not fit exactly
    (bf16 int8: 7 mantissa bits), and the `_dott` arithmetic runs instead."""
    if dtype == torch.float16:
        return 0x6400, 1024.0
    if dtype == torch.bfloat16 and bits == 4:
        return 0x4300, 128.0
    return 0, 0.0
