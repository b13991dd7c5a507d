"""Weight-only integer GEMM / GEMV (W4A16, W8A16): y = x @ dequant(W)^T (+ b), dequantizing tiles of W in
registers, so the weight is read from memory in its packed form (0.5 or 1 byte per value).

Reads quanta's canonical layout directly (int_quant.py): weight_packed [N, K_pad * bits / 8] uint8 (int4: low
nibble = even k), weight_scale [N, G], weight_zero_point [N, G] uint8 or none (symmetric: 2^(bits-1)).
`w_int_linear_ref` is its PyTorch twin (dequantize, then matmul): what the CPU runs.
GEMV configs with `_dott` / `_dotto` run the swap-AB kernel of w_int_gemv_t.py (y^T = W x^T) instead.
`w_int_linear` dispatches: the GEMV up to 16 rows, this GEMM up to w_int_dequant.DEQUANT_MIN_ROWS, then
dequantize-once + cuBLAS (w_int_dequant.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.gemv import MAX_M, GemvConfig, gemv_config, gemv_epilogue, plan_split
from quanta.kernels.pdl import pdl_enabled, pdl_launch_kwargs, preload_enabled
from quanta.quantization import w_int_gemv_asm
from quanta.quantization.int_quant import dequantize_groups, unpack_int4
from quanta.quantization.w_int_dequant import DEQUANT_MIN_ROWS, w_int_dequant
from quanta.quantization.w_int_gemv_asm import (
    _w_int_gemv_asm_kernel,
    as_words,
    asm_ok,
    magic16,
    ptx,
    weight_arg,
    x_planes,
)
from quanta.quantization.w_int_gemv_t import _w_int_gemv_t_kernel, offset_bits


# fmt: off
@triton.jit
def _w_int_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr,
    M, N, K, K_PAD,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_N] tile of y. Each K step reads a [BLOCK_N, BLOCK_K * BITS / 8] byte tile of W
    (contiguous along K) and one scale (and zero) per row: BLOCK_K divides GROUP. int4: the low nibbles hold
    the even k, the high ones the odd k, so x is read as its even and odd columns and two dots add up."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K_PAD, BLOCK_K):
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n.to(tl.int64) * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)  # [BN]
        if HAS_ZERO:
            zf = tl.load(z_ptr + offs_n.to(tl.int64) * stride_zn + g, mask=mask_n, other=0).to(tl.float32)
        else:
            zf = tl.full((BLOCK_N,), 2 ** (BITS - 1), tl.float32)
        if BITS == 4:
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes of this K step
            byte = tl.load(w_rows + offs_b[None, :], mask=mask_n[:, None], other=0).to(tl.int32)  # [BN, BK/2]
            lo = (((byte & 0xF).to(tl.float32) - zf[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            hi = (((byte >> 4).to(tl.float32) - zf[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            k_even = 2 * offs_b
            x_e = tl.load(x_rows + k_even[None, :], mask=mask_m[:, None] & (k_even[None, :] < K), other=0.0)
            x_o = tl.load(x_rows + k_even[None, :] + 1, mask=mask_m[:, None] & (k_even[None, :] + 1 < K), other=0.0)
            acc += tl.dot(x_e, tl.trans(lo))
            acc += tl.dot(x_o, tl.trans(hi))
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(w_rows + offs_k[None, :], mask=mask_n[:, None], other=0).to(tl.float32)  # [BN, BK]
            w = ((q - zf[:, None]) * s[:, None]).to(x_ptr.dtype.element_ty)
            x = tl.load(x_rows + offs_k[None, :], mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
# fmt: on


def kernel_supports(bits: int, group_size: int) -> bool:
    """The GEMM's K step must divide the group and give dots of >= 16 along K (the GEMV is used where it can)."""
    return bits in (4, 8) and group_size % (32 if bits == 4 else 16) == 0


def gemm_blocks(m: int, group_size: int, bits: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of the GEMM; BLOCK_K divides the group."""
    bk = next(b for b in (128, 64, 32, 16) if group_size % b == 0 and (bits == 8 or b >= 32))
    if m <= 16:  # only when the GEMV cannot take the group size
        return 16, 32, bk, 4, 3
    if m <= 64:
        return 32, 64, min(bk, 64), 4, 3
    if m <= 128:
        return 64, 128, bk, 4, 3
    return 128, 128, bk, 8, 3


def w_int_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None,
               blocks: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T (+ bias) -> [..., N] in x.dtype with the tl.dot GEMM (prefill)."""
    require_triton()
    k, n = in_features, packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n)
    bm, bn, bk, warps, stages = blocks or gemm_blocks(m, group_size, bits)
    k_pad = packed.shape[1] * 8 // bits
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    # fmt: off
    _w_int_gemm_kernel[grid](
        x2, packed, scale, zero if zero is not None else scale, bias if bias is not None else scale, y,
        m, n, k, k_pad,
        x2.stride(0), packed.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0, y.stride(0),
        GROUP=group_size, BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    # fmt: on
    return y.reshape(*x.shape[:-1], n)


# fmt: off
@triton.jit
def _w_int_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_PAD, K_SPLIT, num_splits,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, SUB: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr, USE_DOT: tl.constexpr, NUM_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NEXT: tl.constexpr = False,
):
    """Program (pid_n, pid_k) streams BLOCK_N packed rows over K range [pid_k * K_SPLIT, +K_SPLIT) (whole steps).
    NEXT (config suffix "_nx"): the next step's weight bytes are loaded before this step's math.
    A step is a [BLOCK_N, BLOCK_K * BITS / 8] byte tile viewed as [BLOCK_N, NG, CB]: NG chunks of SUB values
    (SUB = the group, or BLOCK_K when the group is wider), each with one scale / zero per row.
    int4: low nibbles = even k, high = odd k, so x's chunk splits into its even / odd columns.
    No dot (M <= 4): q -> the float 1 + q / QS by bit ops alone; per row of x, sum over each chunk, then the zero
    and the scale once per chunk and row. Dot (fp16 / bf16, M <= 16): q - z exactly as (q | 0x4B000000) - (2^23 + z)
    (float bits), times the scale, in x.dtype; tl.dot on a 16-row tile."""
    NG: tl.constexpr = BLOCK_K // SUB
    CB: tl.constexpr = SUB * BITS // 8  # bytes of one chunk of one row
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked
    offs_b = tl.arange(0, BLOCK_K * BITS // 8)
    offs_x = tl.arange(0, BLOCK_K)
    offs_g = tl.arange(0, NG)
    w_rows = w_ptr + rows[:, None] * stride_wn
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K_PAD)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, NG), dtype=tl.float32)
    if NEXT:
        bb = k_lo * BITS // 8 + offs_b
        q_next = tl.load(w_rows + bb[None, :], mask=bb[None, :] < k_hi * BITS // 8, other=0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if NEXT:  # two steps of weights in flight a program
            q = q_next.to(tl.int32)
            bb = (k0 + BLOCK_K) * BITS // 8 + offs_b
            q_next = tl.load(w_rows + bb[None, :], mask=bb[None, :] < k_hi * BITS // 8, other=0)
        else:
            bb = k0 * BITS // 8 + offs_b
            q = tl.load(w_rows + bb[None, :], mask=bb[None, :] < K_PAD * BITS // 8, other=0).to(tl.int32)
        q3 = tl.reshape(q, (BLOCK_N, NG, CB))
        kg = k0 + offs_g * SUB
        gidx = kg // GROUP
        s = tl.load(s_ptr + rows[:, None] * stride_sn + gidx[None, :], mask=kg[None, :] < K_PAD, other=0.0)
        s = s.to(tl.float32)  # [BN, NG]
        if HAS_ZERO:
            z = tl.load(z_ptr + rows[:, None] * stride_zn + gidx[None, :], mask=kg[None, :] < K_PAD, other=0)
            zb = z.to(tl.float32) + 8388608.0
        else:
            zb = tl.full((BLOCK_N, NG), 2 ** (BITS - 1) + 8388608.0, tl.float32)
        kx = k0 + offs_x
        if USE_DOT:
            if BITS == 4:
                lo = ((q3 & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, :, None]  # even k: q - z
                hi = ((q3 >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, :, None]  # odd k
            else:
                lo = (q3 | 0x4B000000).to(tl.float32, bitcast=True) - zb[:, :, None]
                hi = lo
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + kx[None, :],
                        mask=(offs_m[:, None] < M) & (kx[None, :] < K), other=0.0)
            wl = tl.reshape(lo * s[:, :, None], (BLOCK_N, BLOCK_K * BITS // 8)).to(x.dtype)
            if BITS == 4:
                x_e, x_o = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))
                wh = tl.reshape(hi * s[:, :, None], (BLOCK_N, BLOCK_K // 2)).to(x.dtype)
                acc += tl.dot(x_e, tl.trans(wl))
                acc += tl.dot(x_o, tl.trans(wh))
            else:
                acc += tl.dot(x, tl.trans(wl))
        else:
            # f = 1 + q / QS exactly (q in the top mantissa bits): no int->float conversion and no zero subtraction
            # per weight; sum(x * f) = sum(x) + sum(x * q) / QS, so sum(x * (q - z)) = QS * sum(x * f) - (QS + z) * sum(x)
            QS: tl.constexpr = 16 if BITS == 4 else 256
            zq = zb - 8388608.0 + QS  # [BN, NG]: QS + z
            if BITS == 4:
                lo = (((q3 << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)  # even k
                hi = (((q3 << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)  # odd k
            else:
                lo = (((q3 << 15) & 0x7F8000) | 0x3F800000).to(tl.float32, bitcast=True)
                hi = lo
            for m in tl.static_range(NUM_M):
                xm = tl.load(x_ptr + m * stride_xm + kx, mask=kx < K, other=0.0).to(tl.float32)
                if BITS == 4:
                    x_e, x_o = tl.split(tl.reshape(xm, (NG, CB, 2)))
                    part = tl.sum(lo * x_e[None, :, :] + hi * x_o[None, :, :], axis=2)  # [BN, NG]
                else:
                    part = tl.sum(lo * tl.reshape(xm, (NG, CB))[None, :, :], axis=2)
                xsum = tl.sum(tl.reshape(xm, (NG, SUB)), axis=1)  # [NG]
                val = (part * QS - zq * xsum[None, :]) * s
                acc3 += tl.where(offs_m[:, None, None] == m, val[None, :, :], 0.0)
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    gemv_epilogue(acc, offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr,
                  HAS_BIAS, USE_SPLIT)
# fmt: on


def gemv_tile(bits: int, group_size: int, block_k: int) -> tuple[int, int] | None:
    """(BLOCK_K, SUB) for the GEMV: SUB = group (BLOCK_K a multiple of it) or BLOCK_K (dividing the group);
    powers of two, >= 32 (int4) / 16 (int8) values a chunk. None: the GEMM has to run."""
    lo = 32 if bits == 4 else 16
    if group_size <= block_k:
        ok = group_size >= lo and group_size & (group_size - 1) == 0
        return (block_k, group_size) if ok else None
    bk = block_k
    while bk >= lo and group_size % bk:
        bk //= 2
    return (bk, bk) if bk >= lo else None


def w_int_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
               bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None,
               config: GemvConfig | None = None, planes: torch.Tensor | None = None, act: bool = False,
               norm_out: tuple | None = None, inv: tuple | None = None):
    """x [..., K] (<= 16 rows) @ dequant(W [N, K])^T (+ bias) -> [..., N] in x.dtype (Triton GEMV).
    act: W is gate | up [2I, K] and the result is SiLU(gate) * up [..., I] (the asm kernel's ACT_OUT epilogue, one
    int4 row, no split-K). The asm kernel's split norm (kernels/split_norm.py, one row, no split-K): norm_out =
    (residual [1, N], norm weight [N], planes chunk or 0) returns (h, xw [1, N], partials fp32) instead of y;
    inv = (partials, eps): x (or planes) is a producer's xw, the sums are scaled by its inverse RMS."""
    require_triton()
    k, n = in_features, packed.shape[0]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    assert m <= MAX_M and packed.stride(1) == 1
    n_out = n // 2 if act else n
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n_out)
    k_pad = packed.shape[1] * 8 // bits
    cfg = config or gemv_config(f"w{bits}", m, n, k)
    half = x.dtype in (torch.float16, torch.bfloat16) and cfg.block_n >= 16
    if cfg.use_dot_t and not half:  # fp32 activations: the broadcast path, small tiles
        cfg = GemvConfig(block_n=4, block_k=128, num_warps=4)
    use_dot_t = cfg.use_dot_t and half  # swap-AB (w_int_gemv_t.py)
    use_dot = cfg.use_dot and half and not use_dot_t
    tile = gemv_tile(bits, group_size, cfg.block_k)
    if tile is None:
        raise ValueError(f"no GEMV tile for group_size={group_size}, bits={bits}")
    bk, sub = tile
    cfg = replace(cfg, block_k=bk)
    split, k_split, ws, cnt = plan_split(cfg, m, n, k_pad, y)
    def args_for(w: torch.Tensor) -> tuple:  # w: the packed bytes, or their int32 view (the asm kernel)
        return (x2, w, scale, zero if zero is not None else scale, bias if bias is not None else scale, y, ws,
                cnt, m, n, k, k_pad, k_split, split,
                x2.stride(0), w.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0, y.stride(0))

    args = args_for(packed)
    common = dict(GROUP=group_size, SUB=sub, BITS=bits, HAS_ZERO=zero is not None, HAS_BIAS=bias is not None,
                  USE_SPLIT=split > 1, BLOCK_N=cfg.block_n, BLOCK_K=bk, num_warps=cfg.num_warps,
                  num_stages=cfg.num_stages)
    grid = (triton.cdiv(n, cfg.block_n), split)
    if use_dot_t:
        off_bits, off = offset_bits(x.dtype, bits) if cfg.dot_t_offset else (0, 0.0)
        use_pdl = pdl_enabled(x.device)  # kernels/pdl.py
        _w_int_gemv_t_kernel[grid](*args, OFFSET_BITS=off_bits, OFFSET=off, BLOCK_M=16, **common, USE_PDL=use_pdl,
                                   PRELOAD=use_pdl and preload_enabled(), **pdl_launch_kwargs(use_pdl))
    elif asm_ok(bits, packed, x2, m, sub, k == k_pad and k_pad % bk == 0):  # w_int_gemv_asm.py
        a_w = args_for(as_words(packed))
        use_pdl = pdl_enabled(x.device)  # kernels/pdl.py
        xp = cfg.x_planes
        if xp and planes is None:
            planes = x_planes(x2, sub)
        if act and (split > 1 or n % 2 or (n // 2) % (cfg.block_n // 2) or cfg.block_n < 2 or cfg.tma):
            raise ValueError(f"the SiLU epilogue needs whole row pairs and no split-K (config {cfg}, N={n})")
        norm = _split_norm_args(norm_out, inv, split, act, grid[0], n, k, y)
        _w_int_gemv_asm_kernel[grid](planes if xp else a_w[0], weight_arg(a_w[1], cfg.block_n, bk, cfg.tma), *a_w[2:],
                                     PTX=ptx(x.dtype), MAGIC16=magic16(x.dtype), BLOCK_M=1, STAGES=cfg.num_stages,
                                     NEXT=cfg.next_step, TMA=cfg.tma, XPLANES=xp, ACT_OUT=act, **common,
                                     USE_PDL=use_pdl, PRELOAD=use_pdl and preload_enabled(), **pdl_launch_kwargs(use_pdl),
                                     L2_PREFETCH=use_pdl and w_int_gemv_asm.L2_PREFETCH and not cfg.tma,
                                     **cfg.launch_kwargs(), **norm)
        if norm_out is not None:
            return norm["h_ptr"].view(1, n), norm["xw_ptr"].view(1, n), norm["part_ptr"]
    elif act or norm_out is not None or inv is not None:
        raise ValueError("the SiLU / split-norm epilogues need the asm GEMV (one int4 row on sm_90)")
    else:
        _w_int_gemv_kernel[grid](*args, USE_DOT=use_dot, NUM_M=m, BLOCK_M=16 if use_dot else next_pow2(m),
                                 NEXT=cfg.next_step, **common)
    return y.reshape(*x.shape[:-1], n_out)


def _split_norm_args(norm_out: tuple | None, inv: tuple | None, split: int, act: bool, programs: int, n: int, k: int,
                     y: torch.Tensor) -> dict:
    """The asm kernel's split-norm arguments (kernels/split_norm.py): producer outputs allocated here."""
    out: dict = {}
    if norm_out is not None and inv is not None:
        raise ValueError("a split-norm GEMV is a producer or a consumer, not both")
    if norm_out is not None:
        residual, weight, sub = norm_out
        if split > 1 or act or residual.numel() != n or weight.numel() != n:
            raise ValueError(f"the split norm's producer needs one row of N={n}, no split-K, no SiLU epilogue")
        out = dict(res_ptr=residual, nw_ptr=weight, h_ptr=torch.empty(n, dtype=y.dtype, device=y.device),
                   xw_ptr=torch.empty(n, dtype=y.dtype, device=y.device),
                   part_ptr=torch.empty(programs, dtype=torch.float32, device=y.device), NORM_OUT=True, NORM_SUB=sub)
    if inv is not None:
        parts, eps = inv
        out.update(part_ptr=parts, n_parts=parts.numel(), k_norm=k, eps=eps, INV_RMS=True,
                   NP_PAD=next_pow2(parts.numel()))
    return out


def w_int_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ dequant(W [N, K])^T (+ bias) -> [..., N] in x.dtype: the GEMV for <= 16 rows, the int GEMM up
    to DEQUANT_MIN_ROWS, then the dequantized weight through cuBLAS."""
    m = x.numel() // max(in_features, 1)
    if 0 < DEQUANT_MIN_ROWS <= m:  # many rows: dequantize once, then cuBLAS (w_int_dequant.py)
        return F.linear(x, w_int_dequant(packed, scale, zero, bits, group_size, in_features, x.dtype), bias)
    if bits in (4, 8) and m <= MAX_M:
        cfg = gemv_config(f"w{bits}", m, packed.shape[0], in_features)
        if m == 1 and bits == 4 and w_int_gemv_asm.ASM_ENABLED:
            cfg = w_int_gemv_asm.config_for(packed.shape[0], in_features)
        if gemv_tile(bits, group_size, cfg.block_k) is not None:
            return w_int_gemv(x, packed, scale, zero, bits, group_size, in_features, bias, cfg)
    return w_int_gemm(x, packed, scale, zero, bits, group_size, in_features, bias)


def w_int_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     bits: int, group_size: int, in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    q = unpack_int4(packed) if bits == 4 else packed
    w = dequantize_groups(q, scale, zero, bits, group_size, in_features, x.dtype)
    return F.linear(x, w, bias)
