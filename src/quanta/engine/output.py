"""What the engine thread sends to a request's handle: deltas, so streaming costs O(new tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SeqDelta:
    index: int
    token_ids: list[int]  # new tokens since the last delta
    text: str  # new visible text since the last delta
    logprobs: list[dict]  # new per-token logprob dicts
    cumulative_logprob: float | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    generation_logits: list[Any] = field(default_factory=list)


@dataclass
class RequestDelta:
    request_id: int
    seqs: list[SeqDelta]
    finished: bool
    prompt_logprobs: list | None = None  # full list, sent once with the first delta that has it
    context_logits: Any = None
    error: BaseException | None = None
    # best_of > n: the final top-n by cumulative logprob replaces whatever was streamed
    final_replace: bool = False
