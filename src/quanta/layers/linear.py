"""Linear layers. Quantization (and later tensor parallelism) lives here, never in model files.

A quantized layer carries a `quant_method` (src/quanta/quantization/base.py) that owns its stored
parameters (e.g. weight_packed / weight_scale instead of weight) and its forward.

Merged projections (qkv, gate_up) keep one weight so the GPU runs one GEMM instead of three; each
checkpoint shard is copied into its row range by `weight_loader(param, loaded, shard_id)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W^T (+ b); with a `quant_method`, that method's stored weights and GEMM."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.weight.weight_loader = self.weight_loader
        self.quant_method = None  # set by quanta.quantization when the layer is quantized
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def shard_offsets(self) -> dict[str, tuple[int, int]]:
        return {}

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:
            if param.shape != loaded.shape:
                raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
            param.data.copy_(loaded)
            return
        start, size = self.shard_offsets()[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id!r} has {loaded.shape[0]} rows, expected {size}")
        param.data[start : start + size].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several output projections stacked along the output dim, e.g. q|k|v or gate|up."""

    def __init__(self, in_features: int, shard_sizes: dict[str, int], bias: bool = False):
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self._offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for name, size in shard_sizes.items():
            self._offsets[name] = (start, size)
            start += size

    def shard_offsets(self) -> dict[str, tuple[int, int]]:
        return self._offsets
