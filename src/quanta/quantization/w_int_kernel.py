"""Weight-only integer GEMM / GEMV (W4A16, W8A16): y = x @ dequant(W)^T (+ b), dequantizing tiles of W in
registers, so the weight is read from memory in its packed form (0.5 or 1 byte per value).

Reads quanta's canonical layout directly (int_quant.py): weight_packed [N, K_pad * bits / 8] uint8 (int4: low
nibble = even k), weight_scale [N, G], weight_zero_point [N, G] uint8 or none (symmetric: 2^(bits-1)).
`w_int_linear_ref` is its PyTorch twin (dequantize, then matmul): what the CPU runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta.kernels._compat import require_triton, tl, triton
from quanta.quantization.int_quant import dequantize_groups, unpack_int4


# fmt: off
@triton.jit
def _w_int_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)  # [BM, BK]
        wmask = mask_k[:, None] & mask_n[None, :]
        w_rows = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn
        if BITS == 4:
            byte = tl.load(w_rows + (offs_k[:, None] // 2), mask=wmask, other=0).to(tl.int32)  # [BK, BN]
            q = (byte >> ((offs_k[:, None] % 2) * 4)) & 0xF
        else:
            q = tl.load(w_rows + offs_k[:, None], mask=wmask, other=0).to(tl.int32)
        g = offs_k // GROUP
        s = tl.load(s_ptr + offs_n[None, :].to(tl.int64) * stride_sn + g[:, None], mask=wmask, other=0.0)
        if HAS_ZERO:
            z = tl.load(z_ptr + offs_n[None, :].to(tl.int64) * stride_zn + g[:, None], mask=wmask, other=0)
            zf = z.to(tl.float32)
        else:
            zf = 2.0 ** (BITS - 1)
        w = ((q.to(tl.float32) - zf) * s.to(tl.float32)).to(x.dtype)  # [BK, BN]
        acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
# fmt: on


def _blocks(m: int, group_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): skinny tiles for decode (GEMV), square ones for prefill."""
    bk = 64 if group_size % 64 == 0 else 32 if group_size % 32 == 0 else 16
    if m <= 16:
        return 16, 64, max(bk, 64) if group_size % 128 == 0 else bk, 4
    if m <= 64:
        return 32, 64, bk, 4
    return 64, 128, bk, 8


def w_int_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T (+ bias) -> [..., N] in x.dtype (Triton)."""
    require_triton()
    k, n = in_features, packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bm, bn, bk, warps = _blocks(m, group_size)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    # fmt: off
    _w_int_gemm_kernel[grid](
        x2, packed, scale, zero if zero is not None else scale, bias if bias is not None else scale, y,
        m, n, k,
        x2.stride(0), packed.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0, y.stride(0),
        GROUP=group_size, BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
    )
    # fmt: on
    return y.reshape(*x.shape[:-1], n)


def w_int_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    q = unpack_int4(packed) if bits == 4 else packed
    w = dequantize_groups(q, scale, zero, bits, group_size, in_features, x.dtype)
    return F.linear(x, w, bias)
