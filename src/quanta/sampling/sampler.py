"""The sampler: logits [num_rows, vocab] + one `SamplingRow` per row -> `SamplerOutput`.

Order per row: logits_processor callables -> embedding_bias -> bans (bad words, no-repeat n-grams,
min_tokens) -> repetition/presence/frequency penalties -> temperature -> top-k -> top-p (decayed)
-> min-p -> sample (greedy rows: argmax). 'raw' logprobs come from the logits as given,
'processed' ones after the penalties and temperature.

Sync-free: no `.item()` / `.tolist()` on device tensors; host decisions use only host data (the
rows), and sampling uses the exponential race `argmax(probs / q)`, q ~ Exp(1), which draws from
`probs` exactly. A row with a seed draws its noise from its own `row.generator`, so its tokens do not
depend on what else is in the batch.
"""

from __future__ import annotations

import torch

from quanta.sampling.batch import SamplingBatch, build_batch
from quanta.sampling.constraints import apply_bans, apply_logits_processors
from quanta.sampling.logprobs import compute_logprobs, select_source
from quanta.sampling.penalties import apply_embedding_bias, apply_penalties
from quanta.sampling.topk_topp import apply_min_p, apply_top_k, apply_top_k_top_p
from quanta.sampling.types import SamplerOutput, SamplingRow

_TINY = torch.finfo(torch.float32).tiny


def make_generator(seed: int | None, device: torch.device | str, seq_index: int = 0) -> torch.Generator | None:
    """The per-sequence RNG for `SamplingRow.generator` (None when seed is None).

    Create it once per sequence, on the device the logits live on, and keep it with the sequence
    for its whole life. With n > 1, give sequence i `seq_index=i` (seed + i, as vLLM does), so the
    n samples differ while each stays reproducible.
    """
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed((seed + seq_index) % 2**64)
    return generator


def _exponential_noise(
    shape: tuple[int, int], device: torch.device, generators: list[tuple[int, torch.Generator]]
) -> torch.Tensor:
    """q ~ Exp(1) of `shape`; seeded rows draw their whole row from their own generator."""
    noise = torch.empty(shape, dtype=torch.float32, device=device)
    if len(generators) < shape[0]:
        noise.exponential_()
    for i, generator in generators:
        noise[i].exponential_(generator=generator)
    # NOTE: q = 0 would turn a cut token's 0 / q into NaN, which argmax would pick.
    return noise.clamp_(min=_TINY)


def _truncate(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Top-k, top-p and min-p, each only if some row uses it; returns a new tensor."""
    if batch.has_top_p:
        top_k = batch.top_k if batch.has_top_k else None
        x = apply_top_k_top_p(x, top_k, batch.top_p)
    elif batch.has_top_k:
        x = apply_top_k(x, batch.top_k, batch.max_top_k)
    if batch.has_min_p:
        x = apply_min_p(x, batch.min_p)
    return x


def _sample(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """[num_rows] int64 tokens from temperature-scaled logits x (greedy rows: argmax)."""
    probs = _truncate(x, batch).softmax(dim=-1)  # [num_rows, vocab]
    noise = _exponential_noise(tuple(probs.shape), probs.device, batch.generators)
    if batch.any_greedy:
        noise.masked_fill_(batch.greedy.unsqueeze(1), 1.0)  # no noise: argmax
    return probs.div_(noise).argmax(dim=-1)


class Sampler:
    """Stateless across steps (per-sequence state lives in `SamplingRow.state`)."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        # logits: [num_rows, vocab] float32 (other float dtypes are upcast)
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"Sampler expects logits [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}")
        batch = build_batch(rows, logits.shape[1], logits.device)
        raw = logits.float()
        x = raw
        if batch.needs_logit_edits:
            x = raw.clone()  # raw stays as given for 'raw' logprobs
            self._edit_logits(x, rows, batch)
        if batch.has_temperature:
            x = x / batch.temperature.unsqueeze(1)
        # x is now the 'processed' distribution; the filters below never write into it.
        tokens = x.argmax(dim=-1) if batch.all_greedy else _sample(x, batch)
        source = select_source(raw, x, batch.processed, batch.any_processed, batch.all_processed)
        sampled, ranks, topk_ids, topk_logprobs = compute_logprobs(source, tokens, batch.logprobs_k)
        return SamplerOutput(
            token_ids=tokens,
            sampled_logprobs=sampled,
            sampled_ranks=ranks,
            topk_ids=topk_ids,
            topk_logprobs=topk_logprobs,
        )

    @staticmethod
    def _edit_logits(x: torch.Tensor, rows: list[SamplingRow], batch: SamplingBatch) -> None:
        """In place, in order: logits processors, embedding bias, bans, penalties."""
        if batch.processor_rows:
            apply_logits_processors(x, rows, batch.processor_rows)
        if batch.bias_rows:
            apply_embedding_bias(x, rows, batch.bias_rows)
        if batch.ban_rows:
            apply_bans(x, rows, batch.ban_rows)
        if batch.penalty_rows:
            apply_penalties(x, rows, batch.penalty_rows)


def is_plain_greedy(params) -> bool:
    """Argmax with nothing else to do: such rows can skip the sampler (and run inside a CUDA graph)."""
    return (
        params.is_greedy
        and params.logits_processor is None
        and params.embedding_bias is None
        and not params.bad
        and not params.bad_token_ids
        and params.no_repeat_ngram_size is None
        and not params.min_tokens
        and params.repetition_penalty in (None, 1.0)
        and params.presence_penalty in (None, 0.0)
        and params.frequency_penalty in (None, 0.0)
        and params.logprobs is None
        and not params.return_generation_logits
        and params.effective_beam_width == 1
    )


def greedy_sample(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, vocab] -> (argmax ids [R] int64, their raw logprobs [R] float32)."""
    ids = logits.argmax(dim=-1)
    lps = logits.gather(1, ids[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return ids, lps
