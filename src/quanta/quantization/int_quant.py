"""Quantize / dequantize primitives: group-wise integer weights, int4 packing, int8 and FP8 activations.

Canonical integer weight layout (what quanta stores, saves and loads):
  q      [out, in_pad] uint8 in [0, 2^bits - 1]   (4-bit: packed two per byte along `in`, low nibble first)
  scale  [out, num_groups]                         (model dtype)
  zero   [out, num_groups] uint8, or None          (None = symmetric: implicit zero 2^(bits-1))
  w[o, i] = (q[o, i] - zero[o, i // g]) * scale[o, i // g]

`in_pad` rounds `in` up to a multiple of the group size: when `in` is not a multiple (stories260K's
down_proj has in=172 with groups of 32), the last group is shorter; its padded columns are never read.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
INT8_MAX = 127.0


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in_pad], repeating the last column (min/max of the last group unchanged)."""
    pad = num_groups(w.shape[1], group_size) * group_size - w.shape[1]
    if pad == 0:
        return w
    return torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)


def group_qparams(w: torch.Tensor, bits: int, group_size: int, zero_point: bool,
                  scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest parameters of each group of `w` [out, in] -> scale [out, G], zero [out, G] | None.

    The scale is rounded to `scale_dtype` first, so quantizing with it matches what is stored."""
    out = w.shape[0]
    g = pad_columns(w.float(), group_size).view(out, -1, group_size)  # [out, G, g]
    if zero_point:
        qmax = 2**bits - 1
        wmin, wmax = g.amin(-1), g.amax(-1)
        scale = ((wmax - wmin).clamp(min=1e-8) / qmax).to(scale_dtype)
        zero = torch.round(-wmin / scale.float()).clamp(0, qmax).to(torch.uint8)
        return scale, zero
    qpos = 2 ** (bits - 1) - 1
    scale = (g.abs().amax(-1).clamp(min=1e-8) / qpos).to(scale_dtype)
    return scale, None


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                    group_size: int) -> torch.Tensor:
    """w [out, in] float -> q [out, in_pad] uint8 with the given group parameters."""
    out = w.shape[0]
    g = pad_columns(w.float(), group_size).view(out, -1, group_size)
    z = (zero.float() if zero is not None else torch.full_like(scale, 2 ** (bits - 1), dtype=torch.float32))
    q = torch.round(g / scale.float()[..., None]) + z[..., None]
    return q.clamp(0, 2**bits - 1).to(torch.uint8).view(out, -1)


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int, dtype: torch.dtype,
                      g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """q [out, in_pad] uint8 -> w [out, in] in `dtype`. `g_idx` [in] (GPTQ act-order) maps columns to groups."""
    out = q.shape[0]
    zf = zero.to(dtype) if zero is not None else torch.full_like(scale, 2 ** (bits - 1), dtype=dtype)
    if g_idx is not None:
        gi = g_idx.long()
        return (q[:, :in_features].to(dtype) - zf[:, gi]) * scale.to(dtype)[:, gi]
    qg = q.view(out, -1, group_size).to(dtype)
    w = (qg - zf[..., None]) * scale.to(dtype)[..., None]
    return w.view(out, -1)[:, :in_features]


def fake_quant_groups(w: torch.Tensor, bits: int, group_size: int, zero_point: bool,
                      scale_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Quantize-dequantize (float32 in and out): what the stored weight will be."""
    scale, zero = group_qparams(w, bits, group_size, zero_point, scale_dtype)
    q = quantize_groups(w, scale, zero, bits, group_size)
    return dequantize_groups(q, scale, zero, bits, group_size, w.shape[1], torch.float32)


def hessian_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal [g, g] blocks of H [in, in] (zero past `in`) -> [G, g, g]."""
    n, g = h.shape[0], group_size
    ng = num_groups(n, g)
    hp = torch.nn.functional.pad(h.float(), (0, ng * g - n, 0, ng * g - n)).view(ng, g, ng, g)
    idx = torch.arange(ng, device=h.device)
    return hp[idx, :, idx, :]


def search_group_qparams(w: torch.Tensor, h_blocks: torch.Tensor, bits: int, group_size: int, zero_point: bool,
                         scale_dtype: torch.dtype, grid: int = 20,
                         max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group parameters of `w` [out, in] with each (row, group)'s range shrunk by the factor in
    {1, 1 - 1/grid, ..., 1 - max_shrink} that minimises its output error e H_g e^T (e: the group's dequantized
    minus float weights; h_blocks [G, g, g]: the input's second moment per group, see hessian_blocks).

    The factor scales the range and values past it saturate, so a symmetric grid may use its lowest level
    too (round-to-nearest's max|w| / (2^(bits-1) - 1) never reaches -2^(bits-1)). Factor 1 is round-to-nearest."""
    rows = max(1, (1 << 24) // (num_groups(w.shape[1], group_size) * group_size))  # bounds [rows, in_pad] temporaries
    parts = [_search_rows(w[r : r + rows].float(), h_blocks, bits, group_size, zero_point, scale_dtype, grid,
                          max_shrink) for r in range(0, w.shape[0], rows)]
    scale = torch.cat([p[0] for p in parts])
    return scale, torch.cat([p[1] for p in parts]) if zero_point else None


def _search_rows(w, h_blocks, bits, group_size, zero_point, scale_dtype, grid, max_shrink):
    def candidate(factor: float):
        scale, zero = group_qparams(w * factor, bits, group_size, zero_point, scale_dtype)
        dq = dequantize_groups(quantize_groups(w, scale, zero, bits, group_size), scale, zero, bits, group_size,
                               w.shape[1], torch.float32)
        e = torch.nn.functional.pad(dq - w, (0, scale.shape[1] * group_size - w.shape[1]))
        e = e.view(w.shape[0], -1, group_size)  # [out, G, g]
        return torch.einsum("ogi,gij,ogj->og", e, h_blocks, e), scale, zero

    best_err, best_scale, best_zero = candidate(1.0)
    for i in range(1, int(max_shrink * grid) + 1):
        err, scale, zero = candidate(1 - i / grid)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:  # [out, in_pad] uint8 (values < 16) -> [out, in_pad // 2]
    return (q[:, 0::2] & 0xF) | ((q[:, 1::2] & 0xF) << 4)


def unpack_int4(p: torch.Tensor) -> torch.Tensor:  # [out, in_pad // 2] uint8 -> [out, in_pad]
    return torch.stack([p & 0xF, p >> 4], dim=-1).view(p.shape[0], -1)


# ------------------------------------------------------------------ activations and FP8
def quant_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] -> (int8 [T, K], scale [T, 1] float32), symmetric, dynamic."""
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-8) / INT8_MAX
    return torch.round(x.float() / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quant_int8_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.round(x.float() / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)


def quant_int8_per_channel(w: torch.Tensor, per_tensor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], scale [out] float32)."""
    amax = w.float().abs().amax() if per_tensor else w.float().abs().amax(-1)
    scale = (amax.clamp(min=1e-8) / INT8_MAX).expand(w.shape[0]).contiguous()
    q = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Saturating cast of x / scale to float8_e4m3fn (the cast itself does not saturate)."""
    return (x.float() / scale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.float().abs().amax(-1, keepdim=True).clamp(min=1e-12) / FP8_MAX  # [T, 1]
    return to_fp8(x, scale), scale


def quant_fp8_weight(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (fp8 [out, in], scale [out, 1] or [] float32)."""
    amax = w.float().abs().amax(-1, keepdim=True) if per_channel else w.float().abs().amax()
    scale = amax.clamp(min=1e-12) / FP8_MAX
    return to_fp8(w, scale), scale
