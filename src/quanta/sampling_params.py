"""`SamplingParams`: how one request samples (TensorRT-LLM LLM API names, defaults and semantics).

Every field is validated at construction; an invalid value raises `ValueError` naming the field, the
value and the allowed range. A few values are normalized (TensorRT-LLM accepts both forms):
`stop` / `bad` given as one string become a one-element list, `logprobs=True` means 1, integer floats
become floats, `pad_id` defaults to `end_id`.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

_MAX_LOGPROBS = 100
_LOGPROBS_MODES = {"raw": "raw", "processed": "processed"}
# vLLM spells the modes with a suffix; accept both.
_LOGPROBS_MODES.update({"raw_logprobs": "raw", "processed_logprobs": "processed"})


class LogitsProcessor(ABC):
    """Per-request logits callback, as in TensorRT-LLM (any callable of this signature works).

    `logits` is the request's row, shaped `[beam_width, 1, vocab]` like TensorRT-LLM's PyTorch
    backend; edit it in place. `token_ids` holds prompt + generated tokens, one list per beam.
    `stream_ptr` is None (PyTorch runs on the current stream). A 4-argument callable (no
    `client_id`) is accepted too.
    """

    @abstractmethod
    def __call__(
        self,
        req_id: int,
        logits: torch.Tensor,
        token_ids: list[list[int]],
        stream_ptr: int | None,
        client_id: int | None,
    ) -> None: ...


def _fail(name: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"SamplingParams.{name} must be {rule}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(name: str, value: Any, low: int, rule: str, *, optional: bool = True) -> int | None:
    """An int >= low (bool is not an int here); None passes when optional."""
    if value is None and optional:
        return None
    if not _is_int(value) or value < low:
        raise _fail(name, rule, value)
    return int(value)


def _check_float(
    name: str, value: Any, rule: str, ok: Callable[[float], bool], *, optional: bool = True
) -> float | None:
    """A finite real number for which ok(value) holds; None passes when optional."""
    if value is None and optional:
        return None
    if not _is_real(value) or not math.isfinite(value) or not ok(float(value)):
        raise _fail(name, rule, value)
    return float(value)


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, "a bool", value)
    return value


def _check_token_ids(name: str, value: Any) -> list[int] | None:
    """None or a list of token ids (ints >= 0)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in value):
        raise _fail(name, "a list of token ids (ints >= 0)", value)
    return [int(t) for t in value]


def _check_strs(name: str, value: Any) -> list[str] | None:
    """None, a non-empty string, or a list of non-empty strings; normalized to a list."""
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) and s for s in value):
        raise _fail(name, "a non-empty str or a list of non-empty str", value)
    return list(value)


def _check_logprobs(name: str, value: Any) -> int | None:
    """None, True (= 1), False (= None) or an int in [0, 100]."""
    if value is None or value is False:
        return None
    if value is True:
        return 1
    if not _is_int(value) or not 0 <= value <= _MAX_LOGPROBS:
        raise _fail(name, f"None, a bool or an int in [0, {_MAX_LOGPROBS}]", value)
    return int(value)


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling parameters of one request (keyword-only; TensorRT-LLM LLM API fields and defaults).

    Greedy decoding is used when temperature, top_k, top_p and min_p are all None, or temperature is 0,
    or top_k is 1. `top_k=0` means all tokens. `seed` makes a request's tokens reproducible whatever
    else is in the batch. Presence and frequency penalties count generated tokens; when
    `prompt_ignore_length` is set they also count the prompt tokens after the first
    `prompt_ignore_length` (TensorRT-LLM's meaning). The repetition penalty counts prompt (minus the
    ignored head) and generated tokens. `logprobs=0` returns the sampled token's logprob only, K > 0
    also the top K. Lifted TensorRT-LLM limits: `top_p_reset_ids` may be a list of ids, and
    n > 1 / best_of > 1 with greedy decoding is allowed.

    Beam search (`beam_width=k`, or `use_beam_search=True` with `best_of`/`n`; `beam_width_array` alone
    too) returns the best `n` beams as outputs 0..n-1, each with its cumulative_logprob. Any width up to
    the LLM's `max_beam_width` is allowed (TensorRT-LLM requires equality). Semantics are Hugging Face's
    `generate(num_beams=k)`: beams are ranked by cumulative (processed) logprob, a finished beam is scored
    cumulative_logprob / num_generated_tokens ** length_penalty (None: 1.0, HF's default), and
    `early_stopping` maps TensorRT-LLM's integers onto HF's values: 1 (or True) -> True (stop once k beams
    are finished), 0 (or False) and None -> False (stop when no live beam can do better at its current
    length), any other int (or "never") -> "never" (the same bound at the longest possible length when
    length_penalty > 0). `beam_search_diversity_rate` adds rate * (rank of the source beam) to each
    candidate's ranking key, as TensorRT-LLM does; `beam_width_array` gives the width of each step, the
    last one holding for the rest. Penalties, bans, min_tokens, temperature and logits processors shape
    each beam's logprobs; top_k / top_p / min_p / seed do not apply.
    """

    max_tokens: int = 32
    end_id: int | None = None
    pad_id: int | None = None

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    top_p_min: float | None = None
    top_p_decay: float | None = None
    top_p_reset_ids: int | list[int] | None = None
    seed: int | None = None

    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    prompt_ignore_length: int | None = None
    no_repeat_ngram_size: int | None = None
    min_tokens: int | None = None
    ignore_eos: bool = False

    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    bad: str | list[str] | None = None
    bad_token_ids: list[int] | None = None
    embedding_bias: torch.Tensor | None = None
    logits_processor: Callable | list[Callable] | None = None

    n: int = 1
    best_of: int | None = None
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float | None = None
    early_stopping: int | bool | None = None
    beam_search_diversity_rate: float | None = None
    beam_width_array: list[int] | None = None

    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logprobs_mode: str = "raw"
    return_context_logits: bool = False
    return_generation_logits: bool = False
    exclude_input_from_output: bool = True

    detokenize: bool = True
    add_special_tokens: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    truncate_prompt_tokens: int | None = None
    guided_decoding: Any = None

    def __post_init__(self) -> None:
        self._validate_lengths()
        self._validate_sampling()
        self._validate_penalties()
        self._validate_words()
        self._validate_beams()
        self._validate_outputs()

    # ---- validation, one group of fields per method ----

    def _validate_lengths(self) -> None:
        self.max_tokens = _check_int("max_tokens", self.max_tokens, 1, "an int > 0", optional=False)
        self.end_id = _check_int("end_id", self.end_id, -1, "None or an int >= -1")
        self.pad_id = _check_int("pad_id", self.pad_id, -1, "None or an int >= -1")
        if self.pad_id is None:
            self.pad_id = self.end_id
        rule = f"None or an int in [0, max_tokens={self.max_tokens}]"
        self.min_tokens = _check_int("min_tokens", self.min_tokens, 0, rule)
        if self.min_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", rule, self.min_tokens)
        self.ignore_eos = _check_bool("ignore_eos", self.ignore_eos)
        self.truncate_prompt_tokens = _check_int(
            "truncate_prompt_tokens", self.truncate_prompt_tokens, 1, "None or an int >= 1"
        )

    def _validate_sampling(self) -> None:
        self.temperature = _check_float("temperature", self.temperature, ">= 0 and finite", lambda v: v >= 0)
        self.top_k = _check_int("top_k", self.top_k, 0, "None or an int >= 0 (0 = all tokens)")
        in_0_1 = lambda v: 0 < v <= 1  # noqa: E731
        self.top_p = _check_float("top_p", self.top_p, "None or in (0, 1]", in_0_1)
        self.min_p = _check_float("min_p", self.min_p, "None or in [0, 1]", lambda v: 0 <= v <= 1)
        self.top_p_min = _check_float("top_p_min", self.top_p_min, "None or in (0, 1]", in_0_1)
        self.top_p_decay = _check_float("top_p_decay", self.top_p_decay, "None or in (0, 1]", in_0_1)
        ids = self.top_p_reset_ids
        if _is_int(ids) and ids >= 0:
            self.top_p_reset_ids = int(ids)
        elif ids is not None:
            rule = "None, a token id (int >= 0) or a list of token ids"
            try:
                self.top_p_reset_ids = _check_token_ids("top_p_reset_ids", ids)
            except ValueError:
                raise _fail("top_p_reset_ids", rule, ids) from None
        if self.seed is not None and (not _is_int(self.seed) or not -(2**63) <= self.seed < 2**64):
            raise _fail("seed", "None or an int in [-2**63, 2**64)", self.seed)

    def _validate_penalties(self) -> None:
        self.repetition_penalty = _check_float(
            "repetition_penalty", self.repetition_penalty, "None or > 0 and finite", lambda v: v > 0
        )
        in_pm2 = lambda v: -2 <= v <= 2  # noqa: E731
        self.presence_penalty = _check_float("presence_penalty", self.presence_penalty, "None or in [-2, 2]", in_pm2)
        self.frequency_penalty = _check_float("frequency_penalty", self.frequency_penalty, "None or in [-2, 2]", in_pm2)
        self.prompt_ignore_length = _check_int(
            "prompt_ignore_length", self.prompt_ignore_length, 0, "None or an int >= 0"
        )
        self.no_repeat_ngram_size = _check_int(
            "no_repeat_ngram_size", self.no_repeat_ngram_size, 1, "None or an int > 0"
        )

    def _validate_words(self) -> None:
        self.stop = _check_strs("stop", self.stop)
        self.bad = _check_strs("bad", self.bad)
        self.stop_token_ids = _check_token_ids("stop_token_ids", self.stop_token_ids)
        self.bad_token_ids = _check_token_ids("bad_token_ids", self.bad_token_ids)
        self.include_stop_str_in_output = _check_bool("include_stop_str_in_output", self.include_stop_str_in_output)
        bias = self.embedding_bias
        if bias is not None and not (isinstance(bias, torch.Tensor) and bias.dim() == 1 and bias.is_floating_point()):
            raise _fail("embedding_bias", "None or a 1-D float tensor [vocab]", bias)
        procs = self.logits_processor
        if procs is not None:
            items = procs if isinstance(procs, (list, tuple)) else [procs]
            if not items or not all(callable(p) for p in items):
                raise _fail("logits_processor", "None, a callable or a list of callables", procs)
            if isinstance(procs, tuple):
                self.logits_processor = list(procs)

    def _validate_beams(self) -> None:
        self.n = _check_int("n", self.n, 1, "an int >= 1", optional=False)
        self.best_of = _check_int("best_of", self.best_of, self.n, f"None or an int >= n={self.n}")
        self.use_beam_search = _check_bool("use_beam_search", self.use_beam_search)
        self.beam_width = _check_int("beam_width", self.beam_width, 1, "an int >= 1", optional=False)
        if self.beam_width > 1:
            rule = f"equal to beam_width={self.beam_width} when both are set"
            if self.use_beam_search and self.best_of not in (None, self.beam_width):
                raise _fail("best_of", rule, self.best_of)
            if self.n > self.beam_width:
                raise _fail("n", f"<= beam_width={self.beam_width}", self.n)
        self.length_penalty = _check_float("length_penalty", self.length_penalty, "None or finite", lambda v: True)
        es = self.early_stopping
        if es is not None and es != "never" and not isinstance(es, numbers.Integral):
            raise _fail("early_stopping", "None, a bool, an int or 'never'", es)
        self.beam_search_diversity_rate = _check_float(
            "beam_search_diversity_rate",
            self.beam_search_diversity_rate,
            "None or >= 0",
            lambda v: v >= 0,
        )
        widths = self.beam_width_array
        if widths is not None:
            if not isinstance(widths, (list, tuple)) or not all(_is_int(w) and w >= 1 for w in widths):
                raise _fail("beam_width_array", "None or a list of ints >= 1", widths)
            self.beam_width_array = [int(w) for w in widths]
            if not widths or self.n > max(widths):
                raise _fail("beam_width_array", f"None or a non-empty list of ints >= 1, the largest >= n={self.n}",
                            widths)

    def _validate_outputs(self) -> None:
        self.logprobs = _check_logprobs("logprobs", self.logprobs)
        self.prompt_logprobs = _check_logprobs("prompt_logprobs", self.prompt_logprobs)
        mode = self.logprobs_mode
        if not isinstance(mode, str) or mode not in _LOGPROBS_MODES:
            raise _fail("logprobs_mode", "'raw' or 'processed'", mode)
        self.logprobs_mode = _LOGPROBS_MODES[mode]
        for name in (
            "return_context_logits",
            "return_generation_logits",
            "exclude_input_from_output",
            "detokenize",
            "add_special_tokens",
            "skip_special_tokens",
            "spaces_between_special_tokens",
        ):
            _check_bool(name, getattr(self, name))

    # ---- derived values ----

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding: no sampling knob set, or temperature 0, or top_k 1."""
        knobs = (self.temperature, self.top_k, self.top_p, self.min_p)
        return all(k is None for k in knobs) or self.temperature == 0 or self.top_k == 1

    @property
    def best_of_or_n(self) -> int:
        """How many sequences are generated (best_of, or n when best_of is None)."""
        return self.best_of if self.best_of is not None else self.n

    @property
    def effective_beam_width(self) -> int:
        """Beam width: beam_width if > 1, else best_of (or n) under use_beam_search, else 1; with
        beam_width_array, the largest of that and the array (the width the request needs at its widest)."""
        if self.beam_width > 1:
            width = self.beam_width
        elif self.use_beam_search:
            width = self.best_of_or_n
        else:
            width = 1
        return max(width, *self.beam_width_array) if self.beam_width_array else width

    @property
    def logprobs_k(self) -> int | None:
        """Top-K logprobs asked per generated token (0 = sampled token only), None = not asked."""
        return self.logprobs

    @property
    def top_p_reset_id_set(self) -> frozenset[int]:
        """The ids that reset a decayed top_p (top_p_reset_ids as a set)."""
        ids = self.top_p_reset_ids
        if ids is None:
            return frozenset()
        return frozenset([ids]) if isinstance(ids, int) else frozenset(ids)
