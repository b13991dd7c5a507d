"""Shared fixtures: the ../shared folder, stories260K, and tiny random Hugging Face models (no download)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("QUANTA_SHARED", ROOT.parent / "shared"))
STORIES = SHARED / "models" / "stories260K"


def need_shared() -> Path:
    if not STORIES.is_dir():
        pytest.skip(f"../shared is absent ({SHARED}): the stories260K model is needed")
    return STORIES


@pytest.fixture(scope="session")
def stories_path() -> Path:
    return need_shared()


@pytest.fixture(scope="session")
def stories_llm(stories_path):
    from quanta import LLM

    llm = LLM(str(stories_path))
    yield llm
    llm.shutdown()


TINY_FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama"),
    "llama3_rope": dict(
        architectures=["LlamaForCausalLM"], model_type="llama",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64},
    ),
    "llama_untied": dict(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral"),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
}


def make_tiny_model(folder: Path, family: str, vocab_size: int = 512, seed: int = 0) -> Path:
    """A random tiny model of `family` saved as a Hugging Face folder (float32 safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_FAMILIES[family])
    model_type = spec.pop("model_type")
    kw = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
    )
    kw.update(spec)
    config = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():  # larger than the default init, so greedy paths are not all one token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(folder), safe_serialization=True)
    if STORIES.is_dir():  # the stories260K tokenizer has vocab 512 too
        for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(STORIES / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = make_tiny_model(tmp_path_factory.mktemp(family), family)
        return cache[family]

    return get
