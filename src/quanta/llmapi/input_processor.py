"""Prompts in, validated Requests out: tokenize, check ids and limits, resolve end ids and bad words."""

from __future__ import annotations

import numbers

from quanta.config import EngineConfig
from quanta.engine.request import Request
from quanta.sampling_params import SamplingParams


def _is_token_id(t) -> bool:
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def is_single_prompt(inputs) -> bool:
    """One prompt (str, dict, list/tuple of token ids) vs a batch (list/tuple of prompts).

    Anything that is not a list or tuple counts as one prompt, so that a wrong type (None, an int ...)
    gets `tokenize`'s clear error instead of a TypeError. An empty list is an (empty, rejected) prompt.
    """
    if not isinstance(inputs, (list, tuple)):
        return True
    return len(inputs) == 0 or all(_is_token_id(t) for t in inputs)


class InputProcessor:
    def __init__(self, tokenizer, config: EngineConfig, vocab_size: int, default_eos: list[int]):
        self.tokenizer = tokenizer
        self.config = config
        self.vocab_size = vocab_size
        self.default_eos = default_eos

    def tokenize(self, inputs, params: SamplingParams, skip_tokenizer_init: bool) -> tuple[str | None, list[int]]:
        if isinstance(inputs, dict):
            if "prompt_token_ids" in inputs:
                inputs = inputs["prompt_token_ids"]
            elif "prompt" in inputs:
                inputs = inputs["prompt"]
            else:
                raise ValueError("a dict prompt needs a 'prompt' or 'prompt_token_ids' key, "
                                 f"got keys {sorted(inputs)}")
        if isinstance(inputs, str):
            if skip_tokenizer_init or self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer, but skip_tokenizer_init=True: pass token ids")
            if not inputs:
                raise ValueError("the prompt is empty: give a non-empty str or at least one token id")
            prompt, ids = inputs, self.tokenizer.encode(inputs, add_special_tokens=params.add_special_tokens)
        elif isinstance(inputs, (list, tuple)):
            prompt, ids = None, list(inputs)
        else:
            raise ValueError("a prompt must be a str, a list of token ids (int) or a dict, "
                             f"got {type(inputs).__name__}: {inputs!r:.80}")
        ids = self._check_ids(ids)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens :]
        return prompt, ids

    def _check_ids(self, ids: list) -> list[int]:
        if not ids:
            raise ValueError("the prompt is empty: give a non-empty str or at least one token id")
        for t in ids:
            if not _is_token_id(t):
                raise ValueError(f"prompt token ids must be ints, got {t!r} ({type(t).__name__})")
            if t < 0 or t >= self.vocab_size:
                raise ValueError(f"prompt token id {t} is out of range [0, {self.vocab_size})")
        return [int(t) for t in ids]  # numpy / torch integers become plain ints

    def check_limits(self, ids: list[int], params: SamplingParams) -> None:
        c, n = self.config, len(ids)
        if n > c.max_input_len:
            raise ValueError(f"prompt has {n} tokens, more than max_input_len={c.max_input_len}")
        if n + params.max_tokens > c.max_seq_len:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) = {n + params.max_tokens} exceeds "
                f"max_seq_len={c.max_seq_len}; lower max_tokens or shorten the prompt")
        if n > c.max_num_tokens and not c.enable_chunked_prefill:
            raise ValueError(f"prompt has {n} tokens, more than max_num_tokens={c.max_num_tokens}; "
                             "raise max_num_tokens or set enable_chunked_prefill=True")
        kv_tokens = c.num_kv_blocks * c.tokens_per_block
        need = -(-min(n + params.max_tokens, c.max_seq_len) // c.tokens_per_block) * c.tokens_per_block
        if c.num_kv_blocks and need > kv_tokens:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) needs {need} tokens of KV cache but the "
                f"cache holds {kv_tokens}; lower max_tokens or raise KvCacheConfig.max_tokens")
        width = params.effective_beam_width
        if width > c.max_beam_width:  # any width up to max_beam_width is fine (TensorRT-LLM wants equality)
            field = ("beam_width" if params.beam_width > 1 else "use_beam_search with best_of/n"
                     if params.use_beam_search else "beam_width_array")
            raise ValueError(f"SamplingParams.{field}: beam width {width} > max_beam_width={c.max_beam_width}; "
                             "raise max_beam_width (LLM argument or BuildConfig)")
        if width > c.max_batch_size:  # a request's beams run in the same batch
            raise ValueError(f"beam width {width} > max_batch_size={c.max_batch_size}: raise max_batch_size")
        if width > 1 and c.num_kv_blocks:
            bs, shared = c.tokens_per_block, n // c.tokens_per_block
            blocks = shared + width * (-(-min(n + params.max_tokens, c.max_seq_len) // bs) - shared)
            if blocks > c.num_kv_blocks:
                raise ValueError(
                    f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) with {width} beams needs "
                    f"{blocks * bs} tokens of KV cache but the cache holds {kv_tokens}; lower max_tokens or "
                    "the beam width, or raise KvCacheConfig.max_tokens")
        if params.guided_decoding is not None:
            raise ValueError("SamplingParams.guided_decoding is not supported yet in quanta")
        if (params.stop or params.bad) and self.tokenizer is None:
            raise ValueError("SamplingParams.stop / bad strings need a tokenizer (skip_tokenizer_init=True)")
        for name in ("stop_token_ids", "bad_token_ids"):
            for t in getattr(params, name) or []:
                if t >= self.vocab_size:
                    raise ValueError(f"SamplingParams.{name} has id {t}, out of range [0, {self.vocab_size})")
        if params.end_id is not None and not -1 <= params.end_id < self.vocab_size:
            raise ValueError(f"SamplingParams.end_id {params.end_id} is out of range [0, {self.vocab_size}) "
                             "(or -1: no end token)")
        ids = params.top_p_reset_ids
        for t in [ids] if isinstance(ids, int) else ids or []:
            if t >= self.vocab_size:
                raise ValueError(f"SamplingParams.top_p_reset_ids has id {t}, out of range [0, {self.vocab_size})")
        bias = params.embedding_bias
        if bias is not None and bias.numel() > self.vocab_size:
            # NOTE: checked here, before the engine thread: the sampler would fail mid-step.
            raise ValueError(f"SamplingParams.embedding_bias has {bias.numel()} entries, more than the "
                             f"model's vocab size {self.vocab_size}")

    def make_request(self, request_id: int, prompt: str | None, ids: list[int], params: SamplingParams) -> Request:
        self.check_limits(ids, params)
        # end_id=-1: no end token at all (TensorRT-LLM's spelling of ignore_eos)
        eos = list(self.default_eos) if params.end_id is None else [] if params.end_id == -1 else [params.end_id]
        bad = [[t] for t in params.bad_token_ids or []]
        for word in params.bad or []:
            for variant in (word, " " + word):
                tok = self.tokenizer.encode(variant, add_special_tokens=False)
                if tok and tok not in bad:
                    bad.append(tok)
        return Request(
            request_id=request_id, prompt=prompt, prompt_token_ids=ids, params=params,
            max_seq_len=self.config.max_seq_len, eos_token_ids=eos,
            stop_token_ids=list(params.stop_token_ids or []), bad_words_ids=bad,
        )
