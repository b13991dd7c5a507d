"""LoRA adapters: many fine-tuned variants of one base model served from one engine, mixed in one batch.

config.py  LoraConfig (engine) and LoRARequest (per request), TensorRT-LLM's names.
adapter.py Hugging Face PEFT folders: read, validate against the base model, fold the scaling.
layers.py  LoRALinear (module swap over Linear / MergedLinear) and the per-step LoRAContext.
manager.py Host cache (max_cpu_loras), device slots (max_loras), the scheduler's admission gate.
The batched product itself (grouped by adapter) is quanta/kernels/lora_fused.py (decode: one fused kernel)
and quanta/kernels/lora.py (prefill: shrink then expand).
"""

from quanta.lora.adapter import LoRAAdapter, LoRAAdapterError
from quanta.lora.config import LoraConfig, LoRARequest
from quanta.lora.manager import LoRAManager, attach_lora

__all__ = ["LoraConfig", "LoRARequest", "LoRAAdapter", "LoRAAdapterError", "LoRAManager", "attach_lora"]
