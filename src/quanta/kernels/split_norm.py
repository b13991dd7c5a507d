"""Residual add + RMSNorm split across the two GEMVs around it (one-row decode; the launch of the norm between
them goes away).

The producer GEMV (o_proj, down_proj) ends with `add_norm_store`: h = y + residual (rounded as the fused add-norm
rounds it, stored as the new residual), xw = h * norm.weight (rounded to the dtype; in the int4 asm GEMV's x-planes
order when PLANES_SUB > 0, kernels/rms_norm.py's formula), and one partial sum of h^2 a program. The consumer GEMV
(qkv_proj, gate_up_proj) reads xw as its x, sums the partials (`inv_rms`: rsqrt(sum / K + eps), the same fp32
variance as the norm kernel) and scales its fp32 sums by it before its bias / SiLU epilogue: W (h * inv * w) =
inv * W (h * w). Numerics: Hugging Face rounds h * inv to the dtype, then multiplies by the weight; here h * w is
rounded once and inv applied in fp32 after the dot: the same error size (one rounding a value), not the same bits.

Twins: `split_norm_ref` (the producer's three outputs) and `inv_rms_ref`.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import tl, triton


# fmt: off
@triton.jit
def add_norm_store(out, offs_n, N, pid, b_ptr, r, w, h_ptr, xw_ptr, part_ptr, HAS_BIAS: tl.constexpr,
                   PLANES_SUB: tl.constexpr):
    """out [BN] fp32 sums of rows offs_n (masked past N); r, w: the residual and norm weight at offs_n (loaded
    early by the caller) -> h, xw and this program's partial sum of h^2 at part_ptr[pid]."""
    dt = h_ptr.dtype.element_ty
    mask = offs_n < N
    if HAS_BIAS:
        out += tl.load(b_ptr + offs_n, mask=mask, other=0.0).to(tl.float32)
    y = out.to(dt)  # the linear's output as it would be stored
    h = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
    tl.store(h_ptr + offs_n, h, mask=mask)
    hf = tl.where(mask, h.to(tl.float32), 0.0)
    tl.store(part_ptr + pid, tl.sum(hf * hf, axis=0))
    xw = (w.to(tl.float32) * hf).to(dt)
    pos = offs_n
    if PLANES_SUB > 0:
        i = offs_n % PLANES_SUB
        pos = offs_n - i + ((i % 4) * (PLANES_SUB // 8) + i // 8) * 2 + (i % 8) // 4
    tl.store(xw_ptr + pos, xw, mask=mask)


@triton.jit
def inv_rms(parts, k_norm, eps):
    """rsqrt(sum of the producer's partials (loaded, masked to 0) / k_norm + eps) (fp32 scalar)."""
    return tl.rsqrt(tl.sum(parts, axis=0) / k_norm + eps)
# fmt: on


def split_norm_ref(y: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, block_n: int,
                   bias: torch.Tensor | None = None):
    """What the producer stores for one row y [N] fp32 (its sums): (h, xw plain, partials [cdiv(N, block_n)])."""
    if bias is not None:
        y = y + bias.float()
    h = (y.to(residual.dtype).float() + residual.float()).to(residual.dtype)
    hf = h.float()
    pad = -hf.numel() % block_n
    parts = torch.nn.functional.pad(hf * hf, (0, pad)).view(-1, block_n).sum(1)
    return h, (weight.float() * hf).to(residual.dtype), parts


def inv_rms_ref(parts: torch.Tensor, k: int, eps: float) -> torch.Tensor:
    return torch.rsqrt(parts.float().sum() / k + eps)
