"""Tokenizer loading (the seed's customizations: object, path, or the model folder) and EOS ids."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(tokenizer, mode: str, trust_remote_code: bool, revision: str | None):
    if tokenizer is None:
        return None
    if not isinstance(tokenizer, (str, Path)):
        return tokenizer  # an object with encode/decode: used as it is
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tokenizer), use_fast=(mode != "slow"),
                                             trust_remote_code=trust_remote_code, revision=revision)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {str(tokenizer)!r}: {e}") from e


def default_eos_ids(tokenizer, hf_config, model_path: Path | None) -> list[int]:
    ids: list[int] = []

    def add(v):
        for t in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(t, int) and t not in ids:
                ids.append(t)

    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    if model_path is not None and (model_path / "generation_config.json").is_file():
        add(json.loads((model_path / "generation_config.json").read_text()).get("eos_token_id"))
    if not ids:
        add(getattr(hf_config, "eos_token_id", None))
    return ids
