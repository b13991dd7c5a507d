"""int4 GEMV on the tensor cores from int32 words (W4A16 decode, 1 - 16 rows; issue 6), config suffix "_dotw".

y^T = W x^T as in w_int_gemv_t.py (swap-AB: the weight tile [BLOCK_N, BLOCK_K] is the left tl.dot operand, x^T
[BLOCK_K, 16] the right one, rows past M zero), but the tile is made from 128-bit loads of int32 words and one
`tl.inline_asm_elementwise` call per word that turns its 8 nibbles into q - z as x.dtype halves:

    t_j = (word >> 4j) & 0x000F000F | MAGIC      j = 0..3: (OFFSET + q_j, OFFSET + q_{j+4}), exact
    t_j = t_j * 1 - (OFFSET + z)                  half2 FMA: q - z, exact
    out_{2j} = t_j.lo, out_{2j+1} = t_j.hi       (bf16: MAGIC 0x4300, OFFSET 128; fp16: 0x6400, 1024)

11 instructions a word (1.4 a weight), no per-weight scale. The tile's column 2j + h holds k = j + 4h of its
8-value word, so x is loaded in the same order (a gather within each 8 values), and the dot sums the same
products. A K step lies in one group (BLOCK_K <= group), so the scale goes once per (row, step) after the dot
(fp32 accumulation of exact products). (Leaving z out of the tile and subtracting (OFFSET + z) * sum(x) after the
dot needs a cross-thread sum of x every step: more instructions than the FMAs, measured offline.)

Same grid, split-K epilogue and CUDA-graph safety as kernels/gemv.py; the twin is w_int_kernel.w_int_linear_ref.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import tl, triton
from quanta.kernels.gemv import gemv_epilogue

_PTX = """{
.reg .b32 t0, t1, t2, t3, s, one;
mov.b32 one, ONE;
lop3.b32 t0, $8, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $8, 4;
lop3.b32 t1, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $8, 8;
lop3.b32 t2, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $8, 12;
lop3.b32 t3, s, 0x000F000F, MAGIC, 0xEA;
fma.rn.T t0, t0, one, $9;
fma.rn.T t1, t1, one, $9;
fma.rn.T t2, t2, one, $9;
fma.rn.T t3, t3, one, $9;
mov.b32 {$0, $1}, t0;
mov.b32 {$2, $3}, t1;
mov.b32 {$4, $5}, t2;
mov.b32 {$6, $7}, t3;
}"""
# x.dtype: (MAGIC as half2 bits, the 16-bit magic, 1.0 as half2 bits, PTX half2 type)
_TYPES = {torch.bfloat16: (0x43004300, 0x4300, 0x3F803F80, "bf16x2"),
          torch.float16: (0x64006400, 0x6400, 0x3C003C00, "f16x2")}


def mma_ok(bits: int, x: torch.Tensor, packed: torch.Tensor, group: int, block_k: int, even_k: bool) -> bool:
    """The word tensor-core kernel takes this launch: int4, fp16 / bf16 on CUDA, whole K steps inside one group,
    aligned words."""
    return (bits == 4 and x.dtype in _TYPES and x.is_cuda and even_k and group % block_k == 0 and block_k >= 16
            and packed.stride(0) % 16 == 0 and packed.storage_offset() % 16 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def ptx(dtype: torch.dtype) -> str:
    magic, _, one, t = _TYPES[dtype]
    return _PTX.replace("MAGIC", f"0x{magic:08X}").replace("ONE", f"0x{one:08X}").replace(".T ", f".{t} ")


def magic16(dtype: torch.dtype) -> int:
    return _TYPES[dtype][1]


# fmt: off
@triton.jit
def _w_int_gemv_mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_PAD, K_SPLIT, num_splits,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
    PTX: tl.constexpr, MAGIC16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (pid_n, pid_k): BLOCK_N rows over K range [pid_k * K_SPLIT, +K_SPLIT) (whole steps of BLOCK_K
    values inside one group, K == K_PAD); w_ptr / stride_wn in int32 words."""
    WS: tl.constexpr = BLOCK_K // 8  # words of a row a step
    dt = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked
    offs_w = tl.arange(0, WS)
    p = tl.arange(0, BLOCK_K)
    perm = (p // 8) * 8 + (p % 8) // 2 + 4 * (p % 2)  # tile column p holds k = perm(p) of the step
    w_rows = w_ptr + rows[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    m_ok = offs_m[:, None] < M
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K_PAD)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # y^T
    for k0 in range(k_lo, k_hi, BLOCK_K):
        q = tl.load(w_rows + (tl.multiple_of(k0 // 8, 2) + offs_w)[None, :])  # [BN, WS] int32
        x = tl.load(x_rows + (k0 + perm)[None, :], mask=m_ok, other=0.0)  # [BM, BK], columns in tile order
        g = k0 // GROUP
        s = tl.load(s_ptr + rows * stride_sn + g).to(tl.float32)
        if HAS_ZERO:
            z = tl.load(z_ptr + rows * stride_zn + g).to(tl.int32)
        else:
            z = tl.full((BLOCK_N,), 8, tl.int32)
        nz = (MAGIC16 | z) ^ 0x8000  # -(OFFSET + z) as half bits
        nz = tl.broadcast_to((nz | (nz << 16))[:, None], (BLOCK_N, WS))
        h0, h1, h2, h3, h4, h5, h6, h7 = tl.inline_asm_elementwise(
            PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [q, nz], dtype=(dt, dt, dt, dt, dt, dt, dt, dt), is_pure=True,
            pack=1)
        # [BN, WS, 4 (j), 2 (h)] by in-thread joins: join(join(a, c), join(b, d)) is a, b, c, d along [2, 2]
        lo = tl.reshape(tl.join(tl.join(h0, h4), tl.join(h2, h6)), (BLOCK_N, WS, 4))
        hi = tl.reshape(tl.join(tl.join(h1, h5), tl.join(h3, h7)), (BLOCK_N, WS, 4))
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, BLOCK_K))  # q - z, exact in x.dtype
        acc += tl.dot(w, tl.trans(x)) * s[:, None]  # [BN, BM]
    gemv_epilogue(tl.trans(acc), offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr,
                  cnt_ptr, HAS_BIAS, USE_SPLIT)
# fmt: on
