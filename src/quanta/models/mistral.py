"""Mistral: the Llama structure (sliding window handled by the cache's attention window)."""

from quanta.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
