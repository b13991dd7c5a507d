"""Integer weight-only methods (W4A16, W8A16 and their AWQ / GPTQ variants; W4A8_AWQ adds FP8 activations).

All share one stored layout (see int_quant.py): `weight_packed` uint8, `weight_scale` [out, groups],
`weight_zero_point` uint8 (asymmetric only), `weight_g_idx` (act-order GPTQ checkpoints only).
The algorithms differ only in how the integers are chosen (round-to-nearest, AWQ, GPTQ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta.config import QuantAlgo, QuantConfig
from quanta.quantization.base import QuantizationError, QuantMethod, pre_scale, register, set_params, use_fast_path
from quanta.quantization.int_quant import (
    FP8_MAX,
    dequantize_groups,
    group_qparams,
    num_groups,
    pack_int4,
    quantize_groups,
    to_fp8,
    unpack_int4,
)


class WeightOnlyInt(QuantMethod):
    def __init__(self, qc: QuantConfig, bits: int, per_channel: bool = False, calibration: str | None = None):
        super().__init__(qc)
        if not per_channel and (not isinstance(qc.group_size, int) or qc.group_size <= 0 or qc.group_size % 8):
            raise QuantizationError(f"QuantConfig.group_size must be a positive multiple of 8 (128 by default; "
                                    f"64 and 32 for small models), got {qc.group_size!r}")
        self.bits = bits
        self.per_channel = per_channel
        self.zero_point = bool(qc.has_zero_point)
        self.calibration = calibration

    def group_size(self, layer) -> int:
        """Per channel = one group as wide as the input (rounded up to even, for the int4 packing)."""
        return layer.in_features + (layer.in_features % 2) if self.per_channel else self.qc.group_size

    # --- lifecycle ------------------------------------------------------------------------------
    def create_weights(self, layer) -> None:
        ref = layer.weight
        out, g = layer.out_features, self.group_size(layer)
        ng = num_groups(layer.in_features, g)
        cols = ng * g // 2 if self.bits == 4 else ng * g
        u8 = dict(dtype=torch.uint8, device=ref.device)
        set_params(layer, weight_packed=torch.zeros(out, cols, **u8),
                   weight_scale=torch.ones(out, ng, dtype=ref.dtype, device=ref.device),
                   weight_zero_point=torch.zeros(out, ng, **u8) if self.zero_point else None)
        layer.quant_method = self

    def quantize(self, layer, stats=None) -> None:
        w = layer.weight.data  # [out, in]
        g = self.group_size(layer)
        scale, zero = group_qparams(w, self.bits, g, self.zero_point, w.dtype)
        self.store(layer, quantize_groups(w, scale, zero, self.bits, g), scale, zero)

    def store(self, layer, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
              g_idx: torch.Tensor | None = None) -> None:
        """q [out, in_pad] uint8, scale / zero [out, groups] -> the layer's parameters."""
        dtype = layer.weight.dtype if "weight" in layer._parameters else layer.weight_scale.dtype
        packed = pack_int4(q) if self.bits == 4 else q
        set_params(layer, weight_packed=packed.contiguous(), weight_scale=scale.to(dtype).contiguous(),
                   weight_zero_point=None if zero is None else zero.to(torch.uint8).contiguous(),
                   weight_g_idx=g_idx)
        layer.quant_method = self

    def unpacked(self, layer) -> torch.Tensor:  # [out, in_pad] uint8
        return unpack_int4(layer.weight_packed) if self.bits == 4 else layer.weight_packed

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor:  # [out, in]
        return dequantize_groups(self.unpacked(layer), layer.weight_scale, getattr(layer, "weight_zero_point", None),
                                 self.bits, self.group_size(layer), layer.in_features, dtype,
                                 getattr(layer, "weight_g_idx", None))

    def process_after_loading(self, layer) -> None:
        if self.bits == 4:  # second copies for PyTorch's int4 GEMM / the tensor-core GEMV, where they take the shape
            from quanta.quantization import w_int_mma, w_int_tinygemm

            w_int_tinygemm.attach(layer, self.group_size(layer))
            w_int_mma.attach(layer, self.group_size(layer))

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return _int_linear(layer, pre_scale(layer, x), self.bits)

    def planes_sub(self, layer, x: torch.Tensor) -> int:
        """The chunk size of the x_planes this layer's one-row int4 asm GEMV can take for x (the RMSNorm before it
        writes them: fast_ops.norm_linear), or 0 (then apply() runs as usual)."""
        from quanta.quantization import w_int_gemv_asm

        if not (w_int_gemv_asm.PLANES and self.bits == 4 and x.numel() == layer.in_features
                and getattr(layer, "pre_quant_scale", None) is None and _use_gpu_kernel(layer, x)):
            return 0
        from quanta.quantization import w_int_mma, w_int_tinygemm

        if w_int_tinygemm.usable(layer, x) or w_int_mma.usable(layer, x):  # those take the row instead
            return 0
        return w_int_gemv_asm.planes_sub(layer, x)

    def apply_planes(self, layer, x: torch.Tensor, planes: torch.Tensor, inv: tuple | None = None) -> torch.Tensor:
        """apply() for one row whose x_planes (planes_sub) are given: the asm GEMV reads them instead of x (inv: they
        are a split norm's xw, kernels/split_norm.py)."""
        from quanta.quantization import w_int_gemv_asm
        from quanta.quantization.w_int_kernel import w_int_gemv

        return w_int_gemv(x, layer.weight_packed, layer.weight_scale, getattr(layer, "weight_zero_point", None), 4,
                          self.group_size(layer), layer.in_features, layer.bias, w_int_gemv_asm.planes_config(),
                          planes=planes.view(torch.int32), inv=inv)

    def planes_silu_ok(self, layer) -> bool:
        """apply_planes_silu can run for this gate | up layer (the asm GEMV's ACT_OUT epilogue on PLANES_CONFIG)."""
        from quanta.quantization import w_int_gemv_asm

        cfg = w_int_gemv_asm.planes_config()
        return (w_int_gemv_asm.SILU_EPILOGUE and layer.out_features % 2 == 0 and cfg.block_n >= 2
                and (layer.out_features // 2) % (cfg.block_n // 2) == 0 and cfg.split_k == 1 and not cfg.tma)

    def apply_planes_silu(self, layer, x: torch.Tensor, planes: torch.Tensor,
                          inv: tuple | None = None) -> torch.Tensor | None:
        """SiLU(gate) * up for this gate | up layer on one row whose x_planes are given, in one launch (the asm
        GEMV's ACT_OUT epilogue), or None where that cannot run."""
        from quanta.quantization import w_int_gemv_asm
        from quanta.quantization.w_int_kernel import w_int_gemv

        if not self.planes_silu_ok(layer):
            return None
        return w_int_gemv(x, layer.weight_packed, layer.weight_scale, getattr(layer, "weight_zero_point", None), 4,
                          self.group_size(layer), layer.in_features, layer.bias, w_int_gemv_asm.planes_config(),
                          planes=planes.view(torch.int32), act=True, inv=inv)

    def mma_silu(self, layer, x: torch.Tensor) -> bool:
        """apply_silu takes this gate | up layer and x (the tensor-core GEMV's SiLU epilogue, w_int_mma.py)."""
        from quanta.quantization import w_int_mma

        return self.bits == 4 and _use_gpu_kernel(layer, x) and w_int_mma.usable_silu(layer, x)

    def apply_silu(self, layer, x: torch.Tensor, inv: tuple | None = None) -> torch.Tensor:
        """SiLU(gate) * up [..., I] of this gate | up layer [2I, K] in one launch (where mma_silu; inv: x is a split
        norm's xw, kernels/split_norm.py)."""
        from quanta.quantization import w_int_mma

        return w_int_mma.linear(layer, pre_scale(layer, x), self.group_size(layer), act=True, inv=inv)

    def frag_group(self, layer, x: torch.Tensor) -> int:
        """The group of the fragment-ordered x (w_int_mma.x_frag) this layer's mma GEMV can read for x, written by
        the RMSNorm / silu_and_mul before it (QUANTA_INT_MMA_XF_ROWS), or 0."""
        from quanta.quantization import w_int_mma

        ok = (self.bits == 4 and x.shape[-1] == layer.in_features and w_int_mma.usable_xf(layer, x)  # off: cheap
              and getattr(layer, "pre_quant_scale", None) is None and _use_gpu_kernel(layer, x))
        return self.group_size(layer) if ok else 0

    def apply_frag(self, layer, x: torch.Tensor, xf: torch.Tensor) -> torch.Tensor:
        """apply() where frag_group: the mma GEMV reads xf (x in fragment order) instead of x."""
        from quanta.quantization import w_int_mma

        return w_int_mma.linear(layer, x, self.group_size(layer), xf=xf)

    def split_norm_producer(self, layer, x: torch.Tensor) -> bool:
        """apply_add_norm can run: one int4 row on the asm GEMV with a config without split-K or TMA."""
        from quanta.quantization import w_int_gemv_asm, w_int_tinygemm
        from quanta.quantization.w_int_kernel import gemv_tile

        if not (self.bits == 4 and x.numel() == layer.in_features and _use_gpu_kernel(layer, x)
                and layer.weight_packed.shape[1] * 2 == layer.in_features and not w_int_tinygemm.usable(layer, x)):
            return False
        cfg = w_int_gemv_asm.config_for(layer.out_features, layer.in_features)
        tile = gemv_tile(4, self.group_size(layer), cfg.block_k)
        return (tile is not None and cfg.split_k == 1 and not cfg.tma and layer.in_features % tile[0] == 0
                and w_int_gemv_asm.asm_ok(4, layer.weight_packed, x, 1, tile[1], True))

    def apply_add_norm(self, layer, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, sub: int):
        """(h, xw, partials): this layer's one-row GEMV ending with the residual add and the producer half of a
        split norm (kernels/split_norm.py; xw as x planes of chunk `sub`, or plain for 0). Where
        split_norm_producer."""
        from quanta.quantization import w_int_gemv_asm
        from quanta.quantization.w_int_kernel import w_int_gemv

        return w_int_gemv(pre_scale(layer, x), layer.weight_packed, layer.weight_scale,
                          getattr(layer, "weight_zero_point", None), 4, self.group_size(layer), layer.in_features,
                          layer.bias, w_int_gemv_asm.config_for(layer.out_features, layer.in_features),
                          norm_out=(residual, weight, sub))

    def checkpoint_config(self) -> dict:
        cfg = super().checkpoint_config()
        cfg.update(bits=self.bits, per_channel=self.per_channel)
        return cfg


def _int_linear(layer, x: torch.Tensor, bits: int) -> torch.Tensor:
    """The layer's int weight times x: tinygemm (few rows, where attached), the Triton kernels, or the reference."""
    method = layer.quant_method
    if _use_gpu_kernel(layer, x):
        from quanta.quantization import w_int_tinygemm
        from quanta.quantization.w_int_kernel import w_int_linear

        if w_int_tinygemm.usable(layer, x):
            return w_int_tinygemm.linear(x, *layer.tinygemm, method.group_size(layer), layer.out_features, layer.bias)
        from quanta.quantization import w_int_mma

        if w_int_mma.usable(layer, x):
            return w_int_mma.linear(layer, x, method.group_size(layer))
        return w_int_linear(x, layer.weight_packed, layer.weight_scale, getattr(layer, "weight_zero_point", None),
                            bits, method.group_size(layer), layer.in_features, layer.bias)
    return F.linear(x, method.dequantize(layer, x.dtype), layer.bias)


def _use_gpu_kernel(layer, x: torch.Tensor) -> bool:
    from quanta.kernels._compat import HAS_TRITON
    from quanta.quantization.w_int_kernel import kernel_supports

    method = layer.quant_method
    return (use_fast_path(x) and HAS_TRITON and getattr(layer, "weight_g_idx", None) is None
            and kernel_supports(method.bits, method.group_size(layer)))


class W4A8Awq(WeightOnlyInt):
    """AWQ int4 weights with FP8 activations (per-tensor static scale), TensorRT-LLM's W4A8_AWQ.
    Reference: the activation is quantized to FP8 and back, then the int4 weight path runs."""

    needs_fp8 = True

    def __init__(self, qc: QuantConfig):
        super().__init__(qc, 4, calibration="awq")

    def create_weights(self, layer) -> None:
        super().create_weights(layer)
        set_params(layer, drop=(), input_scale=torch.ones((), dtype=torch.float32, device=layer.weight_scale.device))

    def quantize(self, layer, stats=None) -> None:
        super().quantize(layer, stats)
        amax = stats.act_amax if stats is not None else torch.tensor(FP8_MAX)
        set_params(layer, drop=(), input_scale=(amax.float().clamp(min=1e-12) / FP8_MAX).reshape(()))

    def planes_sub(self, layer, x: torch.Tensor) -> int:  # FP8 activations: x goes through apply()'s rounding
        return 0

    def frag_group(self, layer, x: torch.Tensor) -> int:  # (the same)
        return 0

    def mma_silu(self, layer, x: torch.Tensor) -> bool:  # (the same)
        return False

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        s = layer.input_scale
        return _int_linear(layer, (to_fp8(pre_scale(layer, x), s).float() * s).to(x.dtype), 4)


register(QuantAlgo.W4A16)(lambda qc: WeightOnlyInt(qc, 4))
register(QuantAlgo.W8A16)(lambda qc: WeightOnlyInt(qc, 8, per_channel=True))
register(QuantAlgo.W4A16_AWQ)(lambda qc: WeightOnlyInt(qc, 4, calibration="awq"))
register(QuantAlgo.W4A16_GPTQ)(lambda qc: WeightOnlyInt(qc, 4, calibration="gptq"))
register(QuantAlgo.W8A16_GPTQ)(lambda qc: WeightOnlyInt(qc, 8, calibration="gptq"))
register(QuantAlgo.W4A8_AWQ)(W4A8Awq)
