"""Request (what the user asked) and Sequence (one stream of tokens the scheduler runs)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from quanta.engine.detokenizer import IncrementalDetokenizer
    from quanta.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: Request
    index: int  # output index within the request
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict] = field(default_factory=list)  # per generated token {id: Logprob}
    generation_logits: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator | None = None
    sampler_state: dict = field(default_factory=dict)
    detokenizer: IncrementalDetokenizer | None = None
    num_preemptions: int = 0
    sent_offsets: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # what deltas already carried
    # Chain hashes of the full blocks of token_ids (prefix reuse), memoized by KVCacheManager.chain_hashes.
    # NOTE: whoever rewrites token_ids in place (rather than appending) must reset this list.
    block_hashes: list[bytes] = field(default_factory=list)
    # Overlap scheduling: token_ids[-1] is a placeholder for a token still on the device (engine/engine.py)
    pending_token: bool = False

    def drop_placeholder(self) -> None:
        if self.pending_token:
            self.token_ids.pop()
            self.pending_token = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        """Upper bound of this sequence's length (what GUARANTEED_NO_EVICT reserves)."""
        return min(self.num_prompt_tokens + self.request.params.max_tokens, self.request.max_seq_len)

    @property
    def num_reserved_fork_blocks(self) -> int:
        """KV blocks that beams still to be forked from this one will claim (GUARANTEED_NO_EVICT reserves them)."""
        beam = getattr(self.request, "beam", None)
        return 0 if beam is None else beam.reserved_fork_blocks(self)

    @property
    def num_batch_slots(self) -> int:
        """Batch slots (of max_batch_size) this sequence stands for: 1, plus, on a beam request's first live
        beam, the beams still to be forked from it (they join the running batch without admission)."""
        beam = getattr(self.request, "beam", None)
        return 1 if beam is None else 1 + beam.reserved_fork_slots(self)


@dataclass(eq=False)
class Request:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    max_seq_len: int
    eos_token_ids: list[int] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    bad_words_ids: list[list[int]] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    prompt_logprobs: list[dict | None] = field(default_factory=list)
    context_logits: list[torch.Tensor] = field(default_factory=list)
    error: BaseException | None = None
    aborted: bool = False
    cache_salt: str | None = None  # prefix reuse: only requests with the same salt share KV blocks
    adapter_id: int | str | None = None  # LoRA adapter (salts the prefix hash too)
    lora_request: Any = None  # the LoRARequest it was submitted with (None: the base model)
    lora_adapter: Any = None  # its loaded adapter (quanta.lora.LoRAAdapter), held while the request lives
    extra: dict[str, Any] = field(default_factory=dict)
    beam: Any = None  # BeamState (engine/beam_search.py) of a beam-search request; seqs are then its live beams

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def needs_prompt_logits(self) -> bool:
        return self.params.prompt_logprobs is not None or self.params.return_context_logits
