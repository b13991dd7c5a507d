"""int4 weight-only GEMV on the tensor cores (W4A16 decode, 1 - 16 rows; issue 6), written in Gluon.

The asm GEMV (w_int_gemv_asm.py, one row) spends ~3.4 SASS instructions a weight on packed half2 arithmetic, the
swap-AB kernel (w_int_gemv_t.py, <= 16 rows) ~5.4 (its tile reaches the wgmma operand through shared memory a byte
at a time). Here the weight is stored in the register order of `mma.sync.m16n8k16`'s A operand, so a thread's
int32 word IS its A fragment for one 16 x 16 tile (8 nibbles): per word, three shifts and four `lop3` make the
four bf16x2 (fp16x2) registers OFFSET + q (exact), four half2 subtracts take OFFSET + z away (exact, |q - z| <=
15), and one `mma.sync` per 8 batch rows multiplies them with x^T (fp32 accumulate). The group's scale multiplies
the fp32 partial once per (row, group) after its K16 steps. Static SASS of the K loop (sm_90, offline): ~2.4
instructions a weight at one row (with the stage's shared-memory reads and copies).

Layout ("mma words", `mma_pack` from quanta's canonical bytes): int32 [N / 16, G, 32, WPG] for groups of GROUP
values (WPG = GROUP / 16 words a lane and group); lane l = 4 r + c of tile t, group g, word j holds
    nibble h + 2 kh + 4 e = q[16 t + r + 8 h, g GROUP + c GROUP / 4 + 4 j + 2 kh + e]
(h: row half, kh, e: which of the lane's K slots 2c, 2c + 1, 2c + 8, 2c + 9 of the K16 step). The dot product does
not care which k sits in which slot of a step, so each lane owns GROUP / 4 consecutive k of a group: its x values
are 16-byte vector loads, its words too (a warp reads a group's 1 KB of a tile contiguously). C fragment: lane l
holds rows 16 t + r (+ 8) and batch rows 2 c (+ 1) (+ 8 for the second n-tile); batch rows >= M read row M - 1's
x and are not stored (no masks in the loop).

Gluon (explicit layouts) keeps each [KW, TN, 32] tensor's last dimension on the 32 lanes of a warp, which the
warp-wide `mma.sync` inside `inline_asm_elementwise` needs. A program: TN tiles (16 TN rows) over all of K; its
KW warps take every KW-th group, summed across warps at the end. ACT (gate | up weights): TN = 2 holds gate tile t
and up tile t + N / 32, and the epilogue stores SiLU(gate) * up.

Loads: a group's words and its scale / zero words ("a stage"; `mma_pack_scales`: one 8-byte word pair per two rows,
the scale bits and OFFSET + z as halves) go by cp.async into shared memory, DEPTH groups ahead of the math (a ring
of DEPTH + 1 slots; each thread reads back what it copied). The loads of a register prefetch were no use: ptxas
schedules a load whose use is in the next loop pass just before the end of this one (its latency model is a few
hundred cycles; an HBM read under load takes ~1-2 us), so each warp waited a full memory latency a group. PDL: the
first DEPTH stages are copied before `griddepcontrol.wait`. sm_90 (bf16 needs sub.bf16x2). The twin is
`w_int_mma_linear_ref` (unpack words and scales, then w_int_kernel.w_int_linear_ref).

Measured (H200, Llama-3.1-8B shapes, W4A16_AWQ, same calls; benchmarks/results/h200_s9*): the linears of a decode
step in isolation (bench_int_gemv.py, reading L2 flush) 2,490 / 2,606 / 2,806 / 3,247 us at 2 / 4 / 8 / 16 rows
against 5,275 / 7,654 / 3,607 / 3,648 for the kernels they replace; in the engine (bench_quant.py) batch 4
516.4 -> 1,557.5 tok/s, batch 16 4,493.9 -> 4,782.8 (bf16: 854.2 / 3,274.0).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quanta import envs
from quanta.kernels.pdl import pdl_enabled, pdl_launch_kwargs
from quanta.quantization.int_quant import unpack_int4
from quanta.quantization.w_int_mma_kernel import _TYPES, HAS_GLUON, mma_ptx

if HAS_GLUON:
    from quanta.quantization.w_int_mma_kernel import _w4_mma_kernel

def mma_pack(packed: torch.Tensor, group: int) -> torch.Tensor:
    """quanta's int4 bytes [N, K / 2] (low nibble = even k) -> the mma words [N / 16, G, 32, GROUP / 16] int32."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if n % 16 or k % group or group % 16:
        raise ValueError(f"mma words need N % 16 == 0 and K % group == 0, group % 16 == 0 (N={n}, K={k}, group={group})")
    q = unpack_int4(packed).to(torch.int32)  # [N, K]
    g, wpg = k // group, group // 16
    q = q.view(n // 16, 2, 8, g, 4, wpg, 2, 2)  # [t, h, r, g, c, j, kh, e]
    q = q.permute(0, 3, 2, 4, 5, 7, 6, 1)  # [t, g, r, c, j, e, kh, h]: nibble = h + 2 kh + 4 e
    q = q.reshape(n // 16, g, 32, wpg, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    words = (q << shifts).sum(-1, dtype=torch.int64)  # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def mma_unpack(words: torch.Tensor) -> torch.Tensor:
    """The inverse of mma_pack: mma words -> quanta's int4 bytes [N, K / 2] uint8."""
    t, g, _, wpg = words.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    q = (words.to(torch.int32)[..., None] >> shifts) & 0xF  # [t, g, 32, j, 8]
    q = q.view(t, g, 8, 4, wpg, 2, 2, 2)  # [t, g, r, c, j, e, kh, h]
    q = q.permute(0, 7, 2, 1, 3, 4, 6, 5).reshape(t * 16, g * wpg * 16)  # [t, h, r, g, c, j, kh, e]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def mma_pack_scales(scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Scales [N, G] (+ zero points [N, G] uint8, None: 8) -> int32 [N / 16, G, 8, 2]: per tile, group and r < 8 the
    scales of rows r and r + 8 as two `dtype` halves of one word, then the halves OFFSET + z of the same rows (the
    dequantize's subtrahends), so a lane's group needs one 8-byte load (4 lanes share it)."""
    n, g = scale.shape
    magic = _TYPES[dtype][2]
    bits = scale.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF  # [N, G]
    z = zero.to(torch.int32) if zero is not None else torch.full_like(bits, 8)
    pair = [v.view(n // 16, 2, 8, g).permute(0, 3, 2, 1) for v in (bits, z | magic)]  # [t, G, r, h]
    words = torch.stack([p[..., 0].to(torch.int64) | (p[..., 1].to(torch.int64) << 16) for p in pair], dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def mma_unpack_scales(sz: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of mma_pack_scales: (scale [N, G] in dtype, zero point [N, G] uint8)."""
    t, g = sz.shape[:2]
    halves = torch.stack([sz & 0xFFFF, (sz >> 16) & 0xFFFF], dim=-1)  # [t, G, r, 2 (scale, z), h]
    halves = halves.permute(3, 0, 4, 2, 1).reshape(2, t * 16, g)  # [2, N, G] (rows 16 t + 8 h + r)
    scale = halves[0].to(torch.int16).view(dtype)
    return scale, (halves[1] & 0xF).to(torch.uint8)


@dataclass(frozen=True)
class MmaWeights:
    """A W4 layer's weight in the kernel's layouts: words (mma_pack), scale / zero words (mma_pack_scales) for x
    of `dtype`, groups of `group`."""

    words: torch.Tensor
    sz: torch.Tensor
    dtype: torch.dtype
    group: int

    @property
    def shape(self) -> tuple[int, int]:
        t, g = self.words.shape[:2]
        return t * 16, g * self.group


def mma_weights(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                dtype: torch.dtype) -> MmaWeights:
    return MmaWeights(mma_pack(packed, group), mma_pack_scales(scale, zero, dtype), dtype, group)


def w_int_mma_linear_ref(x: torch.Tensor, mw: MmaWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    packed = mma_unpack(mw.words)
    scale, zero = mma_unpack_scales(mw.sz, mw.dtype)
    return w_int_linear_ref(x, packed, scale.to(x.dtype), zero, 4, mw.group, packed.shape[1] * 2, bias)


def _rows(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi or lo)) if text else (0, -1)


# Linears of ROWS[0] .. ROWS[1] rows run here where the layer has its mma words (attach; env QUANTA_INT_MMA_ROWS,
# "" = off; one row stays on the asm GEMV, which has the PDL preload, x planes and the SiLU epilogue)
ROWS = _rows(envs.get("QUANTA_INT_MMA_ROWS"))
# layers of < 16384 outputs (not gate_up) only at NARROW_ROWS rows: at 16 rows the swap-AB kernel was faster on them
# (H200, 8B, reading L2 flush, us, same call, h200_s10b: qkv 17.0 vs 17.4, o 14.3 vs 15.6, down 29.1 vs 34.1)
NARROW_ROWS = _rows(envs.get("QUANTA_INT_MMA_NARROW_ROWS"))
NARROW_N = 16384
CONFIG = envs.get("QUANTA_INT_MMA_CONFIG")
# gate_up linears of SILU_ROWS rows run here with the SiLU(gate) * up epilogue (fast_ops.norm_mlp: no silu_and_mul
# launch; at one row instead of the asm GEMV with x planes and its SiLU epilogue; env QUANTA_INT_MMA_SILU_ROWS, "" =
# off). H200, 8B W4A16_AWQ, tok/s, same call (h200_s9f_*): batch 1 462.0 -> 473.3, batch 4 1,554.4 -> 1,617.7,
# batch 16 4,791.5 -> 4,635.3 (slower there: 1-8 by default)
SILU_ROWS = _rows(envs.get("QUANTA_INT_MMA_SILU_ROWS"))
SILU_CONFIG = envs.get("QUANTA_INT_MMA_SILU_CONFIG")


@dataclass(frozen=True)
class MmaConfig:
    tiles: int = 1  # TN: 16-row tiles a program
    warps: int = 4  # KW: warps a program, splitting the groups
    depth: int = 2  # DEPTH: a warp's groups in flight (cp.async stages; DEPTH + 1 slots of shared memory)

    @classmethod
    def parse(cls, text: str) -> MmaConfig:
        """"t2_w4_d3" -> tiles 2, warps 4, depth 3."""
        vals = {p[0]: int(p[1:]) for p in text.split("_") if p and p[0] in "twd" and p[1:].isdigit()}
        return cls(tiles=vals.get("t", 1), warps=vals.get("w", 4), depth=vals.get("d", 2))

    def __str__(self) -> str:
        return f"t{self.tiles}_w{self.warps}_d{self.depth}"


@functools.lru_cache(maxsize=256)
def config_for(m: int, n: int, k: int) -> MmaConfig:
    """QUANTA_INT_MMA_CONFIG, else by shape. The fastest measured (H200, Llama-3.1-8B shapes, zero points, reading L2
    flush, us; benchmarks/results/h200_s10{a,b}_*): 1 / 4 rows qkv t1_w8_d1 11.2 / 12.4, o t1_w8_d1 9.8 / 10.7,
    gate_up t1_w2_d4 28.1 / 33.2, down t1_w8_d1 18.3 / 20.1; 8 rows qkv t1_w8_d2 13.9, o 12.0, gate_up t2_w4_d1 28.8,
    down t1_w8_d2 23.2; 16 rows qkv t2_w4_d1 17.4, o 15.6, gate_up t2_w2_d2 36.9, down t1_w8_d2 34.1."""
    if CONFIG:
        return MmaConfig.parse(CONFIG)
    if n >= NARROW_N:  # many row tiles: small programs
        return MmaConfig(1, 2, 4) if m <= 4 else MmaConfig(2, 4, 1) if m <= 8 else MmaConfig(2, 2, 2)
    if k >= 8192:  # few row tiles, long K: more warps share it
        return MmaConfig(1, 8, 1 if m <= 4 else 2)
    return MmaConfig(1, 8, 1) if m <= 4 else MmaConfig(1, 8, 2) if m <= 8 else MmaConfig(2, 4, 1)


def supported(group: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """What the kernel takes: Gluon, CUDA sm_90 (bf16 needs sub.bf16x2), fp16 / bf16, rows and K in whole tiles
    and groups of a multiple of 64."""
    return (HAS_GLUON and device.type == "cuda" and dtype in _TYPES and group % 64 == 0 and n % 16 == 0
            and k % group == 0 and torch.cuda.get_device_capability(device) >= (9, 0))


def attach(layer, group: int) -> None:
    """Give a W4 layer its mma words (layer.weight_mma, next to the canonical bytes that LLM.save writes, the one-row
    asm GEMV and the many-row dequantize path read: + 0.5 byte a weight of GPU memory) where the kernel takes it."""
    packed = layer.weight_packed
    if (ROWS[1] < ROWS[0] and SILU_ROWS[1] < SILU_ROWS[0]) or getattr(layer, "weight_g_idx", None) is not None:
        return
    k, n = layer.in_features, layer.out_features
    if packed.shape[1] * 2 != k or not supported(group, n, k, layer.weight_scale.dtype, packed.device):
        return
    dtype = layer.weight_scale.dtype
    layer.weight_mma = mma_weights(packed, layer.weight_scale, getattr(layer, "weight_zero_point", None), group, dtype)


def usable(layer, x: torch.Tensor) -> bool:
    mw = getattr(layer, "weight_mma", None)
    m = x.numel() // layer.in_features
    rows = ROWS if layer.out_features >= NARROW_N else (max(ROWS[0], NARROW_ROWS[0]), min(ROWS[1], NARROW_ROWS[1]))
    return mw is not None and x.dtype == mw.dtype and rows[0] <= m <= min(rows[1], 16)


def usable_silu(layer, x: torch.Tensor) -> bool:
    """SiLU(gate) * up of this gate | up layer on its mma words (SILU_ROWS rows; gate and up of whole tiles)."""
    mw = getattr(layer, "weight_mma", None)
    m = x.numel() // layer.in_features
    return (mw is not None and x.dtype == mw.dtype and SILU_ROWS[0] <= m <= min(SILU_ROWS[1], 16)
            and mw.words.shape[0] % 2 == 0)


@functools.lru_cache(maxsize=32)
def silu_config(m: int) -> MmaConfig:
    """The SiLU epilogue's config (tiles: the gate / up pair): QUANTA_INT_MMA_SILU_CONFIG, else by rows (8B gate_up,
    as config_for: 1 row t2_w2_d2 25.3 us, 4 rows t2_w4_d2 28.7, 8 rows 30.9, 16 rows t2_w2_d2 37.2)."""
    if SILU_CONFIG:
        return MmaConfig.parse(SILU_CONFIG)
    return MmaConfig(2, 4, 2) if 2 < m <= 8 else MmaConfig(2, 2, 2)


def linear(layer, x: torch.Tensor, group: int, act: bool = False) -> torch.Tensor:
    """The layer's int4 weight times x (usable(layer, x)) on its mma words; act: SiLU(gate) * up (usable_silu)."""
    m = x.numel() // layer.in_features
    cfg = silu_config(m) if act else config_for(m, layer.out_features, layer.in_features)
    return w_int_mma_linear(x, layer.weight_mma, layer.bias, cfg, act)


def w_int_mma_linear(x: torch.Tensor, mw: MmaWeights, bias: torch.Tensor | None = None,
                     config: MmaConfig | None = None, act: bool = False) -> torch.Tensor:
    """x [..., K] (<= 16 rows, mw.dtype) @ dequant(W)^T (+ bias) -> [..., N] in x.dtype, W as mma_weights.
    act: W is gate | up [2I, K] (I a multiple of 16) and the result SiLU(gate) * up [..., I] (one launch; the
    config's tiles become the pair)."""
    t, g, _, wpg = mw.words.shape
    n, k = mw.shape
    group = mw.group
    if act and t % 2:
        raise ValueError(f"the SiLU epilogue needs gate and up of whole 16-row tiles each (N={n})")
    if x.dtype != mw.dtype:
        raise ValueError(f"x.dtype {x.dtype} differs from the mma weights' {mw.dtype} (their zero words are of it)")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte x loads
        x2 = x2.contiguous() if x2.stride(-1) != 1 or x2.stride(0) % 8 else x2.clone()
    m = x2.shape[0]
    if m > 16 or wpg * 16 != group or wpg % 4:
        raise ValueError(f"w_int_mma_linear takes <= 16 rows and groups of 64k (M={m}, group {group})")
    n_out = n // 2 if act else n
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    cfg = config or MmaConfig()
    tiles = 2 if act else cfg.tiles
    nt = 1 if m <= 8 else 2
    asm, cons = mma_ptx(x.dtype, nt)
    xw = x2.view(torch.int32)  # [m, k / 2]
    use_pdl = pdl_enabled(x.device)  # kernels/pdl.py: the first stages load before the wait
    grid = (t // 2 if act else triton_cdiv(t, tiles),)
    _w4_mma_kernel[grid](
        xw, mw.words, mw.sz, bias if bias is not None else y, y, m, n, g, xw.stride(0), y.stride(0),
        ASM=asm, CONS=cons, GROUP=group, NT=nt, TN=tiles, KW=cfg.warps, DEPTH=cfg.depth,
        S_BF16=mw.dtype == torch.bfloat16, HAS_BIAS=bias is not None, USE_PDL=use_pdl, ACT=act,
        num_warps=cfg.warps, **pdl_launch_kwargs(use_pdl))
    return y.reshape(*x.shape[:-1], n_out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
