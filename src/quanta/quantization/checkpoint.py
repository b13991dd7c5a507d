"""Quantized checkpoints: quanta's own (written by LLM.save) and the common Hugging Face layouts
(AutoAWQ "gemm", AutoGPTQ), loaded as they are (no calibration).

quanta's layout: config.json's quantization_config = {"quant_method": "quanta", "quant_algo": ..., ...};
tensors are the model's own parameters by name (merged qkv_proj / gate_up_proj, weight_packed / weight_scale
/ weight_zero_point, input_scale, pre_quant_scale, attention k_scale / v_scale, the folded norms).

AWQ / GPTQ: qweight / qzeros / scales (int32-packed) per q/k/v/o/gate/up/down projection; they load into
their merged layer through shard-aware loaders, then are converted to quanta's layout.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from quanta.config import QuantAlgo, QuantConfig
from quanta.quantization.base import (
    QuantizationError,
    get_quant_method,
    linear_aliases,
    quantizable_linears,
    set_params,
)
from quanta.quantization.kv_cache import setup_kv_cache_quant
from quanta.quantization.weight_only import WeightOnlyInt

FORMAT = "quanta"


class QuantState:
    """What a quantized model carries (model.quant_state): its config and method, for LLM.save."""

    def __init__(self, qc: QuantConfig, method):
        self.qc = qc
        self.method = method

    def to_config(self, model: nn.Module) -> dict:
        qc = self.qc
        cfg = {"quant_method": FORMAT, "format_version": 1}
        cfg.update(self.method.checkpoint_config() if self.method is not None else {"quant_algo": None})
        cfg["kv_cache_quant_algo"] = str(qc.kv_cache_quant_algo) if qc.kv_cache_quant_algo else None
        cfg["exclude_modules"] = qc.exclude_modules
        cfg["pre_quant_scale_modules"] = sorted(n for n, m in model.named_modules()
                                                if "pre_quant_scale" in m._parameters)
        return cfg


def checkpoint_quant_config(hf_config) -> dict | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    return qc if isinstance(qc, dict) else qc.to_dict()


def prepare_quantized_checkpoint(model: nn.Module, cfg: dict) -> Callable[[], None]:
    """Give the model the parameters of the checkpoint's layout; returns what to run after loading."""
    fmt = cfg.get("quant_method")
    if fmt == FORMAT:
        return _prepare_quanta(model, cfg)
    if fmt == "awq":
        return _prepare_packed(model, cfg, AwqGemmLayout(cfg))
    if fmt == "gptq":
        return _prepare_packed(model, cfg, GptqLayout(cfg))
    raise QuantizationError(f"checkpoint quantization_config quant_method={fmt!r} is not supported; quanta "
                            "loads 'awq' (AutoAWQ gemm), 'gptq' (AutoGPTQ) and its own ('quanta', from LLM.save)")


def _prepare_quanta(model: nn.Module, cfg: dict) -> Callable[[], None]:
    qc = QuantConfig(quant_algo=cfg.get("quant_algo"), kv_cache_quant_algo=cfg.get("kv_cache_quant_algo"),
                     group_size=cfg.get("group_size", 128), smoothquant_val=cfg.get("smoothquant_val", 0.5),
                     has_zero_point=bool(cfg.get("has_zero_point", False)),
                     pre_quant_scale=bool(cfg.get("pre_quant_scale", False)),
                     exclude_modules=cfg.get("exclude_modules"))
    method = get_quant_method(qc) if qc.quant_algo not in (None, QuantAlgo.NO_QUANT) else None
    linears = quantizable_linears(model, qc.exclude_modules) if method is not None else {}
    for lin in linears.values():
        method.create_weights(lin)
    modules = dict(model.named_modules())
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point() and p.element_size() > 1)
    for name in cfg.get("pre_quant_scale_modules") or []:
        m = modules[name]
        dev = next(m.parameters()).device
        set_params(m, drop=(), pre_quant_scale=torch.ones(m.in_features, dtype=dtype, device=dev))
    if qc.kv_cache_quant_algo not in (None, QuantAlgo.NO_QUANT):
        setup_kv_cache_quant(model, qc.kv_cache_quant_algo)

    def finish() -> None:
        for lin in linears.values():
            method.process_after_loading(lin)
        model.quant_state = QuantState(qc, method)

    return finish


# ------------------------------------------------------------------ AutoAWQ / AutoGPTQ layouts
def _shard_loader(layer, dim: int, factor: int):
    """Checkpoint shard (q/k/v, gate/up) into its slice of the merged tensor along `dim` (packed by `factor`)."""

    def load(param: torch.Tensor, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None or param.dim() == 1:  # whole tensor; g_idx is the same for every shard
            if param.shape != loaded.shape:
                raise ValueError(f"shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
            param.data.copy_(loaded)
            return
        start, size = layer.shard_offsets()[shard_id]
        if start % factor or size % factor:
            raise ValueError(f"shard {shard_id!r} of {size} rows is not a multiple of the packing ({factor})")
        param.data.narrow(dim, start // factor, size // factor).copy_(loaded)

    return load


def _unpack_int32(p: torch.Tensor, bits: int, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """int32 tensor packing 32 // bits values along `dim` -> uint8 values, that dim 32 // bits times longer."""
    per = 32 // bits
    shifts = torch.tensor(order if order is not None else list(range(per)), device=p.device) * bits
    mask = (1 << bits) - 1
    if dim == 1:  # [a, b] -> [a, b * per]
        return ((p[:, :, None] >> shifts) & mask).reshape(p.shape[0], -1).to(torch.uint8)
    return ((p[:, None, :] >> shifts[None, :, None]) & mask).reshape(-1, p.shape[1]).to(torch.uint8)


class AwqGemmLayout:
    """AutoAWQ 'gemm': qweight [in, out/8] and qzeros [in/g, out/8] int32 packed along out in the order
    0, 2, 4, 6, 1, 3, 5, 7; scales [in/g, out]; w = (q - z) * s. Asymmetric int4."""

    bits = 4
    reverse_order = [0, 4, 1, 5, 2, 6, 3, 7]

    def __init__(self, cfg: dict):
        version = str(cfg.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"AWQ checkpoint version {version!r} is not supported (only 'gemm')")
        if int(cfg.get("bits", cfg.get("w_bit", 4))) != 4:
            raise QuantizationError("AWQ checkpoints must be 4-bit")
        self.group_size = int(cfg.get("group_size", cfg.get("q_group_size", 128)))
        self.skip = list(cfg.get("modules_to_not_convert") or [])
        self.algo = QuantAlgo.W4A16_AWQ

    def create(self, layer) -> None:
        out, inn, g = layer.out_features, layer.in_features, self.group_size
        dev, dtype = layer.weight.device, layer.weight.dtype
        i32 = dict(dtype=torch.int32, device=dev)
        set_params(layer, qweight=torch.zeros(inn, out // 8, **i32), qzeros=torch.zeros(inn // g, out // 8, **i32),
                   scales=torch.zeros(inn // g, out, dtype=dtype, device=dev))
        layer.qweight.weight_loader = _shard_loader(layer, 1, 8)
        layer.qzeros.weight_loader = _shard_loader(layer, 1, 8)
        layer.scales.weight_loader = _shard_loader(layer, 1, 1)

    def convert(self, layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q = _unpack_int32(layer.qweight.data, 4, 1, self.reverse_order).t()  # [out, in]
        z = _unpack_int32(layer.qzeros.data, 4, 1, self.reverse_order).t()  # [out, G]
        return q, layer.scales.data.t(), z, None


class GptqLayout:
    """AutoGPTQ: qweight [in * bits/32, out] packed along in; qzeros [G, out * bits/32] packed along out,
    stored minus one (checkpoint_format 'gptq'; 'gptq_v2' stores them as they are); scales [G, out];
    g_idx [in] (act-order checkpoints permute it). w = (q - z) * s[g_idx]."""

    def __init__(self, cfg: dict):
        self.bits = int(cfg.get("bits", 4))
        if self.bits not in (4, 8):
            raise QuantizationError(f"GPTQ checkpoints of {self.bits} bits are not supported (4 or 8)")
        self.group_size = int(cfg.get("group_size", 128))
        self.zero_offset = 0 if str(cfg.get("checkpoint_format", "gptq")) == "gptq_v2" else 1
        self.skip: list[str] = []
        self.algo = QuantAlgo.W4A16_GPTQ if self.bits == 4 else QuantAlgo.W8A16_GPTQ

    def create(self, layer) -> None:
        out, inn = layer.out_features, layer.in_features
        g = inn if self.group_size <= 0 else self.group_size
        per = 32 // self.bits
        dev, dtype = layer.weight.device, layer.weight.dtype
        i32 = dict(dtype=torch.int32, device=dev)
        set_params(layer, qweight=torch.zeros(inn // per, out, **i32),
                   qzeros=torch.zeros(-(-inn // g), out // per, **i32),
                   scales=torch.zeros(-(-inn // g), out, dtype=dtype, device=dev),
                   g_idx=torch.zeros(inn, **i32))
        layer.qweight.weight_loader = _shard_loader(layer, 1, 1)
        layer.qzeros.weight_loader = _shard_loader(layer, 1, per)
        layer.scales.weight_loader = _shard_loader(layer, 1, 1)
        layer.g_idx.weight_loader = _shard_loader(layer, 0, 1)

    def convert(self, layer):
        q = _unpack_int32(layer.qweight.data, self.bits, 0).t()  # [out, in]
        z = _unpack_int32(layer.qzeros.data, self.bits, 1).t().to(torch.int16) + self.zero_offset
        g = layer.in_features if self.group_size <= 0 else self.group_size
        g_idx = layer.g_idx.data.long()
        plain = torch.arange(layer.in_features, device=g_idx.device) // g
        return q, layer.scales.data.t(), z.to(torch.uint8), None if torch.equal(g_idx, plain) else g_idx.int()


def _prepare_packed(model: nn.Module, cfg: dict, fmt) -> Callable[[], None]:
    qc = QuantConfig(quant_algo=fmt.algo, group_size=fmt.group_size if fmt.group_size > 0 else 128,
                     has_zero_point=True)
    method = WeightOnlyInt(qc, fmt.bits, per_channel=fmt.group_size <= 0)
    layers = {}
    for name, lin in quantizable_linears(model, None).items():
        if any(s in alias for alias in linear_aliases(name, lin) for s in fmt.skip):
            continue
        fmt.create(lin)
        layers[name] = lin

    def finish() -> None:
        for lin in layers.values():
            q, scale, zero, g_idx = fmt.convert(lin)
            if q.shape[1] % 2 and fmt.bits == 4:
                q = torch.nn.functional.pad(q, (0, 1))
            set_params(lin, drop=("qweight", "qzeros", "scales", "g_idx"), weight_scale=scale.contiguous())
            method.store(lin, q.contiguous(), scale, zero, g_idx)
            method.process_after_loading(lin)
        model.quant_state = QuantState(qc, method)

    return finish


# ------------------------------------------------------------------ writing
def save_quantized(model: nn.Module, hf_config, out_dir: Path, src_dir: Path | None = None) -> None:
    """model.safetensors (the model's own parameter names) + config.json with the quantization_config."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config.to_dict()
    cfg["quantization_config"] = model.quant_state.to_config(model)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    if src_dir is not None:  # tokenizer and generation config files of the source checkpoint
        for f in src_dir.iterdir():
            if f.is_file() and f.name != "config.json" and f.suffix in (".json", ".model", ".txt", ".jinja") \
                    and not f.name.endswith(".index.json"):
                (out_dir / f.name).write_bytes(f.read_bytes())
