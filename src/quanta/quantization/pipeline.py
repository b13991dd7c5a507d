"""Quantize a loaded float model: pick the method, calibrate where the algorithm needs data, quantize.

Entry points: `quantize_model` (a model in, the same model quantized in place) and `quantize_for_build`
(what the builder calls: merges KvCacheConfig.dtype, respects pre-quantized checkpoints, dummy weights).
NOTE: calibration runs where the model is (CalibConfig.device is accepted and not needed: the model is on
the engine's device already).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch
from torch import nn

from quanta.config import CalibConfig, QuantAlgo, QuantConfig
from quanta.quantization.base import QuantizationError, get_quant_method, quantizable_linears
from quanta.quantization.calib import LayerwiseRunner, calibration_tokens
from quanta.quantization.checkpoint import QuantState
from quanta.quantization.kv_cache import KV_DTYPE_NAMES, check_kv_algo, set_kv_scales, setup_kv_cache_quant
from quanta.quantization.passes import calibrate_and_quantize

logger = logging.getLogger("quanta")


def _is_set(algo) -> bool:
    return algo not in (None, QuantAlgo.NO_QUANT)


@torch.no_grad()
def quantize_model(model: nn.Module, qc: QuantConfig, calib: CalibConfig | None = None, tokenizer=None,
                   show_progress: bool = True) -> nn.Module:
    """Quantize `model` (a quanta model with float weights) in place as `qc` asks; returns it."""
    calib = calib or CalibConfig()
    device = next(model.parameters()).device
    method = get_quant_method(qc) if _is_set(qc.quant_algo) else None
    kv_algo = qc.kv_cache_quant_algo if _is_set(qc.kv_cache_quant_algo) else None
    if method is not None:
        method.check_device(device)
    if kv_algo is not None:
        check_kv_algo(kv_algo, device)
    linears = quantizable_linears(model, qc.exclude_modules) if method is not None else {}
    t0 = time.perf_counter()
    if method is not None and method.calibration is None and kv_algo is None:
        for lin in linears.values():  # round-to-nearest: no data needed
            method.quantize(lin)
    else:
        tokens = calibration_tokens(calib, tokenizer, model.config.vocab_size)
        runner = LayerwiseRunner(model, tokens, calib.calib_batch_size)
        kv_stats = calibrate_and_quantize(runner, method, {id(m) for m in linears.values()}, qc,
                                          kv_algo is not None, calib.random_seed, show_progress)
        del runner
        if kv_algo is not None:
            setup_kv_cache_quant(model, kv_algo)
            set_kv_scales(model, kv_stats)
    for lin in linears.values():
        if lin.quant_method is None:  # a Linear outside the decoder layers: round-to-nearest
            method.quantize(lin)
        method.process_after_loading(lin)
    prev = getattr(model, "quant_state", None)
    if prev is not None and method is None:  # KV-only on a pre-quantized model: keep its weight method
        qc, method = replace(prev.qc, kv_cache_quant_algo=kv_algo), prev.method
    model.quant_state = QuantState(qc, method)
    if device.type == "cuda":  # hand the freed float weights back, so the KV cache can be sized on them
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    model.quantize_seconds = time.perf_counter() - t0
    logger.info("quanta: quantized to %s%s in %.1f s", qc.quant_algo or "float weights",
                f" (KV cache {kv_algo})" if kv_algo else "", time.perf_counter() - t0)
    return model


def resolve_quant_config(qc: QuantConfig, kv_dtype: str) -> QuantConfig:
    """KvCacheConfig.dtype 'int8' / 'fp8' is the same request as QuantConfig.kv_cache_quant_algo."""
    if kv_dtype in (None, "auto"):
        return qc
    algo = KV_DTYPE_NAMES[kv_dtype]
    if _is_set(qc.kv_cache_quant_algo) and qc.kv_cache_quant_algo != algo:
        raise QuantizationError(f"KvCacheConfig.dtype={kv_dtype!r} contradicts "
                                f"QuantConfig.kv_cache_quant_algo={qc.kv_cache_quant_algo}")
    return replace(qc, kv_cache_quant_algo=algo)


def quantize_for_build(model: nn.Module, qc: QuantConfig, calib: CalibConfig, tokenizer, kv_dtype: str,
                       load_format: str, backend: str) -> None:
    """The builder's step after loading: nothing, calibrate + quantize, or check a pre-quantized model."""
    qc = resolve_quant_config(qc, kv_dtype)
    state = getattr(model, "quant_state", None)
    device = next(model.parameters()).device
    kv_final = qc.kv_cache_quant_algo
    if state is not None:  # the checkpoint was quantized already: no re-quantizing its weights
        have = state.qc
        if _is_set(qc.quant_algo) and qc.quant_algo != have.quant_algo:
            raise QuantizationError(f"the checkpoint is already quantized ({have.quant_algo}); it cannot be "
                                    f"re-quantized to {qc.quant_algo}: load its float original for that")
        if _is_set(kv_final) and _is_set(have.kv_cache_quant_algo) and kv_final != have.kv_cache_quant_algo:
            raise QuantizationError(f"the checkpoint's KV cache is {have.kv_cache_quant_algo} already, not {kv_final}")
        if state.method is not None:
            state.method.check_device(device)
        new_kv = kv_final if _is_set(kv_final) and not _is_set(have.kv_cache_quant_algo) else None
        kv_final = kv_final if _is_set(kv_final) else have.kv_cache_quant_algo
        qc = replace(qc, quant_algo=None, kv_cache_quant_algo=new_kv)
    if _is_set(kv_final):
        check_kv_algo(kv_final, device, backend)
    if not qc.requested:
        return
    if load_format == "dummy" and calib.calib_dataset == CalibConfig().calib_dataset:
        calib = replace(calib, calib_dataset="random")  # dummy weights: random tokens calibrate as well
    quantize_model(model, qc, calib, tokenizer)
