"""The PyTorch twin of kernels/paged_attention.py: the same math one sequence at a time (float32 softmax)."""

from __future__ import annotations

import torch


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq]
    seq_lens: torch.Tensor,  # [num_seqs]
    query_start_loc: torch.Tensor,  # [num_seqs + 1]
    scale: float,
    window: int | None = None,  # sliding window: a query at position p sees keys p-window+1..p
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]; tokens of no sequence are zeros
    """The same math in PyTorch, one sequence at a time, softmax in float32 (reads lengths on the host)."""
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.zeros_like(q)
    qsl = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = qsl[s], qsl[s + 1]
        q_len = q1 - q0
        if q_len == 0 or seq_len == 0:
            continue
        # keys from k_lo on: all of them, or those the first query's window still sees (block aligned)
        k_lo = 0 if window is None else max(0, seq_len - q_len - window + 1) // block_size * block_size
        blocks = block_tables[s, k_lo // block_size : -(-seq_len // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[: seq_len - k_lo].float().transpose(0, 1)  # [num_kv_heads, n_keys, D]
        v = v_cache[blocks].flatten(0, 1)[: seq_len - k_lo].float().transpose(0, 1)
        qs = q[q0:q1].float().transpose(0, 1)  # [num_heads, q_len, head_dim]
        if window is not None and q_len == 1:
            k, v = k[:, -window:], v[:, -window:]  # the last `window` keys
        if q_len == 1:  # fold the query heads of a kv group into rows: no K/V copies, no mask
            o = torch.nn.functional.scaled_dot_product_attention(
                qs.reshape(num_kv_heads, group, head_dim), k, v, scale=scale
            ).reshape(num_heads, 1, head_dim)
        else:
            k = k.repeat_interleave(group, dim=0)  # [num_heads, n_keys, head_dim]
            v = v.repeat_interleave(group, dim=0)
            if seq_len == q_len and window is None:  # no cached prefix: plain (top-left aligned) causal
                o = torch.nn.functional.scaled_dot_product_attention(qs, k, v, is_causal=True, scale=scale)
            else:
                q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
                k_pos = torch.arange(k_lo, seq_len, device=q.device)[None, :]
                mask = k_pos <= q_pos  # [q_len, n_keys]
                if window is not None:
                    mask &= k_pos > q_pos - window
                o = torch.nn.functional.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale)
        out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return out


def decode_attention_fused_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    window: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """The twin of decode_attention_fused.decode_attention_fused: rotary (q not in place), the cache write, then
    paged attention, one op at a time."""
    from quanta.kernels.kv_cache_write import kv_cache_write_ref
    from quanta.kernels.rotary import apply_rotary_emb_ref

    if rope is not None:
        q, k = apply_rotary_emb_ref(q, k, *rope, inplace=False)
    if k is not None:
        kv_cache_write_ref(k, v, k_cache, v_cache, slot_mapping)
    return paged_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window=window)
