"""The PyTorch reference backend: ground truth for the kernels and the attention of the CPU engine."""

from __future__ import annotations

import torch

from quanta.attention.backend import register_backend
from quanta.attention.metadata import AttentionMetadata
from quanta.kernels.kv_cache_write import kv_cache_write_ref
from quanta.kernels.paged_attention_ref import paged_attention_ref


@register_backend("torch_ref")
class TorchRefBackend:
    """Writes K/V with index_copy_, then attends one sequence at a time with SDPA (float32 softmax).
    Reads seq_lens / query_start_loc on the host: free on the CPU, a sync on a GPU."""

    name = "torch_ref"

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        kv_cache_write_ref(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_ref(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale,
                                   window=meta.window)
