"""RMSNorm and fused residual-add + RMSNorm with Hugging Face LlamaRMSNorm numerics.

HF: variance in float32, `hidden * rsqrt(var + eps)` in float32, then `weight * hidden.to(input_dtype)`.
The kernels multiply by the weight in float32 and round once: for weight.dtype == input dtype that is the
same number (a product of two fp16/bf16 values is exact in float32).
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.pdl import pdl_begin, pdl_enabled, pdl_launch_kwargs


@triton.jit
def frag_offsets(row, cols, GROUP: tl.constexpr):
    """16-bit offsets of x[row, cols] (row < 16) in the int4 mma GEMV's fragment order (w_int_mma.x_frag)."""
    wd = cols // 2
    rem = wd % (GROUP // 2)
    lane = 4 * (row % 8) + (rem % 16) // 4
    half = (wd // (GROUP // 2)) * (GROUP // 64) + rem // 32
    word = (((half * 2 + row // 8) * 2 + (rem % 32) // 16) * 32 + lane) * 4 + rem % 4
    return word * 2 + cols % 2


# fmt: off
@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x, stride_res, stride_out, stride_res_out,
    n_cols, eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr = False,
    planes_ptr=None, PLANES_SUB: tl.constexpr = 0,
    frag_ptr=None, FRAG_GROUP: tl.constexpr = 0,
):
    pdl_begin(USE_PDL)  # kernels/pdl.py: under PDL, wait for the kernel before this one
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n_cols
    h = (xf * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    y = w.to(tl.float32) * h.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if PLANES_SUB > 0:  # y again in the int4 asm GEMV's x_planes order (w_int_gemv_asm.x_planes), row-contiguous
        i = offs % PLANES_SUB
        pos = offs - i + ((i % 4) * (PLANES_SUB // 8) + i // 8) * 2 + (i % 8) // 4
        tl.store(planes_ptr + row * n_cols + pos, y.to(out_ptr.dtype.element_ty), mask=mask)
    if FRAG_GROUP > 0:  # y again in the int4 mma GEMV's fragment order (rows < 16)
        tl.store(frag_ptr + frag_offsets(row, offs, FRAG_GROUP), y.to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, planes_sub: int = 0,
            frag_group: int = 0):
    require_triton()
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x2)
    res2 = residual.reshape(-1, hidden) if residual is not None else x2
    res_out = torch.empty_like(x2) if residual is not None else out
    planes = torch.empty_like(x2) if planes_sub else None
    frag = torch.empty(16 * hidden, dtype=x2.dtype, device=x2.device) if frag_group else None  # rows >= M: unset
    num_rows = x2.shape[0]
    if num_rows > 0:
        block_n = next_pow2(hidden)
        use_pdl = pdl_enabled(x.device)
        # fmt: off
        _rms_norm_kernel[(num_rows,)](
            x2, res2, weight, out, res_out,
            x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK_N=block_n,
            USE_PDL=use_pdl,
            planes_ptr=planes, PLANES_SUB=planes_sub, frag_ptr=frag, FRAG_GROUP=frag_group,
            num_warps=min(max(block_n // 512, 1), 16), **pdl_launch_kwargs(use_pdl),
        )
        # fmt: on
    if planes_sub:
        return out.view(x.shape), res_out.view(x.shape), planes
    if frag_group:
        shape = (hidden // frag_group, frag_group // 64, 2, 2, 32, 4)
        return out.view(x.shape), res_out.view(x.shape), frag.view(torch.int32).view(shape)
    return out.view(x.shape), res_out.view(x.shape)


def rms_norm(
    x: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> torch.Tensor:  # [..., hidden], x.dtype
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor,  # [..., hidden]
    residual: torch.Tensor,  # [..., hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # (normed, new_residual = x + residual), both x.dtype
    return _launch(x, residual, weight, eps)


def fused_add_rms_norm_planes(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                              sub: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm, plus the normed rows in the int4 asm GEMV's x_planes order ([rows, hidden], x.dtype; its
    int32 view is w_int_gemv_asm.x_planes of each row for chunks of `sub` values): one launch for both."""
    assert x.shape[-1] % sub == 0 and sub % 8 == 0
    return _launch(x, residual, weight, eps, sub)


def fused_add_rms_norm_frag(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fused_add_rms_norm, plus the normed rows (<= 16) in the int4 mma GEMV's fragment order (w_int_mma.x_frag for
    groups of `group`; rows past x's are left unset: they only feed unstored columns): one launch for both."""
    assert x.numel() // x.shape[-1] <= 16 and x.shape[-1] % group == 0 and group % 64 == 0
    return _launch(x, residual, weight, eps, frag_group=group)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    var = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(var + eps)
    return (weight * h.to(dtype)).to(dtype)


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    new_residual = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_ref(new_residual, weight, eps), new_residual
