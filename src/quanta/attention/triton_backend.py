"""The Triton backend: reshape-and-cache kernel, then the split-K decode kernel for pure-decode steps
(max_query_len == 1, CUDA-graph capturable) or the unified varlen kernel for everything else."""

from __future__ import annotations

import torch

from quanta.attention.backend import register_backend
from quanta.attention.metadata import AttentionMetadata
from quanta.kernels.kv_cache_write import kv_cache_write
from quanta.kernels.paged_attention import paged_attention_prefill
from quanta.kernels.paged_attention_decode import paged_attention_decode
from quanta.kernels.rotary import rotary_kv_cache_write


@register_backend("triton")
class TritonBackend:
    name = "triton"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]; rows of padding tokens are undefined
        kv_cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale)

    def forward_rope(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, positions: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> torch.Tensor:
        """forward() with the rotary embedding of q and k fused into the cache write (one kernel less)."""
        rotary_kv_cache_write(q, k, v, k_cache, v_cache, meta.slot_mapping, positions, cos_cache, sin_cache)
        return self._attend(q, k_cache, v_cache, meta, scale)

    @staticmethod
    def _attend(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc)
        if meta.max_query_len <= 1:
            return paged_attention_decode(*args, meta.max_seq_len, scale, window=meta.window)
        return paged_attention_prefill(*args, meta.max_query_len, scale, window=meta.window)
