"""SiLU-and-mul (the SwiGLU MLP's gate): out = silu(x[:, :I]) * x[:, I:], Hugging Face order."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.pdl import pdl_begin, pdl_enabled, pdl_launch_kwargs
from quanta.kernels.rms_norm import frag_offsets


# fmt: off
@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr,
    stride_x, stride_out, inter,
    BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False,
    frag_ptr=None, FRAG_GROUP: tl.constexpr = 0,
):
    pdl_begin(USE_PDL)  # kernels/pdl.py: nothing to read before the wait, but the next kernel may launch early
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
    if FRAG_GROUP > 0:  # y again in the int4 mma GEMV's fragment order (rows < 16; kernels/rms_norm.frag_offsets)
        tl.store(frag_ptr + frag_offsets(row, offs, FRAG_GROUP), y.to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on


def silu_and_mul(x: torch.Tensor, frag_group: int = 0):  # x: [..., 2 * inter] -> [..., inter]
    """SiLU(gate) * up; frag_group > 0 (<= 16 rows): also the result in the int4 mma GEMV's fragment order
    (w_int_mma.x_frag, rows past x's unset), returned second."""
    require_triton()
    inter = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * inter)
    assert x2.stride(-1) == 1
    out = torch.empty(x2.shape[0], inter, dtype=x.dtype, device=x.device)
    frag = None
    if frag_group:
        assert x2.shape[0] <= 16 and inter % frag_group == 0 and frag_group % 64 == 0
        frag = torch.empty(16 * inter, dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        block = min(next_pow2(inter), 1024)
        grid = (x2.shape[0], triton.cdiv(inter, block))
        use_pdl = pdl_enabled(x.device)
        _silu_and_mul_kernel[grid](x2, out, x2.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4,
                                   USE_PDL=use_pdl, frag_ptr=frag, FRAG_GROUP=frag_group, **pdl_launch_kwargs(use_pdl))
    if frag_group:
        shape = (inter // frag_group, frag_group // 64, 2, 2, 32, 4)
        return out.view(*x.shape[:-1], inter), frag.view(torch.int32).view(shape)
    return out.view(*x.shape[:-1], inter)


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    inter = x.shape[-1] // 2
    xf = x.float()
    return (F.silu(xf[..., :inter]) * xf[..., inter:]).to(x.dtype)
