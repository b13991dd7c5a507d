"""Activation quantization to FP8 (e4m3) for torch._scaled_mm, one kernel instead of four or eight.

- static (per tensor): q = sat(x / s) with a calibrated scale s;
- dynamic (per token): s_t = max|x_t| / 448, q_t = sat(x_t / s_t).

The output has `rows_pad` rows (a multiple of 16, as _scaled_mm wants): padding rows are written as zeros
(scale 1), so no separate pad. `*_ref` twins: quanta.quantization.int_quant.to_fp8 / quant_fp8_per_token.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton

FP8_MAX = 448.0


# fmt: off
@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, s_ptr, out_s_ptr, M, K, stride_x, stride_q,
                      DYNAMIC: tl.constexpr, BLOCK_K: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    live = row < M
    x = tl.load(x_ptr + row.to(tl.int64) * stride_x + offs, mask=mask & live, other=0.0).to(tl.float32)
    if DYNAMIC:
        s = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / 448.0
        s = tl.where(live, s, 1.0)
        tl.store(out_s_ptr + row, s)
    else:
        s = tl.load(s_ptr).to(tl.float32)
    q = tl.minimum(tl.maximum(x / s, -448.0), 448.0)
    tl.store(q_ptr + row.to(tl.int64) * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
# fmt: on


def quant_fp8(x: torch.Tensor, scale: torch.Tensor | None, rows_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [rows_pad, K] float8_e4m3fn, scale: the given one, or per token [rows_pad, 1] float32)."""
    require_triton()
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(rows_pad, k, dtype=torch.float8_e4m3fn, device=x.device)
    dynamic = scale is None
    out_s = torch.empty(rows_pad, 1, dtype=torch.float32, device=x.device) if dynamic else scale
    block = next_pow2(k)
    warps = 4 if block <= 4096 else 8
    _fp8_quant_kernel[(rows_pad,)](x, q, scale if scale is not None else out_s, out_s, m, k, x.stride(0), q.stride(0),
                                   DYNAMIC=dynamic, BLOCK_K=block, num_warps=warps)
    return q, out_s
