"""`SamplingBatch`: the per-step view of the rows the sampler works from.

Built once per sampler call on the host from the rows' `SamplingParams` (plain Python), then the
per-row knobs go to the device in ONE host-to-device copy. Host flags let the sampler skip every
stage no row asks for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quanta.sampling.topk_topp import current_top_p
from quanta.sampling.types import SamplingRow


@dataclass
class SamplingBatch:
    num_rows: int
    vocab_size: int
    # Host flags: which stages run at all.
    all_greedy: bool
    any_greedy: bool
    has_temperature: bool
    has_top_k: bool
    has_top_p: bool
    has_min_p: bool
    max_top_k: int = 0  # largest top_k in use (0 = no row uses top-k)
    # Rows (indices) that need the rare, Python-looped features or the penalties.
    processor_rows: list[int] = field(default_factory=list)
    bias_rows: list[int] = field(default_factory=list)
    ban_rows: list[int] = field(default_factory=list)
    penalty_rows: list[int] = field(default_factory=list)
    generators: list[tuple[int, torch.Generator]] = field(default_factory=list)  # seeded rows
    # Logprobs: K = max asked (None = no row asked), and which rows want processed ones.
    logprobs_k: int | None = None
    any_processed: bool = False
    all_processed: bool = False
    # Device tensors, all [num_rows].
    temperature: torch.Tensor | None = None  # float32, 1.0 where unset/greedy-with-0
    top_k: torch.Tensor | None = None  # int64, 0 = off
    top_p: torch.Tensor | None = None  # float32, 1.0 = off (already decayed)
    min_p: torch.Tensor | None = None  # float32, 0.0 = off
    greedy: torch.Tensor | None = None  # bool
    processed: torch.Tensor | None = None  # bool, row wants processed logprobs

    @property
    def needs_logit_edits(self) -> bool:
        """Does any row change its logits before temperature (processors, bias, bans, penalties)?"""
        return bool(self.processor_rows or self.bias_rows or self.ban_rows or self.penalty_rows)


def _has_penalty(row: SamplingRow) -> bool:
    p = row.params
    return (
        p.repetition_penalty not in (None, 1.0)
        or p.presence_penalty not in (None, 0.0)
        or p.frequency_penalty not in (None, 0.0)
    )


def _has_ban(row: SamplingRow) -> bool:
    p = row.params
    under_min = p.min_tokens is not None and len(row.output_token_ids) < p.min_tokens
    return bool(row.bad_words_ids or p.bad_token_ids or p.no_repeat_ngram_size or under_min)


def _row_knobs(row: SamplingRow, vocab_size: int) -> tuple[bool, float, int, float, float]:
    """(greedy, temperature, top_k (0 = off), top_p (1 = off), min_p (0 = off)) of one row."""
    p = row.params
    temperature = p.temperature if p.temperature else 1.0  # None or 0 -> 1 (argmax unchanged)
    if p.is_greedy:
        return True, temperature, 0, 1.0, 0.0
    top_k = p.top_k if p.top_k and p.top_k < vocab_size else 0
    return False, temperature, top_k, current_top_p(row), p.min_p or 0.0


def _feature_rows(batch: SamplingBatch, rows: list[SamplingRow]) -> None:
    for i, row in enumerate(rows):
        p = row.params
        if p.logits_processor is not None:
            batch.processor_rows.append(i)
        if p.embedding_bias is not None:
            batch.bias_rows.append(i)
        if _has_ban(row):
            batch.ban_rows.append(i)
        if _has_penalty(row):
            batch.penalty_rows.append(i)


def build_batch(rows: list[SamplingRow], vocab_size: int, device: torch.device) -> SamplingBatch:
    """Host pass over the rows + one packed host-to-device copy of the per-row knobs."""
    knobs = [_row_knobs(row, vocab_size) for row in rows]
    greedy, temps, top_ks, top_ps, min_ps = (list(col) for col in zip(*knobs))
    asked = [r.params.logprobs for r in rows if r.params.logprobs is not None]
    processed = [r.params.logprobs_mode == "processed" for r in rows]
    batch = SamplingBatch(
        num_rows=len(rows),
        vocab_size=vocab_size,
        all_greedy=all(greedy),
        any_greedy=any(greedy),
        has_temperature=any(t != 1.0 for t in temps),
        has_top_k=any(top_ks),
        max_top_k=max(top_ks),
        has_top_p=any(p < 1.0 for p in top_ps),
        has_min_p=any(m > 0.0 for m in min_ps),
        logprobs_k=max(asked) if asked else None,
        any_processed=any(processed),
        all_processed=all(processed),
    )
    _feature_rows(batch, rows)
    for i, row in enumerate(rows):
        if row.generator is not None and not greedy[i]:
            batch.generators.append((i, row.generator))
    # NOTE: one packed float32 tensor, one copy; top_k fits exactly (vocab < 2**24).
    host = torch.tensor([temps, top_ks, top_ps, min_ps, greedy, processed], dtype=torch.float32)
    packed = host.to(device, non_blocking=True)
    batch.temperature = packed[0]
    batch.top_k = packed[1].long()
    batch.top_p = packed[2]
    batch.min_p = packed[3]
    batch.greedy = packed[4].bool()
    batch.processed = packed[5].bool()
    return batch
