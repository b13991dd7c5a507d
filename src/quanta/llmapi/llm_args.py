"""LLM(...) keyword arguments: the allowed names, the did-you-mean error, and the merge into BuildConfig."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from quanta.config import (
    BuildConfig,
    CalibConfig,
    KvCacheConfig,
    PeftCacheConfig,
    QuantConfig,
    SchedulerConfig,
    unknown_field_error,
)

_BUILD_FIELDS = ("max_batch_size", "max_num_tokens", "max_input_len", "max_seq_len", "max_beam_width")


@dataclass
class LlmArgs:
    build_config: BuildConfig = field(default_factory=BuildConfig)
    quant_config: QuantConfig = field(default_factory=QuantConfig)
    calib_config: CalibConfig = field(default_factory=CalibConfig)
    kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    peft_cache_config: PeftCacheConfig | None = None
    enable_lora: bool = False
    lora_config: Any = None
    max_batch_size: int | None = None
    max_num_tokens: int | None = None
    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_beam_width: int | None = None
    enable_chunked_prefill: bool = False
    generation_config: str = "trtllm"
    enable_tqdm: bool = False
    return_perf_metrics: bool = False
    # quanta's own
    load_format: str = "auto"  # 'auto' (checkpoint) | 'dummy' (random weights of the config's shape)
    device: str | None = None  # default: cuda when available, else cpu
    attn_backend: str | None = None  # default: 'triton' on cuda, 'torch_ref' on cpu
    enforce_eager: bool = False  # no CUDA graphs
    # TensorRT-LLM's overlap scheduler: None = on for CUDA, off on a CPU (no gain there; QUANTA_OVERLAP=1 forces it)
    disable_overlap_scheduler: bool | None = None
    disable_kernels: bool = False  # PyTorch reference ops instead of the fused Triton ones (GPU)
    allow_pickle_weights: bool = False
    seed: int | None = None

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> LlmArgs:
        unknown_field_error("LLM", kwargs, set(cls.__dataclass_fields__))
        args = cls(**kwargs)
        args._check_types()
        args._merge_build_config()
        return args

    def _check_types(self) -> None:
        expected = {
            "build_config": BuildConfig, "quant_config": QuantConfig, "calib_config": CalibConfig,
            "kv_cache_config": KvCacheConfig, "scheduler_config": SchedulerConfig,
        }
        for name, typ in expected.items():
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, typ.from_dict(value))
            elif not isinstance(value, typ):
                raise ValueError(f"LLM {name} must be a {typ.__name__} (or a dict), got {type(value).__name__}")
        from quanta.lora.config import LoraConfig

        for name, typ in (("lora_config", LoraConfig), ("peft_cache_config", PeftCacheConfig)):  # optional ones
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, typ.from_dict(value))
            elif value is not None and not isinstance(value, typ):
                raise ValueError(f"LLM {name} must be a {typ.__name__} (or a dict) or None, got {type(value).__name__}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"LLM load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        for name in ("enable_lora", "enable_chunked_prefill", "enable_tqdm", "return_perf_metrics", "enforce_eager",
                     "disable_kernels", "allow_pickle_weights"):
            _check_bool(f"LLM {name}", getattr(self, name, False))
        if self.disable_overlap_scheduler is not None:
            _check_bool("LLM disable_overlap_scheduler", self.disable_overlap_scheduler)
        for name in ("device", "attn_backend", "generation_config"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"LLM {name} must be a str, got {type(value).__name__}: {value!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"LLM device must be a torch device string such as 'cpu' or 'cuda:0', "
                                 f"got {self.device!r}") from None
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"LLM seed must be None or an int, got {self.seed!r}")
        kv = self.kv_cache_config
        if kv.max_tokens is not None and kv.max_tokens < kv.tokens_per_block:
            raise ValueError(f"KvCacheConfig.max_tokens={kv.max_tokens} is less than one block "
                             f"(tokens_per_block={kv.tokens_per_block})")

    def _merge_build_config(self) -> None:
        """Explicit LLM kwargs win over build_config; the result is validated like a BuildConfig."""
        bc = BuildConfig(**self.build_config.to_dict())
        for name in _BUILD_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(bc, name, value)
        bc.__post_init__()
        self.build_config = bc

    def check_supported(self, tensor_parallel_size: int) -> None:
        """Arguments whose feature has not landed yet: a clear error, never silently ignored."""
        todo = []
        if tensor_parallel_size != 1:
            todo.append(f"tensor_parallel_size={tensor_parallel_size}")
        if self.build_config.max_draft_len:
            todo.append("max_draft_len (speculative decoding)")
        if todo:
            raise ValueError(f"not supported yet in quanta: {', '.join(todo)}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}: {value!r}")


def check_llm_arguments(model, tokenizer, skip_tokenizer_init, trust_remote_code, tensor_parallel_size,
                        revision, tokenizer_revision) -> None:
    """Types of LLM's named arguments (the kwargs are checked by LlmArgs)."""
    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"LLM model must be a folder path or a Hugging Face Hub id (str), "
                         f"got {type(model).__name__}: {model!r:.80}")
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) and not (
            callable(getattr(tokenizer, "encode", None)) and callable(getattr(tokenizer, "decode", None))):
        raise ValueError("LLM tokenizer must be None, a folder path / Hub id, or an object with encode() and "
                         f"decode(), got {type(tokenizer).__name__}: {tokenizer!r:.80}")
    _check_bool("LLM skip_tokenizer_init", skip_tokenizer_init)
    _check_bool("LLM trust_remote_code", trust_remote_code)
    if not isinstance(tensor_parallel_size, int) or isinstance(tensor_parallel_size, bool) or tensor_parallel_size < 1:
        raise ValueError(f"LLM tensor_parallel_size must be an int >= 1, got {tensor_parallel_size!r}")
    for name, value in (("revision", revision), ("tokenizer_revision", tokenizer_revision)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"LLM {name} must be None or a str, got {type(value).__name__}: {value!r}")


_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype, hf_config, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        cfg = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.bfloat16
        cfg = _DTYPES.get(cfg, cfg) if isinstance(cfg, str) else cfg
        return cfg if cfg in (torch.float16, torch.bfloat16, torch.float32) else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"LLM dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]
