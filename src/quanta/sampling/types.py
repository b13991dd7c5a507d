"""Boundary types of the sampler: what the runner hands in and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from quanta.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence that samples a token this step (a request has n rows when n > 1)."""

    request_id: int
    params: SamplingParams
    prompt_token_ids: list[int]  # the (possibly truncated) prompt
    output_token_ids: list[int]  # tokens generated so far by THIS sequence
    eos_token_ids: list[int]  # end_id (or the tokenizer's EOS ids); masked while len(output) < min_tokens
    stop_token_ids: list[int] = field(default_factory=list)  # also masked under min_tokens
    bad_words_ids: list[list[int]] = field(default_factory=list)  # `bad` strings tokenized + bad_token_ids
    generator: torch.Generator | None = None  # per-sequence RNG when params.seed is set
    state: dict = field(default_factory=dict)  # sampler-owned per-sequence state (e.g. decayed top_p)


@dataclass
class SamplerOutput:
    """Device tensors only; the runner copies them to the host in one go."""

    token_ids: torch.Tensor  # [num_rows] int64
    sampled_logprobs: torch.Tensor  # [num_rows] float32, logprob of the sampled token (raw or processed)
    sampled_ranks: torch.Tensor | None = None  # [num_rows] int64, 1-based rank of the sampled token
    topk_ids: torch.Tensor | None = None  # [num_rows, K] int64, K = max logprobs asked in the batch
    topk_logprobs: torch.Tensor | None = None  # [num_rows, K] float32
