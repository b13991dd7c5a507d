"""Shared builders for the attention / kernel tests: random paged batches with a known dense answer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quanta.attention.metadata import AttentionMetadata


@dataclass
class PagedBatch:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim] (last pad_tokens rows belong to no sequence)
    k: torch.Tensor  # [num_tokens, num_kv_heads, head_dim] new keys (padding rows have slot -1)
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim], prefixes already written
    v_cache: torch.Tensor
    meta: AttentionMetadata
    full_k: list[torch.Tensor]  # per sequence [seq_len, num_kv_heads, head_dim]: prefix + new keys
    full_v: list[torch.Tensor]
    num_real_tokens: int


def make_paged_batch(
    seqs: list[tuple[int, int]],  # (cached prefix length, new tokens) per sequence
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    pad_tokens: int = 0,
    extra_blocks: int = 3,
    seed: int = 0,
    num_blocks: int | None = None,  # fix the cache size (e.g. to swap batches under one CUDA graph)
    max_blocks_per_seq: int | None = None,  # fix the block table width
) -> PagedBatch:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    seq_lens = [c + n for c, n in seqs]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = num_blocks or sum(blocks_per_seq) + extra_blocks
    assert num_blocks >= sum(blocks_per_seq)
    perm = torch.randperm(num_blocks, generator=g).tolist()  # scattered physical blocks
    max_blocks = max_blocks_per_seq or max(blocks_per_seq + [1]) + 1
    block_tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    # Garbage everywhere first: kernels must never read a slot they do not own.
    k_cache = rand(num_blocks, block_size, num_kv_heads, head_dim) * 100
    v_cache = rand(num_blocks, block_size, num_kv_heads, head_dim) * 100
    qs, ks, vs, slots, full_k, full_v = [], [], [], [], [], []
    for s, (ctx, n) in enumerate(seqs):
        own = [perm.pop() for _ in range(blocks_per_seq[s])]
        block_tables[s, : len(own)] = torch.tensor(own, dtype=torch.int32)
        seq_len = ctx + n
        fk, fv = rand(seq_len, num_kv_heads, head_dim), rand(seq_len, num_kv_heads, head_dim)
        seq_slots = torch.tensor(
            [own[p // block_size] * block_size + p % block_size for p in range(seq_len)], dtype=torch.int64
        )
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:ctx]] = fk[:ctx]
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots[:ctx]] = fv[:ctx]
        qs.append(rand(n, num_heads, head_dim))
        ks.append(fk[ctx:])
        vs.append(fv[ctx:])
        slots.append(seq_slots[ctx:])
        full_k.append(fk)
        full_v.append(fv)
    qs.append(rand(pad_tokens, num_heads, head_dim))
    ks.append(rand(pad_tokens, num_kv_heads, head_dim))
    vs.append(rand(pad_tokens, num_kv_heads, head_dim))
    slots.append(torch.full((pad_tokens,), -1, dtype=torch.int64))
    q_lens = torch.tensor([n for _, n in seqs], dtype=torch.int32)
    qsl = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(q_lens, 0)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots).to(torch.int64).to(device),
        block_tables=block_tables.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        query_start_loc=qsl.to(device),
        max_query_len=max([n for _, n in seqs] + [0]),
        max_seq_len=max(seq_lens + [0]),
    )
    return PagedBatch(
        q=torch.cat(qs).to(device),
        k=torch.cat(ks).to(device),
        v=torch.cat(vs).to(device),
        k_cache=k_cache.to(device),
        v_cache=v_cache.to(device),
        meta=meta,
        full_k=[t.to(device) for t in full_k],
        full_v=[t.to(device) for t in full_v],
        num_real_tokens=int(qsl[-1]),
    )


def dense_attention(batch: PagedBatch, scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention computed directly from each sequence's full K/V (no paging), float32; with a
    window, a query at position p sees keys p-window+1..p only."""
    out = torch.zeros(batch.num_real_tokens, *batch.q.shape[1:], dtype=torch.float32, device=batch.q.device)
    qsl = batch.meta.query_start_loc.tolist()
    group = batch.q.shape[1] // batch.full_k[0].shape[1] if batch.full_k else 1
    for s, (fk, fv) in enumerate(zip(batch.full_k, batch.full_v)):
        q = batch.q[qsl[s] : qsl[s + 1]].float()  # [n, H, D]
        n, seq_len = q.shape[0], fk.shape[0]
        k = fk.float().repeat_interleave(group, dim=1)  # [seq_len, H, D]
        v = fv.float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        q_pos = torch.arange(seq_len - n, seq_len, device=q.device)
        visible = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= torch.arange(seq_len, device=q.device)[None, :] > q_pos[:, None] - window
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out[qsl[s] : qsl[s + 1]] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff / max(expected.float().abs().max().item(), 1e-6)
