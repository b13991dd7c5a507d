"""Embedding bias and the repetition / presence / frequency penalties, batched over rows.

Penalty semantics (vLLM / Hugging Face / TensorRT-LLM kernels agree on the formulas):
- repetition: a token seen in the prompt or the output gets logit / p if logit > 0, else logit * p;
- presence: logit -= p once for a token present; frequency: logit -= p * count.
Presence and frequency count generated tokens (OpenAI / vLLM); when `prompt_ignore_length` is set
they also count the prompt after its first `prompt_ignore_length` tokens (TensorRT-LLM's meaning).
The first `prompt_ignore_length` prompt tokens are never counted by any penalty.
"""

from __future__ import annotations

import torch

from quanta.sampling.types import SamplingRow


def apply_embedding_bias(x: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """x[i] += params.embedding_bias for the given rows (bias [vocab'] with vocab' <= vocab)."""
    vocab = x.shape[-1]
    for i in row_ids:
        bias = _device_bias(rows[i], x.device)
        if bias.numel() > vocab:
            raise ValueError(
                f"SamplingParams.embedding_bias has {bias.numel()} entries, more than the model's vocab size {vocab}"
            )
        x[i, : bias.numel()].add_(bias)


def _device_bias(row: SamplingRow, device: torch.device) -> torch.Tensor:
    """The row's bias as float32 on `device`, copied once and kept in row.state."""
    cached = row.state.get("embedding_bias")
    if cached is None or cached.device != device:
        cached = row.params.embedding_bias.to(device=device, dtype=torch.float32)
        row.state["embedding_bias"] = cached
    return cached


def _ignored_prompt_len(row: SamplingRow) -> int:
    return min(row.params.prompt_ignore_length or 0, len(row.prompt_token_ids))


def _prompt_ids(row: SamplingRow, vocab: int, device: torch.device) -> torch.Tensor:
    """The penalized part of the prompt as a device tensor, uploaded once per row."""
    key = (_ignored_prompt_len(row), len(row.prompt_token_ids), vocab, device)
    cached = row.state.get("penalty_prompt")
    if cached is None or cached[0] != key:
        ids = [t for t in row.prompt_token_ids[key[0] :] if 0 <= t < vocab]
        cached = (key, torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True))
        row.state["penalty_prompt"] = cached
    return cached[1]


def _output_counts(rows: list[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] float32 occurrence counts of each row's generated tokens."""
    row_ids = [i for i, row in enumerate(rows) for _ in row.output_token_ids]
    tokens = [t for row in rows for t in row.output_token_ids]
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    if tokens:
        index = torch.tensor([row_ids, tokens], dtype=torch.int64).to(device, non_blocking=True)
        ones = torch.ones(len(tokens), dtype=torch.float32, device=device)
        counts.index_put_((index[0], index[1]), ones, accumulate=True)
    return counts


def _prompt_counts(rows: list[SamplingRow], wanted: list[bool], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] float32 counts of each row's penalized prompt (zeros where not wanted)."""
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    parts = [_prompt_ids(row, vocab, device) if w else None for row, w in zip(rows, wanted)]
    lengths = [0 if p is None else p.numel() for p in parts]
    total = sum(lengths)
    if total:
        tokens = torch.cat([p for p in parts if p is not None])
        row_ids = torch.repeat_interleave(
            torch.arange(len(rows), device=device),
            torch.tensor(lengths).to(device, non_blocking=True),
            output_size=total,  # NOTE: a host-known size keeps repeat_interleave sync-free
        )
        counts.index_put_((row_ids, tokens), torch.ones_like(tokens, dtype=torch.float32), True)
    return counts


def apply_penalties(x: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """Repetition, presence and frequency penalties on the given rows of x, in place."""
    vocab, device = x.shape[-1], x.device
    sub = [rows[i] for i in row_ids]
    params = [r.params for r in sub]
    rep = [p.repetition_penalty or 1.0 for p in params]
    pres = [p.presence_penalty or 0.0 for p in params]
    freq = [p.frequency_penalty or 0.0 for p in params]
    prompt_pf = [
        p.prompt_ignore_length is not None and (pr != 0.0 or fr != 0.0) for p, pr, fr in zip(params, pres, freq)
    ]
    wanted = [r != 1.0 or pf for r, pf in zip(rep, prompt_pf)]
    knobs = torch.tensor([rep, pres, freq, prompt_pf], dtype=torch.float32)
    knobs = knobs.to(device, non_blocking=True).unsqueeze(2)  # [4, num_sub, 1]

    index = torch.tensor(row_ids, dtype=torch.int64).to(device, non_blocking=True)
    xs = x.index_select(0, index)  # [num_sub, vocab]
    out_counts = _output_counts(sub, vocab, device)
    prompt_counts = _prompt_counts(sub, wanted, vocab, device) if any(wanted) else torch.zeros_like(out_counts)
    seen = (out_counts + prompt_counts) > 0
    penalized = torch.where(xs > 0, xs / knobs[0], xs * knobs[0])
    xs = torch.where(seen, penalized, xs)
    counts = out_counts + prompt_counts * knobs[3]
    xs -= knobs[2] * counts + knobs[1] * (counts > 0).float()
    x.index_copy_(0, index, xs)
