"""LoraConfig (engine side: which modules, how big, how many adapters) and LoRARequest (per request).

Field names and defaults are TensorRT-LLM's (`tensorrt_llm.lora_manager.LoraConfig`,
`tensorrt_llm.executor.request.LoRARequest`). Module names may be given in TensorRT-LLM's spelling
(`attn_q`, `mlp_h_to_4h`, ...) or Hugging Face's (`q_proj`, `gate_proj`, ...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from quanta.config import _DictMixin

# The projections quanta applies LoRA to (Hugging Face names, as PEFT adapters name them).
HF_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# TensorRT-LLM module name -> Hugging Face module name (TensorRT-LLM's default mapping).
TRTLLM_TO_HF = {
    "attn_q": "q_proj",
    "attn_k": "k_proj",
    "attn_v": "v_proj",
    "attn_dense": "o_proj",
    "mlp_h_to_4h": "gate_proj",
    "mlp_4h_to_h": "down_proj",
    "mlp_gate": "up_proj",
}
_GROUPS = {  # fused names expand to their parts
    "attn_qkv": ("q_proj", "k_proj", "v_proj"), "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "mlp_gate_up": ("gate_proj", "up_proj"), "gate_up_proj": ("gate_proj", "up_proj"),
    "all-linear": HF_TARGETS,
}


def hf_target_names(names, mapping: dict[str, str] | None = None) -> list[str]:
    """Normalize module names (TensorRT-LLM or Hugging Face spelling) to Hugging Face names."""
    table = dict(TRTLLM_TO_HF)
    table.update(mapping or {})
    out: list[str] = []
    for name in names:
        hf = table.get(name, name)
        parts = _GROUPS.get(hf, (hf,))
        for p in parts:
            if p not in HF_TARGETS:
                allowed = ", ".join(list(HF_TARGETS) + list(TRTLLM_TO_HF) + list(_GROUPS))
                raise ValueError(f"LoraConfig.lora_target_modules: unknown module {name!r}; known: {allowed}")
            if p not in out:
                out.append(p)
    return out


@dataclass
class LoraConfig(_DictMixin):
    """LoRA settings of an engine.

    - lora_dir: adapters checked (and kept loaded) at start; when lora_target_modules is empty, the
      modules they target are the ones LoRA is applied to.
    - max_lora_rank: the largest adapter rank accepted (weights are stacked padded to it).
    - lora_target_modules: modules LoRA may touch (empty: those of lora_dir, or all seven projections).
    - max_loras: adapters resident on the device at once (= the most distinct adapters in one batch);
      None: from PeftCacheConfig.num_device_module_layer when set, else 4.
    - max_cpu_loras: adapters kept loaded in host memory (least recently used evicted); None: from
      PeftCacheConfig.num_host_module_layer when set, else max(max_loras, 4).

    Differences from TensorRT-LLM (limitations lifted): lora_dir may be empty without naming target modules;
    an adapter of any rank up to max_lora_rank and any subset of the target modules mixes with others
    in one batch.
    """

    lora_dir: list[str] = field(default_factory=list)
    lora_ckpt_source: str = "hf"
    max_lora_rank: int = 64
    lora_target_modules: list[str] = field(default_factory=list)
    trtllm_modules_to_hf_modules: dict[str, str] = field(default_factory=dict)
    max_loras: int | None = None
    max_cpu_loras: int | None = None
    swap_gate_up_proj_lora_b_weight: bool = True  # accepted for compatibility; HF adapters keep gate, up apart

    def __post_init__(self) -> None:
        o = "LoraConfig"
        if isinstance(self.lora_dir, (str, os.PathLike)):
            self.lora_dir = [self.lora_dir]
        if not isinstance(self.lora_dir, (list, tuple)) or not all(
                isinstance(d, (str, os.PathLike)) for d in self.lora_dir):
            raise ValueError(f"{o}.lora_dir must be a list of adapter folders, got {self.lora_dir!r}")
        self.lora_dir = [str(d) for d in self.lora_dir]
        if self.lora_ckpt_source != "hf":
            raise ValueError(f"{o}.lora_ckpt_source must be 'hf' (Hugging Face PEFT adapters; NeMo checkpoints "
                             f"are not supported in quanta), got {self.lora_ckpt_source!r}")
        _int(o, "max_lora_rank", self.max_lora_rank, optional=False)
        _int(o, "max_loras", self.max_loras)
        _int(o, "max_cpu_loras", self.max_cpu_loras)
        if isinstance(self.lora_target_modules, str):
            self.lora_target_modules = [self.lora_target_modules]
        if not isinstance(self.trtllm_modules_to_hf_modules, dict):
            raise ValueError(f"{o}.trtllm_modules_to_hf_modules must be a dict, "
                             f"got {self.trtllm_modules_to_hf_modules!r}")
        hf_target_names(self.lora_target_modules, self.trtllm_modules_to_hf_modules)  # validates the names
        if not isinstance(self.swap_gate_up_proj_lora_b_weight, bool):
            raise ValueError(f"{o}.swap_gate_up_proj_lora_b_weight must be a bool")

    @property
    def hf_target_modules(self) -> list[str]:
        return hf_target_names(self.lora_target_modules, self.trtllm_modules_to_hf_modules)


def _int(owner: str, name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{owner}.{name} must be an int >= 1{' or None' if optional else ''}, got {value!r}")


@dataclass
class LoRARequest:
    """Which adapter a request runs with: `LoRARequest(lora_name, lora_int_id, lora_path)`.

    lora_int_id identifies the adapter (the caches key on it, and it salts the prefix cache, so KV blocks
    computed under one adapter are never reused under another); one id must always name the same folder.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    lora_ckpt_source: str = "hf"

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str):
            raise ValueError(f"LoRARequest.lora_name must be a str, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool):
            raise ValueError(f"LoRARequest.lora_int_id must be an int, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise ValueError(f"LoRARequest.lora_path must be a folder path (str), got {self.lora_path!r}")
        self.lora_path = str(self.lora_path)
        if self.lora_ckpt_source not in ("hf", "nemo"):
            raise ValueError(f"LoRARequest.lora_ckpt_source must be 'hf' or 'nemo', got {self.lora_ckpt_source!r}")

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path

    @property
    def ckpt_source(self) -> str:
        return self.lora_ckpt_source
