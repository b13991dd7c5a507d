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
    M, N, K, K_PAD,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y. Each K step reads a [BLOCK_N, BLOCK_K * BITS / 8] byte tile of W
    (contiguous along K) and one scale (and zero) per row: BLOCK_K divides GROUP. int4: the low nibbles hold
    the even k, the high ones the odd k, so x is read as its even and odd columns and two dots add up."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
        if HAS_ZERO:
            zf = tl.load(z_ptr + offs_n.to(tl.int64) * stride_zn + g, mask=mask_n, other=0).to(tl.float32)
        else:
            zf = tl.full((BLOCK_N,), 2 ** (BITS - 1), tl.float32)
        if BITS == 4:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes of this K step
            byte = tl.load(w_rows + offs_b[None, :], mask=mask_n[:, None], other=0).to(tl.int32)  # [BN, BK/2]
            lo = (((byte & 0xF).to(tl.float32) - zf[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            hi = (((byte >> 4).to(tl.float32) - zf[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            k_even = 2 * offs_b
            x_e = tl.load(x_rows + k_even[None, :], mask=mask_m[:, None] & (k_even[None, :] < K), other=0.0)
            x_o = tl.load(x_rows + k_even[None, :] + 1, mask=mask_m[:, None] & (k_even[None, :] + 1 < K), other=0.0)
            acc += tl.dot(x_e, tl.trans(lo))
            acc += tl.dot(x_o, tl.trans(hi))
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None], other=0).to(tl.float32)  # [BN, BK]
            w = ((q - zf[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
# fmt: on


def kernel_supports(bits: int, group_size: int) -> bool:
    """The kernel's K step must divide the group and give dots of >= 16 along K."""
    return bits in (4, 8) and group_size % (32 if bits == 4 else 16) == 0


def _blocks(m: int, group_size: int, bits: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps): skinny tiles for decode (GEMV-like), square ones for prefill."""
    bk = next(b for b in (128, 64, 32, 16) if group_size % b == 0 and (bits == 8 or b >= 32))
    if m <= 16:  # NOTE: narrow N tiles so a 4096-wide layer still spreads over ~128 programs (all SMs)
        return 16, 32, bk, 4
    if m <= 64:
        return 32, 64, min(bk, 64), 4
    return 64, 128, min(bk, 64), 8


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
    bm, bn, bk, warps = _blocks(m, group_size, bits)
    k_pad = packed.shape[1] * 8 // bits
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    # fmt: off
    _w_int_gemm_kernel[grid](
        x2, packed, scale, zero if zero is not None else scale, bias if bias is not None else scale, y,
        m, n, k, k_pad,
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
