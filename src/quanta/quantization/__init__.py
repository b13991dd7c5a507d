"""Quantization: one QuantMethod per algorithm (base.py registry; weight_only.py, smoothquant.py, fp8.py),
the calibration passes (passes.py: AWQ in awq.py, GPTQ in gptq.py, SmoothQuant, static scales), calibration
data and forward (calib.py), the quantized KV cache (kv_cache.py) and checkpoints (checkpoint.py).

    from quanta.quantization import quantize_model
    quantize_model(model, QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ), CalibConfig(...), tokenizer)
"""

from quanta.quantization.base import QuantizationError, QuantMethod, get_quant_method, supported_algos
from quanta.quantization.pipeline import quantize_for_build, quantize_model

__all__ = ["QuantMethod", "QuantizationError", "get_quant_method", "quantize_for_build", "quantize_model",
           "supported_algos"]
