"""TensorRT-LLM's import path for LoraConfig (`from tensorrt_llm.lora_manager import LoraConfig`)."""

from quanta.lora.config import LoraConfig, LoRARequest

__all__ = ["LoraConfig", "LoRARequest"]
