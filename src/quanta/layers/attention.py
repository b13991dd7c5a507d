"""Attention layer: holds this layer's KV cache views and calls the step's backend."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from quanta.attention.forward_context import get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Set by the model runner when it allocates the cache: [num_blocks, block_size, kv_heads, head_dim]
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # An int8 / fp8 cache with per-layer k_scale / v_scale (quanta/quantization/kv_cache.py), else None
        self.kv_quant = None
        self.window: int | None = None  # sliding window (set by the model runner), None = full attention

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope=None) -> torch.Tensor:
        # q: [T, H, D]; k, v: [T, KH, D] -> [T, H * D]. rope: (RotaryEmbedding, positions [T]) to apply to q and
        # k first; the Triton backend fuses it into its cache write.
        ctx = get_forward_context()
        meta = ctx.meta if self.window is None else replace(ctx.meta, window=self.window)
        if rope is not None:
            rotary, positions = rope
            fused = getattr(ctx.backend, "forward_rope", None)
            if fused is not None and self.kv_quant is None and rotary.fusable(q):
                out = fused(q, k, v, self.k_cache, self.v_cache, meta, self.scale, positions, rotary.cos_cache,
                            rotary.sin_cache)
                return out.reshape(q.shape[0], self.num_heads * self.head_dim)
            q, k = rotary(positions, q, k)
        if self.kv_quant is not None:
            out = self.kv_quant.forward(self, ctx.backend, meta, q, k, v)
        else:
            out = ctx.backend.forward(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
