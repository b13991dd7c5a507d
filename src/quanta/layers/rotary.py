"""Rotary position embedding (HF rotate_half layout) with default / linear / llama3 / yarn-free scaling."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

_INV_FREQ: dict[str, Callable[[torch.Tensor, dict], torch.Tensor]] = {}


def _register(name: str):
    def deco(fn):
        _INV_FREQ[name] = fn
        return fn

    return deco


@_register("default")
def _default(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    return inv_freq


@_register("linear")
def _linear(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    return inv_freq / float(params["factor"])


@_register("llama3")
def _llama3(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_len = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_params(config) -> tuple[float, dict]:
    """(theta, scaling dict) from a transformers 4.x (rope_theta/rope_scaling) or 5.x (rope_parameters) config."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return theta, params


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict):
        super().__init__()
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in _INV_FREQ:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {sorted(_INV_FREQ)}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = _INV_FREQ[rope_type](inv_freq, scaling)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [max_pos, head_dim/2]
        self.head_dim = head_dim
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)

    def fusable(self, q: torch.Tensor) -> bool:
        """The Triton kernels run (CUDA) and the rotation covers the whole head (the fused cache write's case)."""
        from quanta.layers import fast_ops

        return fast_ops.use_kernels() and q.is_cuda and 2 * self.cos_cache.shape[-1] == self.head_dim

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T]; q: [T, H, D]; k: [T, KH, D]
        from quanta.layers import fast_ops

        if fast_ops.use_kernels() and q.is_cuda:
            from quanta.kernels.rotary import apply_rotary_emb

            return apply_rotary_emb(q, k, positions, self.cos_cache, self.sin_cache)
        return apply_rotary_ref(q, k, positions, self.cos_cache, self.sin_cache)


def apply_rotary_ref(q, k, positions, cos_cache, sin_cache):
    cos = cos_cache[positions].unsqueeze(1)  # [T, 1, D/2]
    sin = sin_cache[positions].unsqueeze(1)

    def rot(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)
