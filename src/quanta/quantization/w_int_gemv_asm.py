"""int4 GEMV for one row (W4A16 batch-1 decode) with packed half2 arithmetic in inline PTX (issue 6).

The byte kernel (w_int_kernel.py) spends ~7 SASS instructions a weight on 32-bit float math; at 1 - 1.5 TB/s on an
H200 it is far from the memory's 4+. Here a K step loads [BLOCK_N, WPS] int32 words (8 nibbles each, quanta's
layout: value k of a row at nibble k % 8 of word k // 8) and one `tl.inline_asm_elementwise` call per word does:

    t_j = (word >> 4j) & 0x000F000F | MAGIC      j = 0..3: the halves hold (q_j, q_{j+4}) as OFFSET + q (exact)
    t_j = t_j * 1 - (OFFSET + z)                  half2 FMA: q - z, exact
    acc = sum_j t_j * (x_j, x_{j+4})              a half2 multiply and three half2 FMAs (sm_90: mul.bf16x2)
    out = float(acc.lo) + float(acc.hi)

bf16: MAGIC 0x4300 (128.0, 7 mantissa bits hold q), fp16: 0x6400 (1024.0). The four products of a half are
summed in x.dtype (rounded like the bf16 output itself), then in fp32, times the scale once per (row, group, word).
x of a step is loaded once (contiguous), reshaped into the (x_j, x_j+4) half2 pairs outside the asm and shared by
the rows (Triton does the reshape through shared memory: 8 barriers a step); or, with x_planes ("_xp"), the pairs
come ready-made from the RMSNorm before qkv_proj / gate_up_proj (PLANES) and load in the weights' own layout (no
shuffle, no barrier). sm_90 only (mul.bf16x2). Static SASS of the K loop (sm_90, bf16, offline): ~3.3-3.8
instructions a weight (bn8_bk1024 3.4; with zero points and planes 3.2) against ~7 for the byte kernel.

Same grid, split-K epilogue and CUDA-graph safety as kernels/gemv.py. The twin is w_int_kernel.w_int_linear_ref.
ON by default for one row on sm_90 (env QUANTA_INT_GEMV_ASM=0 turns it off). Configs (config_for):
bn8_bk1024 without split-K, "_nx" (the next step's words and scales in registers), bn4_bk1024 "_xp" with planes;
QUANTA_INT_GEMV_ASM_CONFIG[_LONG|_SHAPES] / QUANTA_INT_GEMV_PLANES[_CONFIG] override. Measured on an H200 (8B, W4A16_AWQ
batch 1, tok/s, bf16 in the same call): fifth session 387.4 (bf16 217.4; byte kernel 308.3), sixth session 397.4
with the split / _nx defaults and 406.8 with planes (bf16 213.8); bench_int_gemv.py (reading L2 flush, zero points)
2,408-2,494 us of linears a step, 2,318 with planes (cuBLAS bf16 4,300-4,520). Tried and slower: software-pipelined
K loops (cp.async _s3 / _s4; TMA descriptor loads "_tma", 3-6 stages: 2,500-2,807 us), register caps ("_rN"),
split-K on these shapes (~1.4 us a launch), PyTorch's tinygemm (w_int_tinygemm.py), a tensor-core GEMV fed from
words (1.3-2.5x slower than this one and the swap-AB kernel; removed). A load-only kernel in this tiling reads the
8B gate_up weight at ~3.06 TB/s (bench_int_probe.py, reading flush; cuBLAS bf16 on the same bytes 3.08), this GEMV
at ~2.2 TB/s: the rest is the K loop's issue and latency (~1.7 instructions a cycle an SM).
"""

from __future__ import annotations

import functools

import torch

from quanta import envs
from quanta.kernels._compat import tl, triton
from quanta.kernels.gemv import gemv_epilogue
from quanta.kernels.pdl import pdl_begin, pdl_prefetch_rows
from quanta.kernels.split_norm import add_norm_store, inv_rms

ASM_ENABLED = envs.get("QUANTA_INT_GEMV_ASM")
# under PDL, each program asks L2 for all its words before waiting for the kernel before (QUANTA_INT_L2_PREFETCH;
# off until measured: the 16-bit GEMVs' version lost on an H100, kernels/pdl.py)
L2_PREFETCH = envs.get("QUANTA_INT_L2_PREFETCH")
# w_int_linear's config for it; no split-K (sk1): on an H200 the split's partials + last-program reduce cost ~1.4 us
# on the 8B o_proj (9.3 vs 10.7 us) and gained nowhere (benchmarks/results/h200_s6c_int_gemv_8b_read.json). "_nx"
# (two K steps in flight a program; isolated slower, sixth session): under PDL the 8B o_proj gains, W4A16_AWQ batch 1
# 489.6 vs 481.2 tok/s (bn8_bk2048 487.0; H200, benchmarks/results/h200_s15c_*)
ASM_CONFIG = envs.get("QUANTA_INT_GEMV_ASM_CONFIG")
# K >= LONG_K (8B down_proj: 14 steps a program): the next step's words in registers ("_nx"): 18.2 vs 19.0 us
ASM_CONFIG_LONG = envs.get("QUANTA_INT_GEMV_ASM_CONFIG_LONG")
LONG_K = 8192
_PTX = """{
.reg .b32 t0, t1, t2, t3, s, a;
.reg .b16 lo, hi;
.reg .f32 f0, f1;
lop3.b32 t0, $1, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $1, 4;
lop3.b32 t1, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $1, 8;
lop3.b32 t2, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $1, 12;
lop3.b32 t3, s, 0x000F000F, MAGIC, 0xEA;
fma.rn.T t0, t0, $7, $2;
fma.rn.T t1, t1, $7, $2;
fma.rn.T t2, t2, $7, $2;
fma.rn.T t3, t3, $7, $2;
mul.rn.T a, t0, $3;
fma.rn.T a, t1, $4, a;
fma.rn.T a, t2, $5, a;
fma.rn.T a, t3, $6, a;
mov.b32 {lo, hi}, a;
cvt.f32.S f0, lo;
cvt.f32.S f1, hi;
add.f32 $0, f0, f1;
}"""
# x.dtype: (PTX type, scalar type, MAGIC as half2 bits, the 16-bit magic)
_TYPES = {torch.bfloat16: ("bf16x2", "bf16", 0x43004300, 0x4300), torch.float16: ("f16x2", "f16", 0x64006400, 0x6400)}


def ptx(dtype: torch.dtype) -> str:
    t, s, magic, _ = _TYPES[dtype]
    return _PTX.replace("MAGIC", f"0x{magic:08X}").replace(".T ", f".{t} ").replace(".S ", f".{s} ")


def asm_ok(bits: int, packed: torch.Tensor, x: torch.Tensor, m: int, sub: int, even_k: bool) -> bool:
    """The asm kernel takes this launch: int4, one row of fp16 / bf16 on CUDA, whole K steps, aligned words."""
    return (ASM_ENABLED and bits == 4 and m == 1 and x.dtype in _TYPES and x.is_cuda and even_k
            and packed.shape[1] % 16 == 0 and packed.stride(0) % 16 == 0 and packed.storage_offset() % 16 == 0
            and sub % 32 == 0 and torch.cuda.get_device_capability(x.device) >= (9, 0))


# x as planes written by the RMSNorm before qkv_proj / gate_up_proj (kernels/rms_norm.fused_add_rms_norm_planes):
# the K loop loads its half2 pairs in the weights' layout, without the shared-memory shuffle of x (no barrier in
# the loop; offline sm_90: 204 vs 223 instructions a step). ON: H200, 8B W4A16_AWQ batch 1, 406.8 vs 397.4 tok/s
# (bf16 213.8, same call; benchmarks/results/h200_s6g_*); 8B gate_up 26.4 vs 28.4 us (h200_s6e_int_gemv_8b_read.json)
PLANES = envs.get("QUANTA_INT_GEMV_PLANES")
PLANES_CONFIG = envs.get("QUANTA_INT_GEMV_PLANES_CONFIG")


# gate_up_proj's planes GEMV computes SiLU(gate) * up in its epilogue (ACT_OUT): no silu_and_mul launch, no gate_up
# round trip. H200, 8B W4A16_AWQ batch 1: 409.8 vs 407.9 / 407.8 tok/s (benchmarks/results/h200_s7b_*). Tried and
# slower: the epilogue also writing down_proj's x planes (down on PLANES_CONFIG: 398.6), and (fifth session) SiLU *
# up as down_proj's prologue (384.9 vs 387.1: every program recomputed the SiLU of its whole row slice).
SILU_EPILOGUE = envs.get("QUANTA_INT_SILU_EPILOGUE")


def planes_config():
    return _parse(PLANES_CONFIG)


def planes_sub(layer, x: torch.Tensor) -> int:
    """The x_planes chunk (the kernel's SUB) for `layer`'s one-row asm GEMV with PLANES_CONFIG, or 0 if it cannot
    take planes (not the asm kernel, ragged K, a group the config's step does not tile)."""
    from quanta.quantization.w_int_kernel import gemv_tile

    cfg, k, group = planes_config(), layer.in_features, layer.quant_method.group_size(layer)
    tile = gemv_tile(4, group, cfg.block_k)
    if tile is None or not cfg.x_planes or k % tile[0] or layer.weight_packed.shape[1] * 2 != k:
        return 0
    return tile[1] if asm_ok(4, layer.weight_packed, x, 1, tile[1], True) else 0


def _config():
    """ASM_CONFIG as a GemvConfig (parsed once per value: it is read on every one-row int4 linear)."""
    return _parse(ASM_CONFIG)


# Per-shape configs: env QUANTA_INT_GEMV_ASM_SHAPES="6144x4096=bn8_bk1024_sk2_w4_s1_nx;4096x4096=..." (N x K)
ASM_SHAPES = envs.get("QUANTA_INT_GEMV_ASM_SHAPES")


def config_for(n: int, k: int):
    """The asm GEMV's config for an [n, k] weight: ASM_SHAPES' entry, else ASM_CONFIG_LONG for K >= LONG_K, else
    ASM_CONFIG."""
    from quanta.kernels.gemv_config import _shape_configs

    return _shape_configs(ASM_SHAPES).get((n, k)) or _parse(ASM_CONFIG_LONG if k >= LONG_K else ASM_CONFIG)


@functools.lru_cache(maxsize=8)
def _parse(text: str):
    from quanta.kernels.gemv import GemvConfig

    return GemvConfig.parse(text)


def as_words(packed: torch.Tensor) -> torch.Tensor:
    """[N, K_pad / 2] uint8 -> the same bytes as [N, K_pad / 8] int32 (no copy)."""
    return packed.view(torch.int32)


def weight_arg(words: torch.Tensor, block_n: int, block_k: int, tma: bool):
    """The asm kernel's w_ptr: the int32 words, or (tma) a host TMA descriptor of them, block [BN, BK / 8] (built
    per launch: a few microseconds of host work, captured once under CUDA graphs; no cache that would keep weights
    alive)."""
    if not tma:
        return words
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(words, list(words.shape), [words.stride(0), 1], [block_n, block_k // 8])


def x_planes(x: torch.Tensor, sub: int) -> torch.Tensor:
    """x [K] (one row, K % sub == 0) -> int32 [K / 2]: per chunk of `sub` values, [4 (j), sub / 8 (word w)] half2
    pairs (x[8w + j], x[8w + j + 4]), the operands of the asm GEMV's word w (kernel XPLANES)."""
    k = x.numel()
    xv = x.reshape(k // sub, sub // 8, 2, 4)  # [chunk, w, h, j]
    return xv.permute(0, 3, 1, 2).contiguous().view(torch.int32).reshape(-1)  # [chunk, j, w, (h)]


def magic16(dtype: torch.dtype) -> int:
    return _TYPES[dtype][3]


@triton.jit
def _pair(lo, hi):
    """Two x.dtype tensors -> int32 words holding (lo, hi) as a half2 (lo in the low 16 bits)."""
    lo_b = lo.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    hi_b = hi.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return lo_b | (hi_b << 16)


# fmt: off
@triton.jit
def _asm_loads(w_ptr, w_rows, s_rows, z_rows, k0, word, offs_g, pid_n, GROUP: tl.constexpr, SUB: tl.constexpr,
               HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr,
               WPG: tl.constexpr, TMA: tl.constexpr):
    # The K step at k0: words [BN, NG, WPG] int32, scales [BN, NG, 1] (stored dtype), zeros [BN, NG, 1] (or 8)
    kg = (k0 + offs_g * SUB)[None, :, None]  # [1, NG, 1]
    if TMA:
        q = tl.reshape(w_ptr.load([pid_n * BLOCK_N, k0 // 8]), (BLOCK_N, NG, WPG))
    else:
        q = tl.load(w_rows + (tl.multiple_of(k0 // 8, 4) + word)[None, :, :])
    s = tl.load(s_rows + kg // GROUP)
    z = tl.full((BLOCK_N, NG, 1), 8, tl.int32)
    if HAS_ZERO:
        z = tl.load(z_rows + kg // GROUP)
    return q, s, z


@triton.jit
def _asm_step(q, s, z, k0, x_ptr, offs_g, offs_k, PTX: tl.constexpr, MAGIC16: tl.constexpr, SUB: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, WPG: tl.constexpr,
              XPLANES: tl.constexpr):
    # The K step's scaled partial sums [BN, NG, WPG] from its words q, scales s and zeros z
    ONE: tl.constexpr = 0x3F803F80 if MAGIC16 == 0x4300 else 0x3C003C00  # 1.0 as a half2
    nz = (MAGIC16 | z.to(tl.int32)) ^ 0x8000  # -(OFFSET + z) as half bits
    nz = tl.broadcast_to(nz | (nz << 16), (BLOCK_N, NG, WPG))
    # x of the step as [NG, WPG, 2, 4] (k = 8 * word + 4 * h + j) -> the half2 pairs (x_j, x_j+4), j = 0..3
    if XPLANES:  # x_ptr: x_planes(x) as int32, chunk c of SUB values = [4 (j), WPG (word)] pairs
        # pointers of the weights' shape (broadcast over the rows): loaded in the weights' layout, no shuffle
        xq = tl.broadcast_to(x_ptr + (k0 // 2 + offs_g * (SUB // 2))[None, :, None]
                             + tl.arange(0, WPG)[None, None, :], (BLOCK_N, NG, WPG))
        x0 = tl.load(xq)
        x1 = tl.load(xq + WPG)
        x2 = tl.load(xq + 2 * WPG)
        x3 = tl.load(xq + 3 * WPG)
    else:
        xv = tl.load(x_ptr + k0 + offs_k)
        xb = xv.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo, hi = tl.split(tl.permute(tl.reshape(xb, (NG, WPG, 2, 4)), (0, 1, 3, 2)))  # [NG, WPG, 4] each
        pairs = lo | (hi << 16)  # [NG, WPG, 4]: j = 2a + b
        p_even, p_odd = tl.split(tl.reshape(pairs, (NG, WPG, 2, 2)))  # b = 0: j = 0, 2; b = 1: j = 1, 3
        x0, x2 = tl.split(p_even)
        x1, x3 = tl.split(p_odd)
        x0 = tl.broadcast_to(x0[None, :, :], (BLOCK_N, NG, WPG))
        x1 = tl.broadcast_to(x1[None, :, :], (BLOCK_N, NG, WPG))
        x2 = tl.broadcast_to(x2[None, :, :], (BLOCK_N, NG, WPG))
        x3 = tl.broadcast_to(x3[None, :, :], (BLOCK_N, NG, WPG))
    part = tl.inline_asm_elementwise(
        PTX, "=r,r,r,r,r,r,r,r",
        [q, nz, x0, x1, x2, x3, tl.full((BLOCK_N, NG, WPG), ONE, tl.int32)],
        dtype=tl.float32, is_pure=True, pack=1)
    return part * s.to(tl.float32)


# fmt: off
@triton.jit
def _w_int_gemv_asm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_PAD, K_SPLIT, num_splits,
    stride_xm, stride_wn, stride_sn, stride_zn, stride_ym,
    GROUP: tl.constexpr, SUB: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    USE_SPLIT: tl.constexpr, PTX: tl.constexpr, MAGIC16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 1,
    NEXT: tl.constexpr = False, TMA: tl.constexpr = False, XPLANES: tl.constexpr = False, ACT_OUT: tl.constexpr = False,
    USE_PDL: tl.constexpr = False, PRELOAD: tl.constexpr = False,
    res_ptr=None, nw_ptr=None, h_ptr=None, xw_ptr=None, part_ptr=None, n_parts=1, k_norm=1, eps=0.0,
    NORM_OUT: tl.constexpr = False, NORM_SUB: tl.constexpr = 0, INV_RMS: tl.constexpr = False, NP_PAD: tl.constexpr = 1,
    L2_PREFETCH: tl.constexpr = False,
):
    """Program (pid_n, pid_k): BLOCK_N rows over K range [pid_k * K_SPLIT, +K_SPLIT) (whole steps of BLOCK_K
    values, K == K_PAD); w_ptr / stride_wn in int32 words. A step is [BLOCK_N, NG, WPG] words (NG chunks of SUB
    values, WPG words a chunk); the partial of every (row, chunk, word) is scaled and kept, summed after the loop.
    STAGES (the config's num_stages): Triton's software pipeline of the K loop (cp.async into shared memory,
    STAGES - 1 steps in flight); 1 = plain loads. NEXT ("_nx"): the next step's words and scales are loaded into
    registers before this step's math (two steps in flight a program). TMA ("_tma"): w_ptr is a host TensorDescriptor of the words, block [BLOCK_N, BLOCK_K / 8]
    (rows past N read as zeros and are not stored), pipelined STAGES deep by Triton.
    ACT_OUT: W is the MLP's gate | up weight [2I, K]; program p computes gate rows [p * BN/2, +BN/2) and the same up
    rows, and stores SiLU(gate) * up ([I] outputs, rounded as silu_and_mul rounds the bf16 GEMV outputs; no
    split-K).
    NORM_OUT (kernels/split_norm.py, no split-K): the epilogue adds the residual, stores h, xw = h * norm weight (x
    planes of chunk NORM_SUB, or plain) and this program's sum of h^2 at part_ptr[pid_n] instead of y. INV_RMS: x is
    such an xw; the sums are scaled by rsqrt(sum of the n_parts partials / k_norm + eps) before the epilogue.
    L2_PREFETCH (under PDL, not TMA): before the wait, the program's words after its first step are prefetched into
    L2 (kernels/pdl.py pdl_prefetch_rows), so they stream while the kernel before drains."""
    NG: tl.constexpr = BLOCK_K // SUB
    WPG: tl.constexpr = SUB // 8
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked
    HB: tl.constexpr = BLOCK_N // 2
    if ACT_OUT:  # gate rows [pid_n * HB, +HB), then the same up rows (N // 2 further; the host checks HB | N // 2)
        t = tl.arange(0, BLOCK_N)
        rows = (pid_n * HB + t + tl.where(t < HB, 0, N // 2 - HB)).to(tl.int64)
    offs_g = tl.arange(0, NG)
    offs_k = tl.arange(0, BLOCK_K)
    word = offs_g[:, None] * WPG + tl.arange(0, WPG)[None, :]  # [NG, WPG]: step-relative word index
    w_rows = w_ptr  # TMA: the descriptor
    if not TMA:
        w_rows = w_ptr + rows[:, None, None] * stride_wn  # [BN, 1, 1]
    s_rows = s_ptr + rows[:, None, None] * stride_sn
    z_rows = z_ptr + rows[:, None, None] * stride_zn
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K_PAD)
    acc = tl.zeros((BLOCK_N, NG, WPG), dtype=tl.float32)
    if NEXT:  # the first step's words / scales / zeros; the loop loads one step ahead
        q_nx, s_nx, z_nx = _asm_loads(w_ptr, w_rows, s_rows, z_rows, k_lo, word, offs_g, pid_n, GROUP, SUB, HAS_ZERO,
                                      BLOCK_N, BLOCK_K, NG, WPG, TMA)
    elif PRELOAD:  # PDL: the first step's weights in flight before the wait (kernels/pdl.py)
        q0, s0, z0 = _asm_loads(w_ptr, w_rows, s_rows, z_rows, k_lo, word, offs_g, pid_n, GROUP, SUB, HAS_ZERO,
                                BLOCK_N, BLOCK_K, NG, WPG, TMA)
    if L2_PREFETCH:  # QUANTA_INT_L2_PREFETCH: the rest of this program's words asked of L2 before the wait
        pdl_prefetch_rows(w_ptr + rows[:, None] * stride_wn, (k_lo + BLOCK_K) // 8, k_hi // 8, BLOCK_N, 32, 16)
    if NORM_OUT and USE_PDL:  # a split norm's producer lets its consumer launch only after its K loop (below)
        tl.extra.cuda.gdc_wait()
    else:
        pdl_begin(USE_PDL)
    if NORM_OUT:  # the residual and norm weight rows, in flight during the K loop
        r_pre = tl.load(res_ptr + offs_n, mask=offs_n < N, other=0.0)
        w_pre = tl.load(nw_ptr + offs_n, mask=offs_n < N, other=0.0)
    if INV_RMS:  # the producer's partials in flight during the K loop, summed after it (a sum here would stall)
        offs_p = tl.arange(0, NP_PAD)
        parts = tl.load(part_ptr + offs_p, mask=offs_p < n_parts, other=0.0)
    k_start = k_lo
    if PRELOAD:
        if not NEXT:
            acc += _asm_step(q0, s0, z0, k_lo, x_ptr, offs_g, offs_k, PTX, MAGIC16, SUB, BLOCK_N, BLOCK_K, NG, WPG,
                             XPLANES)
            k_start = k_lo + BLOCK_K
    for k0 in tl.range(k_start, k_hi, BLOCK_K, num_stages=STAGES):  # STAGES > 1: cp.async, STAGES - 1 steps ahead
        if NEXT:
            q, s, z = q_nx, s_nx, z_nx
            k_nx = tl.minimum(k0 + BLOCK_K, k_hi - BLOCK_K)  # the last step reloads itself (cached, unused)
            q_nx, s_nx, z_nx = _asm_loads(w_ptr, w_rows, s_rows, z_rows, k_nx, word, offs_g, pid_n, GROUP, SUB,
                                          HAS_ZERO, BLOCK_N, BLOCK_K, NG, WPG, TMA)
        else:
            q, s, z = _asm_loads(w_ptr, w_rows, s_rows, z_rows, k0, word, offs_g, pid_n, GROUP, SUB, HAS_ZERO,
                                 BLOCK_N, BLOCK_K, NG, WPG, TMA)
        acc += _asm_step(q, s, z, k0, x_ptr, offs_g, offs_k, PTX, MAGIC16, SUB, BLOCK_N, BLOCK_K, NG, WPG, XPLANES)
    out = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]  # [1, BLOCK_N]
    if INV_RMS:
        out = out * inv_rms(parts, k_norm, eps)
    if ACT_OUT:
        _act_epilogue(tl.reshape(out, (BLOCK_N,)), rows, pid_n, y_ptr, b_ptr, HB, HAS_BIAS)
    elif NORM_OUT:
        if USE_PDL:  # the consumer (a big GEMV) launched at this kernel's start would wait beside its K loops
            tl.extra.cuda.gdc_launch_dependents()
        add_norm_store(tl.reshape(out, (BLOCK_N,)), offs_n, N, pid_n, b_ptr, r_pre, w_pre, h_ptr, xw_ptr, part_ptr,
                       HAS_BIAS, NORM_SUB)
    else:
        gemv_epilogue(out, offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr,
                      HAS_BIAS, USE_SPLIT)


@triton.jit
def _act_epilogue(out, rows, pid_n, y_ptr, b_ptr, HB: tl.constexpr, HAS_BIAS: tl.constexpr):
    # out [2 * HB] fp32: HB gate sums, then the HB up sums of the same rows -> SiLU(gate) * up at [pid_n * HB, +HB)
    dt = y_ptr.dtype.element_ty
    if HAS_BIAS:
        out += tl.load(b_ptr + rows).to(tl.float32)
    gu = out.to(dt).to(tl.float32)  # the gate_up values silu_and_mul would read
    gate, up = tl.split(tl.permute(tl.reshape(gu, (2, HB)), (1, 0)))
    act = (gate / (1.0 + tl.exp(-gate)) * up).to(dt)  # as kernels/activation.silu_and_mul
    tl.store(y_ptr + pid_n * HB + tl.arange(0, HB), act)
# fmt: on
