"""Truncation of the distribution: top-k, top-p (with TensorRT-LLM's top-p decay) and min-p.

All filters take temperature-scaled logits `x: [num_rows, vocab]` and per-row knobs as device
tensors, and return new logits with -inf where a token is cut (x itself is left untouched: it is
the 'processed' logprobs source). Order: top-k, then top-p on the top-k
renormalized distribution, then min-p (relative to the most likely token).
"""

from __future__ import annotations

import torch

from quanta.sampling.types import SamplingRow

_DEFAULT_TOP_P_MIN = 1e-6  # TensorRT-LLM's runtime default


def current_top_p(row: SamplingRow) -> float:
    """The row's top_p for this step (1.0 = off), following TensorRT-LLM's top-p decay.

    After each generated token: top_p = initial top_p if the token is a reset id, else
    max(top_p * decay, top_p_min). Computed from `row.output_token_ids` (host list), cached in
    `row.state` so each step only walks the new tokens; no device sync is ever needed.
    """
    p = row.params
    base = p.top_p if p.top_p is not None else 1.0
    if p.top_p_decay is None:
        return base
    out = row.output_token_ids
    cached = row.state.get("top_p_decay")
    top_p, num_seen = cached if cached is not None and cached[1] <= len(out) else (base, 0)
    floor = p.top_p_min if p.top_p_min is not None else _DEFAULT_TOP_P_MIN
    resets = p.top_p_reset_id_set
    for token in out[num_seen:]:
        top_p = base if token in resets else max(top_p * p.top_p_decay, floor)
    row.state["top_p_decay"] = (top_p, len(out))
    return top_p


def apply_top_k(x: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (top_k: [num_rows] int64, 0 = keep all).

    max_top_k is the batch's largest k (a host int, so no sync). Threshold form: ties with the
    k-th logit survive, measure-zero for real logits; `apply_top_k_top_p` is exact under ties.
    """
    top_vals = x.topk(max_top_k, dim=-1).values  # [num_rows, max_top_k]
    kth = (top_k.clamp(min=1, max=max_top_k) - 1).unsqueeze(1)  # [num_rows, 1]
    threshold = top_vals.gather(1, kth)
    threshold.masked_fill_((top_k == 0).unsqueeze(1), float("-inf"))
    return x.masked_fill(x < threshold, float("-inf"))


def apply_top_k_top_p(x: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k (optional) then top-p in sorted space; returns the filtered logits (new tensor).

    top_p: [num_rows] float32 (1.0 = off). Top-p keeps the smallest head of the sorted
    distribution whose mass reaches top_p (the token that crosses it included).
    """
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)  # [num_rows, vocab] each
    positions = torch.arange(vocab, device=x.device).unsqueeze(0)  # [1, vocab]
    if top_k is not None:
        k = torch.where(top_k > 0, top_k, vocab).unsqueeze(1)
        sorted_x.masked_fill_(positions >= k, float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely tokens
    cut = (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    sorted_x.masked_fill_(cut, float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)


def apply_min_p(x: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Cut tokens with prob < min_p * max prob (min_p: [num_rows], 0 = off), in log space."""
    log_min_p = min_p.log().unsqueeze(1)  # log(0) = -inf: nothing cut
    threshold = x.amax(dim=-1, keepdim=True) + log_min_p
    return x.masked_fill(x < threshold, float("-inf"))
