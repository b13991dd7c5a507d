"""RMSNorm with an optional fused residual add (Triton on GPU, PyTorch reference elsewhere)."""

from __future__ import annotations

import torch
from torch import nn


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # x: [T, hidden]; with residual, returns (norm(x + residual), x + residual)
        from quanta.layers import fast_ops

        if residual is None:
            return fast_ops.rms_norm(x, self.weight, self.eps)
        return fast_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
