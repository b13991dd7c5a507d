"""Find a checkpoint (local folder or Hub id), read its config, build the model and load weights."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from quanta.models.registry import resolve_model_class


class ModelLoadError(ValueError):
    pass


def resolve_model_path(model: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a Hub id fetched (or found in the cache) with huggingface_hub."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {str(path)!r} has no config.json")
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") > 1:
        raise ModelLoadError(f"model {str(model)!r} is not a folder with a config.json")
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
        return Path(snapshot_download(str(model), revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, gated ...
        raise ModelLoadError(
            f"could not find model {str(model)!r} locally or download it from the Hugging Face Hub "
            f"(offline and not cached?): {type(e).__name__}: {e}"
        ) from e


def load_hf_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{_unsupported_hint(path)}could not read {path / 'config.json'}: {reason}") from e


def _unsupported_hint(path: Path) -> str:
    """'unsupported architecture ...; supported: ...; ' when config.json names none quanta knows."""
    from quanta.models.registry import supported_architectures

    try:
        data = json.loads((path / "config.json").read_text())
    except Exception:
        return ""
    archs = data.get("architectures") if isinstance(data, dict) else None
    if isinstance(archs, list) and set(archs) & set(supported_architectures()):
        return ""
    model_type = data.get("model_type") if isinstance(data, dict) else None
    return (f"unsupported architecture {archs or '(config.architectures missing)'} (model_type "
            f"{model_type!r}); supported: {', '.join(supported_architectures())}; ")


def _weight_files(path: Path, allow_pickle: bool) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise ModelLoadError(f"shards listed in {index.name} are missing: {missing}")
        return [path / s for s in shards]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(path.glob("*.bin")) + sorted(path.glob("*.pt"))
    if bins and not allow_pickle:
        raise ModelLoadError(
            f"{path} holds only pickled weights ({bins[0].name}); pickle can run code, so quanta refuses it. "
            "Convert to safetensors, or pass allow_pickle_weights=True to load with torch.load(weights_only=True)."
        )
    if bins:
        return bins
    raise ModelLoadError(f"no weights (*.safetensors) found in {path}")


def iter_weights(path: Path, allow_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in _weight_files(path, allow_pickle):
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as st:
                    for name in st.keys():
                        yield name, st.get_tensor(name)
            except Exception as e:
                raise ModelLoadError(f"corrupt or unreadable weights file {f.name}: {e}") from e
        else:
            state = torch.load(str(f), map_location="cpu", weights_only=True)
            yield from state.items()


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    stacked = getattr(model, "stacked_params", [])
    loaded: set[tuple[str, str | None]] = set()  # (our parameter, shard id) pairs
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name:
            continue
        if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
            continue
        target, shard = name, None
        for ckpt_frag, our_frag, shard_id in stacked:
            if ckpt_frag in name:
                target, shard = name.replace(ckpt_frag, our_frag), shard_id
                break
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        loader = getattr(param, "weight_loader", None)
        tensor = tensor.to(param.dtype)
        try:
            if loader is not None:
                loader(param, tensor, shard) if shard else loader(param, tensor)
            elif param.shape != tensor.shape:
                raise ValueError(f"shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
            else:
                param.data.copy_(tensor)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"checkpoint tensor {name!r}: {e}") from e
        loaded.add((target, shard))
    missing = _missing_weights(model, params, stacked, loaded)
    if missing:
        raise ModelLoadError(f"weights missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


def _missing_weights(model, params: dict, stacked: list, loaded: set) -> list[str]:
    """Checkpoint names never loaded; a stacked parameter (qkv, gate_up) needs every one of its shards."""
    missing = []
    for n in params:
        if n == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
            continue
        shards = [(ckpt, shard) for ckpt, ours, shard in stacked if ours in n]
        if not shards or (n, None) in loaded:  # a merged tensor saved whole (quanta's quantized checkpoints)
            if (n, None) not in loaded:
                missing.append(n)
            continue
        our_frag = next(ours for _, ours, _ in stacked if ours in n)
        missing += [n.replace(our_frag, ckpt) for ckpt, shard in shards if (n, shard) not in loaded]
    return missing


def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the real shapes (for speed work): normal(0, 0.02), norms at 1."""
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
            continue
        gen = torch.Generator(device=p.device).manual_seed(seed + i)
        p.data.normal_(0.0, 0.02, generator=gen)


def build_model(hf_config, path: Path | None, dtype: torch.dtype, device: torch.device,
                load_format: str = "auto", allow_pickle: bool = False) -> nn.Module:
    """Parameters are created directly on `device` in `dtype`; buffers (rotary caches) stay float32."""
    cls = resolve_model_class(hf_config)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(prev)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        finish = _prepare_quantized(model, hf_config)
        load_weights(model, iter_weights(path, allow_pickle))
        if finish is not None:
            finish()
    return model.eval()


def _prepare_quantized(model: nn.Module, hf_config):
    """A checkpoint with a quantization_config (AWQ, GPTQ, quanta's own) gets its quantized parameters
    before loading; returns the conversion to run after loading (None for a float checkpoint)."""
    from quanta.quantization.checkpoint import checkpoint_quant_config, prepare_quantized_checkpoint

    cfg = checkpoint_quant_config(hf_config)
    if cfg is None:
        return None
    try:
        return prepare_quantized_checkpoint(model, cfg)
    except ValueError as e:
        raise ModelLoadError(f"quantized checkpoint: {e}") from e
