"""QuantMethod: how one algorithm stores a Linear's weights and multiplies by them, and the registry
QuantAlgo -> QuantMethod. The calibration passes that produce the weights live in their own files.

A method's life on a layer:
  create_weights(layer)         quantized parameters of the right shapes, before a saved checkpoint loads
  quantize(layer, stats)        float `layer.weight` -> the quantized parameters (auto-quantization)
  process_after_loading(layer)  device-side preparation; the canonical parameters stay (LLM.save writes them)
  apply(layer, x) -> y          the forward: a GPU fast path where one exists, else the reference
                                (dequantize, then matmul), which is what runs on a CPU
"""

from __future__ import annotations

import abc
import fnmatch
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from quanta.config import QuantAlgo, QuantConfig

if TYPE_CHECKING:
    from quanta.layers.linear import Linear
    from quanta.quantization.stats import LinearStats


class QuantizationError(ValueError):
    pass


class QuantMethod(abc.ABC):
    # Which calibration pass produces the weights: None (round-to-nearest, no data), 'awq', 'gptq',
    # 'smoothquant', 'amax' (static activation scales only).
    calibration: ClassVar[str | None] = None
    needs_fp8: ClassVar[bool] = False  # FP8 tensor cores (Ada / Hopper) on a GPU

    def __init__(self, qc: QuantConfig):
        self.qc = qc
        self.algo = qc.quant_algo

    # --- lifecycle ------------------------------------------------------------------------------
    @abc.abstractmethod
    def create_weights(self, layer: Linear) -> None:
        """Every algorithm implements this (see the registry in this module)."""

    @abc.abstractmethod
    def quantize(self, layer: Linear, stats: LinearStats | None = None) -> None:
        """Every algorithm implements this (see the registry in this module)."""

    def process_after_loading(self, layer: Linear) -> None:
        """Optional hook after the checkpoint is loaded; most methods need nothing here."""
        return None

    @abc.abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:  # x [T, in] -> [T, out]
        """Every algorithm implements this (see the registry in this module)."""

    # --- helpers --------------------------------------------------------------------------------
    def check_device(self, device: torch.device) -> None:
        if self.needs_fp8:
            require_fp8(device, str(self.algo))

    def checkpoint_config(self) -> dict:
        qc = self.qc
        return {"quant_algo": str(qc.quant_algo), "group_size": qc.group_size,
                "has_zero_point": qc.has_zero_point, "smoothquant_val": qc.smoothquant_val,
                "pre_quant_scale": qc.pre_quant_scale}


def use_fast_path(x: torch.Tensor) -> bool:
    """GPU GEMMs (Triton, torch._int_mm, torch._scaled_mm) on CUDA unless LLM(disable_kernels=True): then the
    reference path runs on the GPU too (the twin that checks them)."""
    from quanta.layers import fast_ops

    return x.is_cuda and fast_ops.use_kernels()


def pre_scale(layer: Linear, x: torch.Tensor) -> torch.Tensor:
    """AWQ/SmoothQuant scales that could not be folded into the previous op: x * pre_quant_scale."""
    pqs = getattr(layer, "pre_quant_scale", None)
    return x if pqs is None else x * pqs


def set_params(layer: nn.Module, drop: tuple[str, ...] = ("weight",), **tensors: torch.Tensor | None) -> None:
    """Replace `drop` parameters of `layer` by `tensors` (frozen parameters, so they are saved and loaded)."""
    for name in drop:
        if name in layer._parameters:
            del layer._parameters[name]
    for name, t in tensors.items():
        if t is not None:
            setattr(layer, name, nn.Parameter(t, requires_grad=False))
        elif name in layer._parameters:
            del layer._parameters[name]


# ------------------------------------------------------------------ registry
_REGISTRY: dict[QuantAlgo, Callable[[QuantConfig], QuantMethod]] = {}

# Algorithms with no method, and why (a clear error instead of a silent fallback).
_UNAVAILABLE = {
    QuantAlgo.NVFP4: "NVFP4 needs an NVIDIA Blackwell GPU (compute capability 10.0+, e.g. B200/GB200); "
                     "quanta has no NVFP4 kernels or CPU reference yet. Use FP8 on Hopper/Ada or W4A16_AWQ.",
    QuantAlgo.INT8: "INT8 is a KV-cache algorithm: pass it as kv_cache_quant_algo=QuantAlgo.INT8; for int8 "
                    "weights use W8A16 (weight-only) or W8A8_SQ_PER_CHANNEL (SmoothQuant).",
    QuantAlgo.MIXED_PRECISION: "MIXED_PRECISION needs a per-layer quantization file (TensorRT-LLM's "
                               "quant_cfg.json); quanta does not support it yet: pick one quant_algo.",
}


def register(*algos: QuantAlgo):
    def wrap(factory):
        for a in algos:
            _REGISTRY[a] = factory
        return factory

    return wrap


def supported_algos() -> list[str]:
    _import_methods()
    return [str(a) for a in _REGISTRY]


def _import_methods() -> None:
    import quanta.quantization.fp8  # noqa: F401
    import quanta.quantization.smoothquant  # noqa: F401
    import quanta.quantization.weight_only  # noqa: F401


def get_quant_method(qc: QuantConfig) -> QuantMethod:
    _import_methods()
    algo = qc.quant_algo
    if algo in _UNAVAILABLE:
        raise QuantizationError(_UNAVAILABLE[algo])
    if algo not in _REGISTRY:
        raise QuantizationError(f"quant_algo {algo} is not supported by quanta yet; supported: "
                                f"{', '.join(supported_algos())}")
    return _REGISTRY[algo](qc)


def require_fp8(device: torch.device, what: str) -> None:
    """FP8 runs on the CPU (reference casts) and on GPUs of compute capability >= 8.9."""
    if device.type != "cuda":
        return
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise QuantizationError(
            f"{what} needs FP8 tensor cores: an NVIDIA Ada (sm_89, e.g. L4/L40S/RTX 4090) or Hopper "
            f"(sm_90, H100/H200) GPU or newer; this {name} is sm_{cc[0]}{cc[1]}. Use W8A8_SQ_PER_CHANNEL "
            "or W4A16_AWQ instead.")


# ------------------------------------------------------------------ which Linear layers
def linear_aliases(name: str, layer) -> list[str]:
    """The names a user may use for a layer: ours and the checkpoint's (q_proj/k_proj/v_proj for qkv_proj)."""
    names = [name]
    offsets = layer.shard_offsets()
    if offsets:
        parent, _, leaf = name.rpartition(".")
        for shard in offsets:
            part = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}.get(shard)
            if part:
                names.append(f"{parent}.{part}" if parent else part)
    return names


def is_excluded(name: str, layer, patterns: list[str] | None) -> bool:
    """fnmatch patterns against our name and the checkpoint's names; a merged projection (qkv, gate_up) is
    excluded as a whole when any of its parts matches (one GEMM cannot mix precisions)."""
    if not patterns:
        return False
    for alias in linear_aliases(name, layer):
        leaf = alias.rpartition(".")[2]
        if any(fnmatch.fnmatchcase(alias, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns):
            return True
    return False


def quantizable_linears(model: nn.Module, exclude: list[str] | None) -> dict[str, Linear]:
    """Every Linear of the model not excluded. lm_head and embeddings are not Linear: never quantized."""
    from quanta.layers.linear import Linear

    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and not is_excluded(n, m, exclude)}
