"""SmoothQuant W8A8: int8 weights (per channel or per tensor), int8 activations (per token, dynamic, or per
tensor, static). The smoothing scales (alpha = QuantConfig.smoothquant_val) are folded into the previous op
by the calibration pass (passes.py); this file is the storage and the GEMM.

GPU: torch._int_mm (int8 x int8 -> int32) then the scales; CPU reference: quantize-dequantize, then matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta.config import QuantAlgo, QuantConfig
from quanta.quantization.base import QuantMethod, pre_scale, register, set_params, use_fast_path
from quanta.quantization.int_quant import (
    INT8_MAX,
    quant_int8_per_channel,
    quant_int8_per_token,
    quant_int8_static,
)


class SmoothQuantW8A8(QuantMethod):
    calibration = "smoothquant"

    def __init__(self, qc: QuantConfig, per_channel_weight: bool, per_token_act: bool):
        super().__init__(qc)
        if not 0.0 <= float(qc.smoothquant_val) <= 1.0:
            raise ValueError(f"QuantConfig.smoothquant_val must be in [0, 1], got {qc.smoothquant_val!r}")
        self.per_channel_weight = per_channel_weight
        self.per_token_act = per_token_act

    def create_weights(self, layer) -> None:
        dev = layer.weight.device
        set_params(layer, weight=torch.zeros(layer.out_features, layer.in_features, dtype=torch.int8, device=dev),
                   weight_scale=torch.ones(layer.out_features, dtype=torch.float32, device=dev),
                   input_scale=None if self.per_token_act else torch.ones((), dtype=torch.float32, device=dev))
        layer.quant_method = self

    def quantize(self, layer, stats=None) -> None:
        q, scale = quant_int8_per_channel(layer.weight.data, per_tensor=not self.per_channel_weight)
        input_scale = None
        if not self.per_token_act:
            input_scale = (stats.act_amax.float().clamp(min=1e-8) / INT8_MAX).reshape(())
        set_params(layer, weight=q, weight_scale=scale, input_scale=input_scale)
        layer.quant_method = self

    def quant_act(self, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_token_act:
            return quant_int8_per_token(x)  # [T, K] int8, [T, 1]
        return quant_int8_static(x, layer.input_scale), layer.input_scale.reshape(1, 1)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x = pre_scale(layer, x)
        xq, xs = self.quant_act(layer, x)
        if use_fast_path(x) and layer.in_features % 8 == 0 and layer.out_features % 8 == 0:
            y = int8_mm_gpu(xq, layer.weight, xs, layer.weight_scale, x.dtype)
            return y if layer.bias is None else y + layer.bias
        w = layer.weight.float() * layer.weight_scale[:, None]
        return F.linear((xq.float() * xs).to(x.dtype), w.to(x.dtype), layer.bias)

    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "per_channel_weight": self.per_channel_weight,
                "per_token_act": self.per_token_act}


def int8_mm_gpu(xq: torch.Tensor, wq: torch.Tensor, xs: torch.Tensor, ws: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """torch._int_mm needs M > 16 and K, N multiples of 8: pad the rows of small batches (decode)."""
    m = xq.shape[0]
    if m <= 16:
        xq = F.pad(xq, (0, 0, 0, 17 - m))
    y = torch._int_mm(xq, wq.t())[:m]  # [M, N] int32
    return (y.float() * xs * ws[None, :]).to(dtype)


for _algo, _pc, _pt in (
    (QuantAlgo.W8A8_SQ_PER_CHANNEL, True, True),  # per-channel weights, per-token activations
    (QuantAlgo.W8A8_SQ_PER_CHANNEL_PER_TOKEN_PLUGIN, True, True),
    (QuantAlgo.W8A8_SQ_PER_CHANNEL_PER_TENSOR_PLUGIN, True, False),
    (QuantAlgo.W8A8_SQ_PER_TENSOR_PER_TOKEN_PLUGIN, False, True),
    (QuantAlgo.W8A8_SQ_PER_TENSOR_PLUGIN, False, False),
):
    register(_algo)(lambda qc, pc=_pc, pt=_pt: SmoothQuantW8A8(qc, pc, pt))
