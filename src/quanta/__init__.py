"""quanta: the TensorRT-LLM LLM API as a pure-Python engine."""

from quanta.llmapi import LLM, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]
