"""FP8 (e4m3) weights and activations.

FP8: per-tensor weight scale, per-tensor static activation scale (calibrated amax / 448).
FP8_PER_CHANNEL_PER_TOKEN: per-output-channel weight scales, per-token dynamic activation scales (no data).
GPU (sm_89+): torch._scaled_mm; CPU reference: casts to float8_e4m3fn and back, then matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta.config import QuantAlgo, QuantConfig
from quanta.quantization.base import QuantMethod, pre_scale, register, set_params, use_fast_path
from quanta.quantization.int_quant import FP8_DTYPE, FP8_MAX, quant_fp8_per_token, quant_fp8_weight, to_fp8


class Fp8Linear(QuantMethod):
    needs_fp8 = True

    def __init__(self, qc: QuantConfig, per_channel: bool):
        super().__init__(qc)
        self.per_channel = per_channel  # also: per-token activations
        self.calibration = None if per_channel else "amax"

    def create_weights(self, layer) -> None:
        dev = layer.weight.device
        scale_shape = (layer.out_features, 1) if self.per_channel else ()
        set_params(layer, weight=torch.zeros(layer.out_features, layer.in_features, dtype=FP8_DTYPE, device=dev),
                   weight_scale=torch.ones(scale_shape, dtype=torch.float32, device=dev),
                   input_scale=None if self.per_channel else torch.ones((), dtype=torch.float32, device=dev))
        layer.quant_method = self

    def quantize(self, layer, stats=None) -> None:
        q, scale = quant_fp8_weight(layer.weight.data, self.per_channel)
        input_scale = None
        if not self.per_channel:
            input_scale = (stats.act_amax.float().clamp(min=1e-12) / FP8_MAX).reshape(())
        set_params(layer, weight=q, weight_scale=scale, input_scale=input_scale)
        layer.quant_method = self

    def quant_act(self, layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            return quant_fp8_per_token(x)  # [T, K] fp8, [T, 1] float32
        return to_fp8(x, layer.input_scale), layer.input_scale

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        x = pre_scale(layer, x)
        if use_fast_path(x) and layer.in_features % 16 == 0 and layer.out_features % 16 == 0:
            return self._apply_gpu(layer, x)
        xq, xs = self.quant_act(layer, x)
        w = (layer.weight.float() * layer.weight_scale).to(x.dtype)
        return F.linear((xq.float() * xs).to(x.dtype), w, layer.bias)

    def _apply_gpu(self, layer, x: torch.Tensor) -> torch.Tensor:
        """One Triton kernel quantizes (and pads) the activation, then _scaled_mm with fast accumulation."""
        from quanta.kernels.fp8_quant import quant_fp8

        x2 = x.reshape(-1, x.shape[-1])
        m = x2.shape[0]
        xq, xs = quant_fp8(x2, None if self.per_channel else layer.input_scale, m + (-m) % 16)
        ws = layer.weight_scale
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._scaled_mm(xq, layer.weight.t(), scale_a=xs if self.per_channel else xs.reshape(()),
                             scale_b=ws.reshape(1, -1) if self.per_channel else ws.reshape(()), out_dtype=out_dtype,
                             use_fast_accum=True)[:m]
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if layer.bias is not None:
            y = y + layer.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def checkpoint_config(self) -> dict:
        return {**super().checkpoint_config(), "per_channel": self.per_channel}


register(QuantAlgo.FP8)(lambda qc: Fp8Linear(qc, per_channel=False))
register(QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN)(lambda qc: Fp8Linear(qc, per_channel=True))
