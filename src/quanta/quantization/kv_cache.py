"""KV cache stored in INT8 or FP8 (QuantConfig.kv_cache_quant_algo, or KvCacheConfig.dtype 'int8' / 'fp8').

One static scale per layer for K and one for V (TensorRT-LLM's kv_cache_scaling_factor): the calibrated
max |k| (after rotary) and max |v| over the calibration set / 127 (int8) or / 448 (fp8). They are the
Attention module's `k_scale` / `v_scale` parameters, saved with the model. The cache tensors keep their
layout ([num_blocks, block_size, kv_heads, head_dim]) in the 1-byte dtype: half the memory of bf16.

Backends: 'torch_ref' (the CPU engine) quantizes on write and dequantizes the blocks a step reads;
the calibration / perplexity forward quantizes and dequantizes K and V. The Triton backend does not read
quantized caches yet: building with it raises an error naming attn_backend='torch_ref'.
"""

from __future__ import annotations

import torch

from quanta.config import QuantAlgo
from quanta.kernels.kv_cache_write import kv_cache_write_ref
from quanta.kernels.paged_attention_ref import paged_attention_ref
from quanta.quantization.base import QuantizationError, require_fp8, set_params

KV_FORMATS = {QuantAlgo.INT8: (torch.int8, 127.0), QuantAlgo.FP8: (torch.float8_e4m3fn, 448.0)}
KV_DTYPE_NAMES = {"int8": QuantAlgo.INT8, "fp8": QuantAlgo.FP8}
SUPPORTED_BACKENDS = ("torch_ref",)


def check_kv_algo(algo: QuantAlgo, device: torch.device, backend: str | None = None) -> None:
    if algo not in KV_FORMATS:
        raise QuantizationError(f"kv_cache_quant_algo must be QuantAlgo.INT8 or QuantAlgo.FP8, got {algo}")
    if algo == QuantAlgo.FP8:
        require_fp8(device, "an FP8 KV cache")
    if backend is not None and backend not in SUPPORTED_BACKENDS + ("calib",):
        raise QuantizationError(
            f"a quantized KV cache (kv_cache_quant_algo={algo}) needs the 'torch_ref' attention backend for now: "
            f"pass attn_backend='torch_ref' (the {backend!r} paged-attention kernels do not read int8/fp8 caches yet)")


class KvCacheQuant:
    def __init__(self, algo: QuantAlgo):
        self.algo = algo
        self.dtype, self.qmax = KV_FORMATS[algo]

    def quantize(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        y = (x.float() / scale).clamp(-self.qmax, self.qmax)
        return (torch.round(y) if self.dtype == torch.int8 else y).to(self.dtype)

    def fake(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (self.quantize(x, scale).float() * scale).to(x.dtype)

    def forward(self, attn, backend, meta, q, k, v) -> torch.Tensor:
        if backend.name == "calib":
            k, v = self.fake(k, attn.k_scale), self.fake(v, attn.v_scale)
            return backend.forward(q, k, v, attn.k_cache, attn.v_cache, meta, attn.scale)
        if backend.name != "torch_ref":
            check_kv_algo(self.algo, q.device, backend.name)
        kq, vq = self.quantize(k, attn.k_scale), self.quantize(v, attn.v_scale)
        u8 = torch.uint8  # NOTE: as bytes: index_copy_ / gathers have no float8 kernels on the CPU
        kv_cache_write_ref(kq.view(u8), vq.view(u8), attn.k_cache.view(u8), attn.v_cache.view(u8), meta.slot_mapping)
        # Dequantize only the blocks this step reads, into a compact cache with renumbered block tables.
        block_size = attn.k_cache.shape[1]
        num_blocks = max(1, -(-int(meta.seq_lens.max()) // block_size)) if meta.seq_lens.numel() else 1
        tables = meta.block_tables[:, :num_blocks].long()
        used, compact = torch.unique(tables, return_inverse=True)
        k_used = (attn.k_cache.view(u8)[used].view(self.dtype).float() * attn.k_scale).to(q.dtype)
        v_used = (attn.v_cache.view(u8)[used].view(self.dtype).float() * attn.v_scale).to(q.dtype)
        return paged_attention_ref(q, k_used, v_used, compact.to(torch.int32), meta.seq_lens,
                                   meta.query_start_loc, attn.scale, window=getattr(meta, "window", None))


def setup_kv_cache_quant(model, algo: QuantAlgo) -> None:
    """Scale parameters on every attention layer (filled by calibration or by the saved checkpoint)."""
    for attn in model.attention_layers():
        dev = next(model.parameters()).device
        attn.kv_quant = KvCacheQuant(algo)
        set_params(attn, drop=(), k_scale=torch.ones((), device=dev), v_scale=torch.ones((), device=dev))


def set_kv_scales(model, kv_stats: dict) -> None:
    for attn, st in kv_stats.items():
        qmax = attn.kv_quant.qmax
        attn.k_scale.data.copy_((st.k_amax.clamp(min=1e-6) / qmax).reshape(()))
        attn.v_scale.data.copy_((st.v_amax.clamp(min=1e-6) / qmax).reshape(()))


def kv_cache_dtype(model) -> torch.dtype | None:
    attns = model.attention_layers()
    kvq = getattr(attns[0], "kv_quant", None) if attns else None
    return kvq.dtype if kvq is not None else None
