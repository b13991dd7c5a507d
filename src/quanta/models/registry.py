"""Architecture name (config.architectures[0]) -> model class, imported on demand."""

from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("quanta.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("quanta.models.mistral", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("quanta.models.qwen2", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("quanta.models.qwen3", "Qwen3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def resolve_model_class(config):
    archs = getattr(config, "architectures", None) or []
    for arch in archs:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(
        f"unsupported architecture {archs or '(config.architectures missing)'}; "
        f"supported: {', '.join(supported_architectures())}"
    )
