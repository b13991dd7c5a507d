"""Logprobs of the sampled token, its rank, and the top-K alternatives, from one logits source.

The source is the raw logits (before any processing) or the processed ones (after logits
processors, bias, bans, penalties and temperature; before top-k/top-p/min-p), per row.
"""

from __future__ import annotations

import torch


def select_source(
    raw: torch.Tensor,
    processed: torch.Tensor | None,
    processed_rows: torch.Tensor,
    any_processed: bool,
    all_processed: bool,
) -> torch.Tensor:
    """The [num_rows, vocab] logits each row's logprobs come from (processed_rows: [num_rows] bool)."""
    if processed is None or not any_processed:
        return raw
    if all_processed:
        return processed
    return torch.where(processed_rows.unsqueeze(1), processed, raw)


def compute_logprobs(
    source: torch.Tensor, token_ids: torch.Tensor, k: int | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(sampled_logprobs [R], sampled_ranks [R] | None, topk_ids [R, k] | None, topk_logprobs | None).

    Ranks and top-K are computed only when k is not None (some row asked for logprobs). The rank is
    1-based: 1 + the number of tokens strictly more likely than the sampled one.
    """
    lse = torch.logsumexp(source, dim=-1, keepdim=True)  # [R, 1]
    sampled_logit = source.gather(1, token_ids.unsqueeze(1))  # [R, 1]
    sampled = (sampled_logit - lse).squeeze(1)
    if k is None:
        return sampled, None, None, None
    ranks = (source > sampled_logit).sum(dim=-1) + 1
    top_logits, top_ids = source.topk(k, dim=-1)
    return sampled, ranks, top_ids, top_logits - lse
