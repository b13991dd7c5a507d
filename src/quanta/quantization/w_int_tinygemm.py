"""W4A16 decode through PyTorch's built-in int4 weight-only GEMM ("tinygemm", torch.ops.aten._weight_int4pack_mm,
the kernel behind gpt-fast / torchao int4 weight-only), for bf16 activations on CUDA (issue 6).

tinygemm reads its own tiled layout (`_convert_weight_to_int4pack`: from uint8 [N, K / 2] with the EVEN k in the
HIGH nibble, the reverse of quanta's canonical packing in int_quant.py) and one bf16 [G, N, 2] tensor of
(scale, zero) pairs, dequantizing as w = (q - 8) * scale + zero. quanta's w = (q - z) * s is the same with
zero = (8 - z) * s: exact for symmetric weights (z = 8 -> 0), rounded once to bf16 for asymmetric ones.

`attach(layer, method)` (WeightOnlyInt.process_after_loading) builds the second copy of the weight in tinygemm's
layout next to the canonical one (which LLM.save writes and the many-row dequantize path reads); `linear` runs it.
Env QUANTA_INT4_TINYGEMM_MAX_ROWS: linears of up to this many rows use it (default 0 = off until measured faster
on the GPU; benchmarks/bench_int_gemv.py has a `tinygemm` variant).
"""

from __future__ import annotations

import torch

from quanta import envs

MAX_ROWS = envs.get("QUANTA_INT4_TINYGEMM_MAX_ROWS")
INNER_K_TILES = 8  # K is tiled by INNER_K_TILES * 16 (torchao's default)
GROUPS = (32, 64, 128, 256)


def _ops_present() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm") and hasattr(torch.ops.aten, "_convert_weight_to_int4pack")


def supported(bits: int, group_size: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """What tinygemm takes: int4, a group of 32..256, bf16 on CUDA, N a multiple of 8, K of INNER_K_TILES * 16."""
    return (bits == 4 and group_size in GROUPS and device.type == "cuda" and dtype == torch.bfloat16
            and n % 8 == 0 and k % (INNER_K_TILES * 16) == 0 and k % group_size == 0 and _ops_present())


def scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """quanta's per-group scale / zero point [N, G] -> tinygemm's bf16 [G, N, 2] of (scale, (8 - z) * scale)."""
    s = scale.float()
    z = zero.float() if zero is not None else torch.full_like(s, 8.0)
    return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def high_nibble_even(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] with the even k in the low nibble (quanta) -> in the high nibble (tinygemm's input)."""
    return ((packed & 0xF) << 4) | (packed >> 4)


def pack(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(tinygemm's weight, its scales-and-zeros) from quanta's canonical int4 tensors (on CUDA)."""
    w = torch.ops.aten._convert_weight_to_int4pack(high_nibble_even(packed).contiguous(), INNER_K_TILES)
    return w, scales_and_zeros(scale, zero)


def attach(layer, group_size: int) -> None:
    """Give a W4 layer its tinygemm copy (layer.tinygemm = (weight, scales_and_zeros)) where tinygemm takes it."""
    packed = layer.weight_packed
    if MAX_ROWS <= 0 or getattr(layer, "weight_g_idx", None) is not None:
        return
    k, n = layer.in_features, layer.out_features
    if packed.shape[1] * 2 != k or not supported(4, group_size, n, k, layer.weight_scale.dtype, packed.device):
        return
    layer.tinygemm = pack(packed, layer.weight_scale, getattr(layer, "weight_zero_point", None))


def usable(layer, x: torch.Tensor) -> bool:
    tg = getattr(layer, "tinygemm", None)
    return tg is not None and x.dtype == torch.bfloat16 and x.numel() <= MAX_ROWS * layer.in_features


def linear(x: torch.Tensor, weight: torch.Tensor, sz: torch.Tensor, group_size: int, n: int,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (bf16) @ dequant(W)^T (+ bias) -> [..., N] through _weight_int4pack_mm."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.ops.aten._weight_int4pack_mm(x2, weight, group_size, sz)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)
