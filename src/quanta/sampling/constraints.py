"""The rare, per-row features that loop in Python: logits processors and token bans.

Bans (bad words, no-repeat n-grams, min_tokens) are gathered on the host as (row, token) pairs and
applied with one indexed write, so the device sees a single small copy and one kernel.
"""

from __future__ import annotations

import inspect

import torch

from quanta.errors import RequestFailure
from quanta.sampling.types import SamplingRow


def apply_logits_processors(x: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """Run each row's logits_processor callables in order; they edit x's row in place.

    Each gets `(req_id, logits [1, 1, vocab] view of the row, [prompt + output], None, None)`,
    TensorRT-LLM's PyTorch-backend shapes (beam_width = 1); 4-argument callables get no client_id.
    """
    vocab = x.shape[-1]
    for i in row_ids:
        row = rows[i]
        procs = row.params.logits_processor
        procs = procs if isinstance(procs, list) else [procs]
        view = x[i : i + 1].view(1, 1, vocab)  # [beam_width, 1, vocab]
        token_ids = [row.prompt_token_ids + row.output_token_ids]
        try:
            for proc in procs:
                if _takes_client_id(proc):
                    proc(row.request_id, view, token_ids, None, None)
                else:
                    proc(row.request_id, view, token_ids, None)
        except Exception as e:  # a user callable failed: only its request fails
            raise RequestFailure(row.request_id, e) from e


def _takes_client_id(proc) -> bool:
    """Does the callable accept a 5th positional argument (client_id)?"""
    try:
        params = inspect.signature(proc).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: assume the full form
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 5 or any(p.kind == p.VAR_POSITIONAL for p in params)


def _tail(row: SamplingRow, n: int) -> list[int]:
    """The last n tokens of prompt + output, without concatenating the whole sequence."""
    out = row.output_token_ids
    if n <= len(out):
        return out[len(out) - n :]
    prompt = row.prompt_token_ids
    return prompt[max(0, len(prompt) - (n - len(out))) :] + out


def _bad_word_bans(row: SamplingRow) -> set[int]:
    """Ban the last token of each bad word whose prefix ends prompt + output (single: always)."""
    banned = set(row.params.bad_token_ids or ())
    for word in row.bad_words_ids:
        if len(word) == 1:
            banned.add(word[0])
        elif word and _tail(row, len(word) - 1) == word[:-1]:
            banned.add(word[-1])
    return banned


def _ngram_table(row: SamplingRow, n: int) -> dict[tuple[int, ...], set[int]]:
    """{(n-1)-gram: next tokens seen} over prompt + output, extended incrementally in row.state.

    The cache keeps a copy of the output it has indexed and is rebuilt if that is no longer a prefix
    of the row's output (e.g. a beam took another history).
    """
    prompt, out = row.prompt_token_ids, row.output_token_ids
    cache = row.state.get("ngrams")
    valid = cache is not None and cache["key"] == (n, len(prompt)) and out[: len(cache["out"])] == cache["out"]
    if not valid:
        cache = {"key": (n, len(prompt)), "out": [], "table": {}, "done": 0}
    table, start = cache["table"], cache["done"]  # start: first n-gram not indexed yet
    seq = prompt[start:] + out[max(0, start - len(prompt)) :]  # prompt + output from `start`
    for j in range(len(seq) - n + 1):
        table.setdefault(tuple(seq[j : j + n - 1]), set()).add(seq[j + n - 1])
    cache["done"] = max(start, len(prompt) + len(out) - n + 1)
    cache["out"] = list(out)
    row.state["ngrams"] = cache
    return table


def _ngram_bans(row: SamplingRow, n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in prompt + output."""
    if len(row.prompt_token_ids) + len(row.output_token_ids) < n - 1:
        return set()
    return _ngram_table(row, n).get(tuple(_tail(row, n - 1)), set())


def _row_bans(row: SamplingRow) -> set[int]:
    p = row.params
    banned = _bad_word_bans(row)
    if p.no_repeat_ngram_size:
        banned |= _ngram_bans(row, p.no_repeat_ngram_size)
    if p.min_tokens is not None and len(row.output_token_ids) < p.min_tokens:
        banned.update(row.stop_token_ids)
        if not p.ignore_eos:  # under ignore_eos the engine does not stop at EOS: no need to ban
            banned.update(row.eos_token_ids)
    return banned


def apply_bans(x: torch.Tensor, rows: list[SamplingRow], row_ids: list[int]) -> None:
    """Set the banned tokens of the given rows to -inf (one indexed write)."""
    vocab = x.shape[-1]
    pairs = [(i, t) for i in row_ids for t in _row_bans(rows[i]) if 0 <= t < vocab]
    if not pairs:
        return
    index = torch.tensor(pairs, dtype=torch.int64).T.contiguous()
    index = index.to(x.device, non_blocking=True)
    x.index_put_((index[0], index[1]), torch.tensor(float("-inf"), device=x.device))
