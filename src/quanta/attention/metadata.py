"""Per-step attention metadata: built once per step by the model runner, read by every attention layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """What an attention backend needs to write K/V into the paged cache and attend over it.

    Tokens are flattened sequence by sequence. Query token j of sequence s (0-based within its new tokens,
    q_len_s = query_start_loc[s+1] - query_start_loc[s]) sits at absolute position
    `seq_lens[s] - q_len_s + j` and attends causally to the keys at positions 0..that position (with a
    sliding `window`, to the last `window` of them). Attention layers with a window set it per layer.
    All tensors live on the model's device; the two ints are host values (no device sync to read them).
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset; -1 = padding, skip
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32: physical block ids (pad 0)
    seq_lens: torch.Tensor  # [num_seqs] int32: context length after this step (cached + new tokens)
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: cu_seqlens of the new (query) tokens
    max_query_len: int  # host int; 1 for pure decode (lets the backend pick its decode kernel)
    max_seq_len: int  # host int; upper bound of seq_lens (under CUDA graphs: the bound used at capture)
    window: int | None = None  # sliding window: a query at position p sees keys p-window+1..p only

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode(self) -> bool:
        """Pure decode step: every sequence brings at most one new token."""
        return self.max_query_len <= 1
