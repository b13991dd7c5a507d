"""Typed configuration dataclasses (the LLM API's names and defaults), validated at construction."""

from __future__ import annotations

import difflib
import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any


class StrEnum(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class QuantAlgo(StrEnum):
    W8A16 = "W8A16"
    W4A16 = "W4A16"
    W4A16_AWQ = "W4A16_AWQ"
    W4A8_AWQ = "W4A8_AWQ"
    W8A16_GPTQ = "W8A16_GPTQ"
    W4A16_GPTQ = "W4A16_GPTQ"
    W8A8_SQ_PER_CHANNEL = "W8A8_SQ_PER_CHANNEL"
    W8A8_SQ_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN"
    W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN = "W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN"
    W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN = "W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN"
    FP8 = "FP8"
    FP8_PER_CHANNEL_PER_TOKEN = "FP8_PER_CHANNEL_PER_TOKEN"
    FP8_BLOCK_SCALES = "FP8_BLOCK_SCALES"
    INT8 = "INT8"
    NVFP4 = "NVFP4"
    MIXED_PRECISION = "MIXED_PRECISION"
    NO_QUANT = "NO_QUANT"


class CapacitySchedulerPolicy(StrEnum):
    GUARANTEED_NO_EVICT = "GUARANTEED_NO_EVICT"
    MAX_UTILIZATION = "MAX_UTILIZATION"
    STATIC_BATCH = "STATIC_BATCH"


class ContextChunkingPolicy(StrEnum):
    FIRST_COME_FIRST_SERVED = "FIRST_COME_FIRST_SERVED"
    EQUAL_PROGRESS = "EQUAL_PROGRESS"


def _check(cond: bool, owner: str, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ValueError(f"{owner}.{name} must be {allowed}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_positive_int(owner: str, name: str, value: Any, optional: bool = True, minimum: int = 1) -> None:
    if value is None and optional:
        return
    _check(_is_int(value) and value >= minimum, owner, name, value, f"an int >= {minimum}")


class _DictMixin:
    """from_dict / to_dict / update shared by the config dataclasses."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        unknown_field_error(cls.__name__, data, {f.name for f in fields(cls)})
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def update(self, **kwargs: Any):
        unknown_field_error(type(self).__name__, kwargs, {f.name for f in fields(self)})
        for k, v in kwargs.items():
            setattr(self, k, v)
        self.__post_init__()
        return self


def unknown_field_error(owner: str, given: dict[str, Any], valid: set[str]) -> None:
    for key in given:
        if key not in valid:
            near = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"{owner} got an unknown argument {key!r}{hint} Valid: {', '.join(sorted(valid))}")


@dataclass
class BuildConfig(_DictMixin):
    """Engine limits. Mutable like TensorRT-LLM's; 'building' = load, quantize, capture CUDA graphs."""

    max_input_len: int | None = None
    max_seq_len: int | None = None
    max_batch_size: int = 2048
    max_beam_width: int = 1
    max_num_tokens: int = 8192
    opt_num_tokens: int | None = None
    gather_context_logits: bool = False
    gather_generation_logits: bool = False
    max_draft_len: int = 0

    def __post_init__(self) -> None:
        o = "BuildConfig"
        for name in ("max_input_len", "max_seq_len", "opt_num_tokens"):
            _check_positive_int(o, name, getattr(self, name))
        for name in ("max_batch_size", "max_beam_width", "max_num_tokens"):
            _check_positive_int(o, name, getattr(self, name), optional=False)
        _check_positive_int(o, "max_draft_len", self.max_draft_len, optional=False, minimum=0)


@dataclass
class KvCacheConfig(_DictMixin):
    free_gpu_memory_fraction: float = 0.9
    max_tokens: int | None = None
    max_gpu_total_bytes: int = 0
    tokens_per_block: int = 32
    enable_block_reuse: bool = True
    enable_partial_reuse: bool = True
    host_cache_size: int | None = None
    max_attention_window: int | list[int] | None = None
    dtype: str = "auto"

    def __post_init__(self) -> None:
        o = "KvCacheConfig"
        f = self.free_gpu_memory_fraction
        _check(isinstance(f, (int, float)) and 0.0 < f <= 1.0, o, "free_gpu_memory_fraction", f, "in (0, 1]")
        _check_positive_int(o, "max_tokens", self.max_tokens)
        _check_positive_int(o, "max_gpu_total_bytes", self.max_gpu_total_bytes, optional=False, minimum=0)
        _check_positive_int(o, "tokens_per_block", self.tokens_per_block, optional=False)
        _check(self.dtype in ("auto", "fp8", "int8"), o, "dtype", self.dtype, "one of 'auto', 'fp8', 'int8'")
        for name in ("enable_block_reuse", "enable_partial_reuse"):
            _check(isinstance(getattr(self, name), bool), o, name, getattr(self, name), "a bool")
        _check_positive_int(o, "host_cache_size", self.host_cache_size, minimum=0)
        w = self.max_attention_window
        windows = w if isinstance(w, (list, tuple)) else [w]
        _check(w is None or (len(windows) > 0 and all(_is_int(x) and x >= 1 for x in windows)), o,
               "max_attention_window", w, "None, an int >= 1, or a non-empty list of them (one per layer, repeated)")


@dataclass
class SchedulerConfig(_DictMixin):
    capacity_scheduler_policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT
    context_chunking_policy: ContextChunkingPolicy | None = None

    def __post_init__(self) -> None:
        try:
            self.capacity_scheduler_policy = CapacitySchedulerPolicy(self.capacity_scheduler_policy)
        except ValueError:
            allowed = ", ".join(p.value for p in CapacitySchedulerPolicy)
            raise ValueError(
                f"SchedulerConfig.capacity_scheduler_policy must be one of {allowed}, "
                f"got {self.capacity_scheduler_policy!r}"
            ) from None
        if self.context_chunking_policy is not None:
            self.context_chunking_policy = ContextChunkingPolicy(self.context_chunking_policy)


@dataclass
class QuantConfig(_DictMixin):
    quant_algo: QuantAlgo | None = None
    kv_cache_quant_algo: QuantAlgo | None = None
    group_size: int = 128
    smoothquant_val: float = 0.5
    has_zero_point: bool = False
    pre_quant_scale: bool = False
    exclude_modules: list[str] | None = None

    def __post_init__(self) -> None:
        for name in ("quant_algo", "kv_cache_quant_algo"):
            v = getattr(self, name)
            if v is not None:
                try:
                    setattr(self, name, QuantAlgo(v))
                except ValueError:
                    raise ValueError(
                        f"QuantConfig.{name} must be a QuantAlgo ({', '.join(a.value for a in QuantAlgo)}), got {v!r}"
                    ) from None

    @property
    def requested(self) -> bool:
        return self.quant_algo not in (None, QuantAlgo.NO_QUANT) or self.kv_cache_quant_algo not in (
            None,
            QuantAlgo.NO_QUANT,
        )


@dataclass
class CalibConfig(_DictMixin):
    device: str = "cuda"
    calib_dataset: str = "cnn_dailymail"
    calib_batches: int = 512
    calib_batch_size: int = 1
    calib_max_seq_length: int = 512
    random_seed: int = 1234
    tokenizer_max_seq_length: int = 2048

    def __post_init__(self) -> None:
        for name in ("calib_batches", "calib_batch_size", "calib_max_seq_length", "tokenizer_max_seq_length"):
            _check_positive_int("CalibConfig", name, getattr(self, name), optional=False)


@dataclass
class PeftCacheConfig(_DictMixin):
    num_host_module_layer: int = 0
    num_device_module_layer: int = 0
    optimal_adapter_size: int = 8
    max_adapter_size: int = 64
    host_cache_size: int | None = None
    device_cache_percent: float | None = None

    def __post_init__(self) -> None:
        pass


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, resolved once from the LLM arguments (frozen)."""

    max_batch_size: int
    max_num_tokens: int
    max_seq_len: int
    max_input_len: int
    max_beam_width: int
    tokens_per_block: int
    num_kv_blocks: int
    enable_chunked_prefill: bool
    scheduler_policy: CapacitySchedulerPolicy
    gather_context_logits: bool = False
    gather_generation_logits: bool = False
    context_chunking_policy: ContextChunkingPolicy | None = None  # None = FIRST_COME_FIRST_SERVED
    enable_block_reuse: bool = False
    enable_partial_reuse: bool = False
    num_host_kv_blocks: int = 0  # host-tier blocks for evicted reusable blocks (KvCacheConfig.host_cache_size)
    # Launch step N+1 before step N's tokens reach the host (engine/engine.py: overlap); plain greedy only
    overlap_scheduler: bool = False
    extra: dict = field(default_factory=dict)
