"""The Triton backend. Pure-decode steps (max_query_len <= 1, CUDA-graph capturable): ONE kernel per layer
(kernels/decode_attention_fused.py: rotary + the new token's cache write + split-K attention + merge). Other
steps: the (rotary +) reshape-and-cache kernel, then the unified varlen kernel."""

from __future__ import annotations

import torch

from quanta import envs
from quanta.attention.backend import register_backend
from quanta.attention.metadata import AttentionMetadata
from quanta.kernels.decode_attention_fused import decode_attention_fused
from quanta.kernels.kv_cache_write import kv_cache_write
from quanta.kernels.paged_attention import paged_attention_prefill
from quanta.kernels.paged_attention_decode import paged_attention_decode
from quanta.kernels.rotary import rotary_kv_cache_write


@register_backend("triton")
class TritonBackend:
    name = "triton"
    # NOTE: False = the three-launch decode path (cache write, split kernel, reduce kernel), for A/B timing
    # (env QUANTA_FUSED_DECODE=0). The one-launch kernel is measured up to 16 sequences (H200: Llama-3.2-1B batch 1
    # 1.067 vs 1.080 ms/step; 8B batch 16 +2%, kernels/decode_attention_fused.py), so it runs there; larger decode
    # batches keep the three-launch path.
    fused_decode: bool = envs.get("QUANTA_FUSED_DECODE")
    fused_decode_max_seqs: int = envs.get("QUANTA_FUSED_DECODE_MAX_SEQS")

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
        if meta.is_decode and self.fused_decode and meta.num_seqs <= self.fused_decode_max_seqs:
            return self._decode(q, k, v, k_cache, v_cache, meta, scale, None)
        kv_cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._attend(q, k_cache, v_cache, meta, scale)

    def forward_rope(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
        positions: torch.Tensor,  # [num_tokens] int64
        cos_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
        sin_cache: torch.Tensor,  # [max_position, head_dim // 2] float32
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """forward() with the rotary embedding of q and k fused in (full rotary). q may be rotated in place
        (prefill path) or only in registers (fused decode): callers must not read q afterwards."""
        if meta.is_decode and self.fused_decode and meta.num_seqs <= self.fused_decode_max_seqs:
            return self._decode(q, k, v, k_cache, v_cache, meta, scale, (positions, cos_cache, sin_cache))
        rotary_kv_cache_write(q, k, v, k_cache, v_cache, meta.slot_mapping, positions, cos_cache, sin_cache)
        return self._attend(q, k_cache, v_cache, meta, scale)

    @staticmethod
    def _decode(q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float, rope) -> torch.Tensor:
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_seq_len, scale)
        return decode_attention_fused(*args, k=k, v=v, slot_mapping=meta.slot_mapping, rope=rope, window=meta.window)

    @staticmethod
    def _attend(q, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        args = (q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc)
        if meta.max_query_len <= 1:
            return paged_attention_decode(*args, meta.max_seq_len, scale, window=meta.window)
        return paged_attention_prefill(*args, meta.max_query_len, scale, window=meta.window)
