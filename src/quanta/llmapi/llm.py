"""The public face: LLM (TensorRT-LLM's LLM API) on the quanta engine. Thin; no engine logic here."""

from __future__ import annotations

import itertools
import shutil
import time
from pathlib import Path
from typing import Any

from quanta.engine.async_loop import EngineLoop
from quanta.llmapi.input_processor import InputProcessor, is_single_prompt
from quanta.llmapi.llm_args import LlmArgs, check_llm_arguments
from quanta.llmapi.request_output import RequestOutput
from quanta.sampling_params import SamplingParams


class LLM:
    """An LLM engine over a Hugging Face checkpoint.

    Differences from TensorRT-LLM (limitations lifted): no engine build; `max_input_len` defaults to
    max_seq_len instead of 1024; any beam width <= max_beam_width is allowed per request.
    """

    def __init__(self, model, tokenizer=None, tokenizer_mode: str = "auto", skip_tokenizer_init: bool = False,
                 trust_remote_code: bool = False, tensor_parallel_size: int = 1, dtype: str = "auto",
                 revision: str | None = None, tokenizer_revision: str | None = None, **kwargs: Any):
        check_llm_arguments(model, tokenizer, skip_tokenizer_init, trust_remote_code, tensor_parallel_size,
                            revision, tokenizer_revision)
        self.args = LlmArgs.from_kwargs(kwargs)
        self.args.check_supported(tensor_parallel_size)
        if tokenizer_mode not in ("auto", "slow"):
            raise ValueError(f"LLM tokenizer_mode must be 'auto' or 'slow', got {tokenizer_mode!r}")
        self._loop: EngineLoop | None = None
        from quanta.builder import build, load_config_only
        from quanta.tokenizer import default_eos_ids, load_tokenizer

        self.model = model
        _, path = load_config_only(model, revision, trust_remote_code)
        self._tokenizer = None
        if not skip_tokenizer_init:
            self._tokenizer = load_tokenizer(tokenizer if tokenizer is not None else path, tokenizer_mode,
                                             trust_remote_code, tokenizer_revision)
        built = build(model, self.args, dtype, revision, trust_remote_code, self._tokenizer)
        self._built = built
        self.engine_config = built.config
        self._input = InputProcessor(self._tokenizer, built.config, built.hf_config.vocab_size,
                                     default_eos_ids(self._tokenizer, built.hf_config, path))
        self._loop = EngineLoop(built.engine)
        self._ids = itertools.count()

    # --- properties -----------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._input.tokenizer = tokenizer
        self._built.engine.tokenizer = tokenizer

    @property
    def engine(self):
        return self._built.engine

    # --- generation -----------------------------------------------------------------------------
    def generate_async(self, inputs, sampling_params: SamplingParams | None = None, streaming: bool = False,
                       lora_request=None, skip_tokenizer_init: bool = False, cache_salt: str | None = None,
                       **kwargs: Any) -> RequestOutput:
        """Submit one prompt; returns its RequestOutput (a future) at once. Not a coroutine.

        cache_salt: only requests with the same salt share cached KV blocks (prefix reuse), so one
        tenant cannot probe another's prompts through time to first token."""
        _reject_unsupported(lora_request, kwargs)
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be None or a str, got {type(cache_salt).__name__}: {cache_salt!r:.80}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        skip = skip_tokenizer_init or self._tokenizer is None
        prompt, ids = self._input.tokenize(inputs, params, skip)
        if skip and params.detokenize:
            params = _without_detokenize(params)
        request_id = next(self._ids)
        adapter = self._resolve_lora(lora_request)
        req = self._input.make_request(request_id, prompt, ids, params)
        req.cache_salt = cache_salt
        if adapter is not None:  # the adapter id also salts the prefix-cache hash
            req.lora_request, req.lora_adapter, req.adapter_id = lora_request, adapter, lora_request.lora_int_id
        handle = RequestOutput(request_id, prompt, ids, params.n, self._loop, streaming)
        self._loop.submit(req, handle, streaming)
        return handle

    def generate(self, inputs, sampling_params=None, use_tqdm: bool = True, lora_request=None,
                 skip_tokenizer_init: bool = False, cache_salt: str | list[str | None] | None = None,
                 **kwargs: Any):
        """One prompt in, one RequestOutput out; a list of prompts in, a list out (same order).
        cache_salt: one for every prompt, or a list with one per prompt (see generate_async).
        lora_request: one LoRARequest (or None) for every prompt, or a list with one per prompt."""
        single = is_single_prompt(inputs)
        prompts = [inputs] if single else list(inputs)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(prompts):
                raise ValueError(f"got {len(sampling_params)} sampling_params for {len(prompts)} prompts")
            params_list = sampling_params
        else:
            params_list = [sampling_params] * len(prompts)
        if isinstance(cache_salt, (list, tuple)):
            if len(cache_salt) != len(prompts):
                raise ValueError(f"got {len(cache_salt)} cache_salt values for {len(prompts)} prompts")
            salts = list(cache_salt)
        else:
            salts = [cache_salt] * len(prompts)
        if isinstance(lora_request, (list, tuple)):
            if len(lora_request) != len(prompts):
                raise ValueError(f"got {len(lora_request)} lora_request values for {len(prompts)} prompts")
            loras = list(lora_request)
        else:
            loras = [lora_request] * len(prompts)
        futures: list[RequestOutput] = []
        try:
            for p, sp, salt, lora in zip(prompts, params_list, salts, loras):
                futures.append(self.generate_async(p, sp, lora_request=lora,
                                                   skip_tokenizer_init=skip_tokenizer_init, cache_salt=salt, **kwargs))
            results = self._wait_all(futures, use_tqdm and len(futures) > 1)
        except BaseException:  # Ctrl-C or a bad prompt in the list: nothing keeps running
            for f in futures:
                f.abort()
            raise
        return results[0] if single else results

    def _resolve_lora(self, lora_request):
        """The loaded adapter of a LoRARequest (None: the base model); a bad adapter raises here."""
        if lora_request is None:
            return None
        manager = getattr(self._built.engine.runner, "lora", None)
        if manager is None:
            raise ValueError("lora_request given but LoRA is not enabled: create the LLM with enable_lora=True "
                             "or lora_config=LoraConfig(...)")
        return manager.resolve(lora_request)

    def _wait_all(self, futures: list[RequestOutput], use_tqdm: bool) -> list[RequestOutput]:
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(futures), desc="Processed requests", dynamic_ncols=True)
        try:
            for f in futures:
                f.result()
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return futures

    # --- stats and lifecycle --------------------------------------------------------------------
    def get_stats(self, timeout: float = 2) -> list[dict]:
        """Per-iteration stats gathered since the last call (waits up to `timeout` s for one)."""
        stats = self._built.engine.stats
        deadline = time.monotonic() + (timeout or 0)
        while not stats and time.monotonic() < deadline:
            time.sleep(0.01)
        out = []
        while stats:
            out.append(stats.popleft())
        return out

    async def get_stats_async(self, timeout: float = 2):
        import asyncio

        stats = self._built.engine.stats
        deadline = time.monotonic() + (timeout or 0)
        while not stats and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        while stats:
            yield stats.popleft()

    def save(self, save_dir: str | Path) -> None:
        """Write a self-contained folder (config, weights, tokenizer) that loads as it is.

        A quantized model is written as it runs (quantized weights, folded scales, KV-cache scales, and a
        `quantization_config` in config.json): loading the folder skips calibration, same outputs."""
        src, dst = self._built.model_path, Path(save_dir)
        net = self._built.engine.runner.model
        if getattr(net, "quant_state", None) is not None:
            from quanta.quantization.checkpoint import save_quantized

            save_quantized(net, self._built.hf_config, dst, src)
            if self._tokenizer is not None and hasattr(self._tokenizer, "save_pretrained"):
                self._tokenizer.save_pretrained(str(dst))
            return
        if src is None:
            raise ValueError("a model built from a config with dummy weights has no checkpoint to save")
        dst.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.suffix in (".json", ".safetensors", ".model", ".txt", ".jinja"):
                shutil.copy2(f, dst / f.name)
        if self._tokenizer is not None:
            self._tokenizer.save_pretrained(str(dst))

    def shutdown(self) -> None:
        if self._loop is not None:
            self._loop.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __del__(self) -> None:
        # Not shutdown(): a RequestOutput may outlive its LLM (`LLM(m).generate_async(p).result()`), so
        # the loop finishes what was submitted, then its thread exits. Does not block the collector.
        try:
            if self._loop is not None:
                self._loop.close_when_idle()
        except Exception:
            pass


def _reject_unsupported(lora_request, kwargs: dict) -> None:
    ignored_when_none = ("prompt_adapter_request", "kv_cache_retention_config", "disaggregated_params",
                         "queries", "postproc_params", "scheduling_params")
    for k, v in kwargs.items():
        if k not in ignored_when_none:
            raise ValueError(f"generate got an unknown argument {k!r}")
        if v is not None:
            raise ValueError(f"generate argument {k!r} is not supported yet in quanta")


def _without_detokenize(params: SamplingParams) -> SamplingParams:
    from dataclasses import replace

    return replace(params, detokenize=False)
