"""Dispatch for the small fused ops: Triton kernels on CUDA, PyTorch references elsewhere.

The choice is made once per process (`set_use_kernels`); model code calls these functions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta.layers.norm import rms_norm_ref

_USE_KERNELS = False


def set_use_kernels(flag: bool) -> None:
    global _USE_KERNELS
    _USE_KERNELS = flag


def use_kernels() -> bool:
    return _USE_KERNELS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _USE_KERNELS and x.is_cuda:
        from quanta.kernels.rms_norm import rms_norm as k

        return k(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _USE_KERNELS and x.is_cuda:
        from quanta.kernels.rms_norm import fused_add_rms_norm as k

        return k(x, residual, weight, eps)
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, vocab] -> (argmax ids [R] int64, their log-probabilities [R] float32)."""
    if _USE_KERNELS and logits.is_cuda:
        from quanta.kernels.greedy import greedy_sample_fused

        return greedy_sample_fused(logits)
    from quanta.sampling.sampler import greedy_sample as ref

    return ref(logits.float())


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    if _USE_KERNELS and x.is_cuda:
        from quanta.kernels.activation import silu_and_mul as k

        return k(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
