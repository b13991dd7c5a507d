"""Hugging Face PEFT LoRA adapters: read, validate against the base model, and hold on the host.

A PEFT folder holds `adapter_config.json` (r, lora_alpha, use_rslora, alpha_pattern ...) and
`adapter_model.safetensors` with, per adapted module, `base_model.model.<module>.lora_A.weight` [r, in]
and `...lora_B.weight` [out, r]. The delta of a module is `x @ A^T @ B^T * scaling` with
scaling = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA); the scaling is folded into B here.

Every problem is a `LoRAAdapterError` (a ValueError) naming the adapter and what is wrong, raised when the
request is submitted: the engine never sees a bad adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from quanta.lora.config import HF_TARGETS, LoRARequest

_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class LoRAAdapterError(ValueError):
    pass


@dataclass
class Target:
    """One wrapped projection of the base model."""

    path: str  # module path in quanta's model, e.g. model.layers.0.self_attn.qkv_proj
    in_features: int
    out_features: int
    shards: list[tuple[str, int, int]]  # (Hugging Face name, output offset, output size), in output order


@dataclass
class TargetTable:
    """The base model's projections LoRA may touch, and how Hugging Face module paths map onto them."""

    targets: dict[str, Target] = field(default_factory=dict)  # quanta module path -> Target
    hf_index: dict[str, tuple[str, int]] = field(default_factory=dict)  # HF module path -> (path, shard index)
    enabled: list[str] = field(default_factory=list)  # HF names LoRA is applied to
    num_layers: int = 0


def build_target_table(model: nn.Module, enabled: list[str]) -> TargetTable:
    """Find the decoder's Linear / MergedLinear projections whose Hugging Face names are in `enabled`."""
    from quanta.layers.linear import Linear

    stacked = getattr(model, "stacked_params", [])
    table = TargetTable(enabled=list(enabled))
    layers = set()
    for path, mod in model.named_modules():
        if not isinstance(mod, Linear) or ".layers." not in f".{path}":
            continue
        m = _LAYER.search(path)
        if m:
            layers.add(int(m.group(1)))
        attr = path.rsplit(".", 1)[-1]
        offsets = mod.shard_offsets()
        if offsets:
            names = {sid: frag.strip(".") for frag, ours, sid in stacked if ours == f".{attr}."}
            shards = [(names.get(sid, sid), start, size) for sid, (start, size) in offsets.items()]
        else:
            shards = [(attr, 0, mod.out_features)]
        if not any(name in enabled for name, _, _ in shards):
            continue
        table.targets[path] = Target(path, mod.in_features, mod.out_features, shards)
        parent = path.rsplit(".", 1)[0] if "." in path else ""
        for i, (name, _, _) in enumerate(shards):
            table.hf_index[f"{parent}.{name}" if parent else name] = (path, i)
    table.num_layers = max(layers) + 1 if layers else 0
    return table


@dataclass(eq=False)
class LoRAAdapter:
    """A loaded adapter (host memory): per quanta module path, its (shard index, A [r, in], B*scaling [size, r])."""

    id: int
    name: str
    path: str
    rank: int  # the largest rank of its modules
    target_modules: list[str]  # Hugging Face names it adapts
    weights: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]]
    nbytes: int = 0

    def __repr__(self) -> str:
        return (f"LoRAAdapter(id={self.id}, name={self.name!r}, rank={self.rank}, "
                f"modules={self.target_modules}, path={self.path!r})")


def adapter_target_names(path: str | Path) -> list[str]:
    """Hugging Face module names an adapter folder adapts (from its tensor names; cheap)."""
    from safetensors import safe_open

    names = []
    f = Path(path) / "adapter_model.safetensors"
    if not f.is_file():
        return names
    with safe_open(str(f), framework="pt") as st:
        for key in st.keys():
            m = _KEY.match(key)
            if m:
                leaf = m.group("module").rsplit(".", 1)[-1]
                if leaf not in names:
                    names.append(leaf)
    return names


def load_adapter(req: LoRARequest, table: TargetTable, max_rank: int, dtype: torch.dtype,
                 pin: bool = False) -> LoRAAdapter:
    where = f"LoRA adapter {req.lora_name!r} (lora_int_id={req.lora_int_id}, path {req.lora_path!r})"

    def fail(msg: str):
        raise LoRAAdapterError(f"{where}: {msg}")

    if req.lora_ckpt_source != "hf":
        fail(f"lora_ckpt_source={req.lora_ckpt_source!r} is not supported in quanta (only 'hf' PEFT folders)")
    folder = Path(req.lora_path).expanduser()
    if not req.lora_path or not folder.exists():
        fail("the folder does not exist")
    if not folder.is_dir():
        fail("is not a folder (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)")
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        fail("adapter_config.json is missing (a PEFT adapter folder holds adapter_config.json and "
             "adapter_model.safetensors)")
    try:
        cfg = json.loads(cfg_file.read_text())
        assert isinstance(cfg, dict)
    except Exception as e:
        fail(f"adapter_config.json is not a JSON object: {e}")
    _check_config(cfg, fail)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        if (folder / "adapter_model.bin").is_file():
            fail("has only adapter_model.bin (pickle, which can run code): convert it to adapter_model.safetensors")
        fail("adapter_model.safetensors is missing")
    tensors = _read_tensors(weights_file, fail)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        module = m.group("module")
        module = module[len("base_model.model."):] if module.startswith("base_model.model.") else module
        pairs.setdefault(module, {})[m.group("ab")] = t
    if unknown:
        fail(f"has tensors quanta cannot apply (only lora_A / lora_B of linear projections): {unknown[:4]}")
    if not pairs:
        fail("adapter_model.safetensors holds no lora_A / lora_B tensors")

    lora_alpha = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    rslora = bool(cfg.get("use_rslora", False))
    weights: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
    names: list[str] = []
    max_r, nbytes = 0, 0
    for module, ab in sorted(pairs.items()):
        leaf = module.rsplit(".", 1)[-1]
        if leaf not in HF_TARGETS:
            fail(f"targets {module!r}: quanta applies LoRA only to {', '.join(HF_TARGETS)}")
        if leaf not in table.enabled:
            fail(f"targets {leaf} ({module}), which this engine does not apply LoRA to: start it with "
                 f"LoraConfig(lora_target_modules=[...]) including {leaf!r} (now {table.enabled})")
        if module not in table.hf_index:
            m = _LAYER.search(module)
            if m and int(m.group(1)) >= table.num_layers:
                fail(f"targets {module!r} but the base model has {table.num_layers} layers "
                     "(an adapter for another base model?)")
            fail(f"targets {module!r}, which the base model does not have (an adapter for another base model?)")
        if set(ab) != {"A", "B"}:
            fail(f"{module}: has lora_{'A' if 'A' in ab else 'B'} but no lora_{'B' if 'A' in ab else 'A'}")
        path, shard = table.hf_index[module]
        target = table.targets[path]
        _, _, size = target.shards[shard]
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            fail(f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not [r, in] and [out, r]")
        r = a.shape[0]
        if r > max_rank:
            fail(f"{module}: rank r={r} is above max_lora_rank={max_rank} (raise LoraConfig.max_lora_rank)")
        if a.shape[1] != target.in_features or b.shape[0] != size:
            fail(f"{module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base model's "
                 f"{leaf} ({target.in_features} in, {size} out): an adapter for another base model?")
        alpha = _pattern_value(alpha_pattern, module, lora_alpha)
        scaling = alpha / (math.sqrt(r) if rslora else r)
        a_t = a.to(dtype).contiguous()
        b_t = (b.float() * scaling).to(dtype).contiguous()
        if pin:
            a_t, b_t = a_t.pin_memory(), b_t.pin_memory()
        weights.setdefault(path, []).append((shard, a_t, b_t))
        nbytes += a_t.numel() * a_t.element_size() + b_t.numel() * b_t.element_size()
        max_r = max(max_r, r)
        if leaf not in names:
            names.append(leaf)
    return LoRAAdapter(req.lora_int_id, req.lora_name, str(folder), max_r, names, weights, nbytes)


def _check_config(cfg: dict, fail) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        fail(f"peft_type is {peft_type!r}; quanta serves LoRA adapters only")
    if cfg.get("use_dora"):
        fail("is a DoRA adapter (use_dora=true), which quanta does not support")
    if cfg.get("modules_to_save"):
        fail(f"has modules_to_save={cfg['modules_to_save']} (full copies of base modules), which quanta does not "
             "support")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        fail("trains biases (bias / lora_bias), which quanta does not support")
    if cfg.get("fan_in_fan_out"):
        fail("has fan_in_fan_out=true (Conv1D weights), which does not fit quanta's linear layers")
    if cfg.get("layer_replication"):
        fail("uses layer_replication, which quanta does not support")
    if cfg.get("target_parameters"):
        fail("targets parameters (target_parameters), which quanta does not support")
    r = cfg.get("r", 8)
    if not isinstance(r, int) or r < 1:
        fail(f"adapter_config.json r must be an int >= 1, got {r!r}")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        fail(f"adapter_config.json lora_alpha must be a number, got {alpha!r}")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module path that ends with it (after a dot)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_tensors(path: Path, fail) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as st:
            return {k: st.get_tensor(k) for k in st.keys()}
    except Exception as e:
        fail(f"adapter_model.safetensors is corrupt or unreadable: {e}")
