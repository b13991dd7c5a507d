"""The LLM API: `from quanta.llmapi import LLM, SamplingParams, QuantConfig, ...`."""

from quanta.config import (
    BuildConfig,
    CalibConfig,
    CapacitySchedulerPolicy,
    ContextChunkingPolicy,
    KvCacheConfig,
    PeftCacheConfig,
    QuantAlgo,
    QuantConfig,
    SchedulerConfig,
)
from quanta.llmapi.llm import LLM
from quanta.llmapi.request_output import RequestError, RequestOutput
from quanta.lora.config import LoraConfig, LoRARequest
from quanta.outputs import CompletionOutput, Logprob
from quanta.sampling_params import SamplingParams

__all__ = [
    "LLM", "SamplingParams", "QuantConfig", "QuantAlgo", "BuildConfig", "KvCacheConfig", "SchedulerConfig",
    "CalibConfig", "CapacitySchedulerPolicy", "ContextChunkingPolicy", "PeftCacheConfig", "RequestOutput",
    "CompletionOutput", "Logprob", "RequestError", "LoraConfig", "LoRARequest",
]
