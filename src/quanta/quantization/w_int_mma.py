"""int4 weight-only GEMV on the tensor cores (W4A16 decode, 1 - 16 rows; issue 6), written in Gluon.

The asm GEMV (w_int_gemv_asm.py, one row) spends ~3.4 SASS instructions a weight on packed half2 arithmetic, the
swap-AB kernel (w_int_gemv_t.py, <= 16 rows) ~5.4 (its tile reaches the wgmma operand through shared memory a byte
at a time). Here the weight is stored in the register order of `mma.sync.m16n8k16`'s A operand, so a thread's
int32 word IS its A fragment for one 16 x 16 tile (8 nibbles): per word, three shifts and four `lop3` make the
four bf16x2 (fp16x2) registers OFFSET + q (exact), four half2 subtracts take OFFSET + z away (exact, |q - z| <=
15), and one `mma.sync` per 8 batch rows multiplies them with x^T (fp32 accumulate). The group's scale multiplies
the fp32 partial once per (row, group) after its K16 steps. Static SASS of the K loop (sm_90, offline): ~2.0-2.2
instructions a weight at 1 - 8 rows, ~2.2 at 16, and no shared memory in the loop.

Layout ("mma words", `mma_pack` from quanta's canonical bytes): int32 [N / 16, G, GROUP / 64, 32, 4] for groups of
GROUP values, a multiple of 64 (the kernel takes GROUP 64 and 128); lane l = 4 r + c of tile t, group g, 64-k half H,
word s (the K16 step) holds
    nibble h + 2 kh + 4 e = q[16 t + r + 8 h, g GROUP + 64 H + 32 (s // 2) + 8 c + 4 (s % 2) + 2 kh + e]
(h: row half, kh, e: which of the lane's K slots 2c, 2c + 1, 2c + 8, 2c + 9 of the K16 step). The dot product does
not care which k sits in which slot of a step (as long as it is the same for every lane of a quad position c), so in
each 64 k lane c owns k 8c .. 8c + 7 and 32 + 8c .. 32 + 8c + 7: its x values are two 16-byte vector loads, each
covering, with the other 3 lanes of its batch row, 64 contiguous bytes (2 whole sectors); and a warp's 4 words of a
half are one 16-byte load a lane over 512 contiguous bytes. (Earlier layouts: lane c owned GROUP / 4 consecutive k,
a row's 4 lanes 64 bytes apart, twice the L1 wavefronts (at 16 rows Nsight Compute had the L1 at 89% and DRAM at
43%); then 16 consecutive k a 64 and its 8 words of a group contiguous, so each 16-byte load, x's and the words',
used half of every sector it touched: 14.7 of 32 bytes a sector, nineteenth session.) Scales and zero points
come packed (`mma_pack_sz`, attach: + 4 bytes a (row, group)): a lane's rows r and r + 8 of a group are one 8-byte
load, a row pair's groups contiguous (before: 4 loads a group, 2 bytes each). C fragment: lane l
holds rows 16 t + r (+ 8) and batch rows 2 c (+ 1) (+ 8 for the second n-tile); batch rows >= M read row M - 1's
x and are not stored (no masks in the loop).

Gluon (explicit layouts) keeps each [KW, TN, 32] tensor's last dimension on the 32 lanes of a warp, which the
warp-wide `mma.sync` inside `inline_asm_elementwise` needs. A program: TN tiles (16 TN rows) over all of K; its
KW warps take every KW-th group (each warp's next group's words load before this one's math: "PF"; with "PX" its x
too), summed across warps at the end. ACT (gate | up weights): TN = 2 holds gate tile t and up tile t + N / 32, and
the epilogue stores SiLU(gate) * up. PDL: the first group's words load before `griddepcontrol.wait` (coherent loads:
ptxas hoists the wait above `.nc` ones). sm_90 (bf16 needs sub.bf16x2). The twin is `w_int_mma_linear_ref` (unpack
the words, then w_int_kernel.w_int_linear_ref).

The "prefetch" is what ptxas makes of it: in SASS the next group's words load after 2 of this group's 8 HMMAs and
the scales just before their use (a load used in the next loop pass gets its latency model's few hundred cycles).
Measured and not taken (RESULTS.md, tenth session): the loads through cp.async into a ring of shared-memory stages
(isolated a little faster, in the engine slower at batch 1 / 4 / 16: under PDL its CTAs hold shared memory while
they wait), and warps of a program on different tiles of one K slice sharing x (slower at 8 and 16 rows).

Measured (H200, Llama-3.1-8B shapes, W4A16_AWQ, same calls; benchmarks/results/h200_s9*): the linears of a decode
step in isolation (bench_int_gemv.py, reading L2 flush) 2,490 / 2,606 / 2,806 / 3,247 us at 2 / 4 / 8 / 16 rows
against 5,275 / 7,654 / 3,607 / 3,648 for the kernels they replace; in the engine (bench_quant.py) batch 4
516.4 -> 1,557.5 tok/s, batch 16 4,493.9 -> 4,782.8 (bf16: 854.2 / 3,274.0). With x read a cache line per batch row
(tenth session, h200_s10h): batch 16 4,764.7 -> 5,215.7 tok/s (bf16 3,344.6 in the same call), batch 1 472.1 -> 475.1.
At 9-16 rows qkv / o on one tile and 8 warps, o / down with the next group's x prefetched too (config "_px", eleventh
session, h200_s11d): batch 16 5,217.2 -> 5,568.8 tok/s (bf16 3,315.9 in the same call).
Epilogue (nineteenth session, h200_s19f-h): Nsight Compute on o_proj at 16 rows (t1_w8) showed the cross-warp sums,
one gl.sum per accumulator, at 4.3-4.5-way shared-memory bank conflicts (~280 K shared wavefronts a launch); now
every warp stores its accumulators to one buffer (lanes on consecutive words), one barrier, each thread sums KW of
them and stores (the old way, config "_ns", removed in the twentieth session). 16 rows, isolated: qkv 12.9 -> 12.3
us, o 11.9 -> 10.5, gate_up 27.9 -> 26.2, down 21.6 -> 20.1; one-row SiLU 25.7 -> 24.4. 8B W4A16_AWQ batch 16
5,994.9 -> 6,203.7 / 6,233.2 tok/s (+3.7%), batch 1 (the one-row SiLU) 497.3 -> 499.8; 2-8 rows not timed in the
engine.
Layout (twentieth session, h200_s20a-d): whole-sector loads of words and x and the packed scales, 8B W4A16_AWQ batch
16 6,286.9 / 6,271.0 -> 6,448.8 / 6,419.4 tok/s (same calls), 6,454.1 against bf16 3,368.7; batch 1 (with the
one-row SiLU's "_ps") 500.2 -> 506.3. Isolated the 16-row gate_up read slower (27 -> 33 us): not yet explained.
x in fragment order (`x_frag`, kernel flag XF; off: QUANTA_INT_MMA_XF_ROWS, written by the RMSNorm / silu_and_mul
before qkv / gate_up / down_proj): a warp's x load reads 512 contiguous bytes (4 lines) instead of 64 bytes of 8 rows.
GPU-tested and measured in the twenty-first session (h200_s21a-c): the chain bench's 16-row qkv 8.4 -> 7.8 us, but
the engine no faster (batch 16 6,652.6 -> 6,624.2 tok/s; batch 1 525.8 -> 521.8). Bench variants "mmaxf:" /
"siluxf:" make x_frag outside the timing. Since then one row runs here too (config_for, silu_config).
Measured and not taken (fourteenth session, h200_s14b): split-K (S programs of a tile group along K, the last summing
the fp32 partials; built in 9a41127, reverted) at 16 rows, us: qkv 17.6 / o 15.3 / gate_up 52.7 / down 26.1 at best
(t2_w4_k2, t2_w4_px_k2 / k4) against t1_w8's 13.5 / 12.1 / 48.0 / 24.7 (gate_up: t2_w2_np 28.0).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from quanta import envs
from quanta.kernels._compat import next_pow2
from quanta.kernels.pdl import pdl_enabled, pdl_launch_kwargs
from quanta.quantization.int_quant import unpack_int4
from quanta.quantization.w_int_mma_kernel import _TYPES, HAS_GLUON, mma_ptx

if HAS_GLUON:
    from quanta.quantization.w_int_mma_kernel import _w4_mma_kernel

def mma_pack(packed: torch.Tensor, group: int) -> torch.Tensor:
    """quanta's int4 bytes [N, K / 2] (low nibble = even k) -> the mma words [N / 16, G, GROUP / 64, 32, 4] int32."""
    n, k = packed.shape[0], packed.shape[1] * 2
    if n % 16 or k % group or group % 64:
        raise ValueError(f"mma words need N % 16 == 0 and K % group == 0, group % 64 == 0 (N={n}, K={k}, "
                         f"group={group})")
    q = unpack_int4(packed).to(torch.int32)  # [N, K]
    g, halves = k // group, group // 64
    q = q.view(n // 16, 2, 8, g, halves, 2, 4, 2, 2, 2)  # [t, h, r, g, H, s1, c, s0, kh, e]: word s = 2 s1 + s0
    q = q.permute(0, 3, 4, 2, 6, 5, 7, 9, 8, 1)  # [t, g, H, r, c, s1, s0, e, kh, h]: nibble = h + 2 kh + 4 e
    q = q.reshape(n // 16, g, halves, 32, 4, 8)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=q.device)
    words = (q << shifts).sum(-1, dtype=torch.int64)  # < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def mma_unpack(words: torch.Tensor) -> torch.Tensor:
    """The inverse of mma_pack: mma words -> quanta's int4 bytes [N, K / 2] uint8."""
    t, g, halves = words.shape[:3]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=words.device)
    q = (words.to(torch.int32)[..., None] >> shifts) & 0xF  # [t, g, H, 32, s, 8]
    q = q.view(t, g, halves, 8, 4, 2, 2, 2, 2, 2)  # [t, g, H, r, c, s1, s0, e, kh, h]
    q = q.permute(0, 9, 3, 1, 2, 5, 4, 6, 8, 7).reshape(t * 16, g * halves * 64)  # [t, h, r, g, H, s1, c, s0, kh, e]
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def mma_pack_sz(scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    """Scales [N, G] (bf16 / fp16) and zero points [N, G] (or None: 8) -> int32 [N / 16, 8, G, 2]: (scale bits << 16)
    | z of row 16 t + r + 8 h at [t, r, g, h], so a lane's rows r and r + 8 of a group are one 8-byte load (instead
    of 4 loads, 2 bytes each). Stored so a row pair's groups are contiguous (cached lines serve the later groups; a
    tile's group contiguous instead, [t, g, r, h], measured no faster: H200 8B W4A16_AWQ batch 16 6,448.8 vs 6,441.6 /
    6,445.4 tok/s, h200_s21a, removed)."""
    n, g = scale.shape
    if scale.dtype not in _TYPES or n % 16:
        raise ValueError(f"packed scales need bf16 / fp16 scales of whole 16-row tiles (got {scale.dtype}, N={n})")
    bits = scale.contiguous().view(torch.int16).to(torch.int32) << 16
    z = zero.to(torch.int32) if zero is not None else torch.full_like(bits, 8)
    packed = (bits | (z & 0xFFFF)).view(n // 16, 2, 8, g)  # [t, h, r, g]
    return packed.permute(0, 2, 3, 1).contiguous()


def x_frag(x: torch.Tensor, group: int) -> torch.Tensor:
    """x [M <= 16, K] (16-bit) -> int32 [K / group, group / 64, 2, 2, 32, 4] in the kernel's fragment order (XF):
    [g, half H, n-tile nt, load j, lane 4 r + c, w] = x's word [8 nt + r, g group / 2 + 32 H + 16 j + 4 c + w] (rows
    >= M zero), so each 16-byte x load of a warp reads 512 contiguous bytes (4 lines, not 8 rows' halves)."""
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    if m > 16 or k % group or group % 64 or x2.dtype not in _TYPES:
        raise ValueError(f"x_frag takes <= 16 rows of 16-bit x in whole groups of a multiple of 64 (M={m}, K={k}, "
                         f"group={group}, {x2.dtype})")
    xp = torch.zeros(16, k, dtype=x2.dtype, device=x2.device)
    xp[:m] = x2
    words = xp.view(torch.int32).view(2, 8, k // group, group // 64, 2, 4, 4)  # [nt, r, g, H, j, c, w]
    return words.permute(2, 3, 0, 4, 1, 5, 6).reshape(k // group, group // 64, 2, 2, 32, 4)


def w_int_mma_linear_ref(x, words, scale, zero, group: int, bias=None):
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    packed = mma_unpack(words)
    return w_int_linear_ref(x, packed, scale, zero, 4, group, packed.shape[1] * 2, bias)


def _rows(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi or lo)) if text else (0, -1)


# Linears of ROWS[0] .. ROWS[1] rows run here where the layer has its mma words (attach; env QUANTA_INT_MMA_ROWS,
# "" = off; one row here too since the twenty-first session: the asm GEMV on x planes keeps layers without words)
ROWS = _rows(envs.get("QUANTA_INT_MMA_ROWS"))
CONFIG = envs.get("QUANTA_INT_MMA_CONFIG")
SHAPES = envs.get("QUANTA_INT_MMA_SHAPES")  # "NxK=t1_w8;NxK=..." (any row count the mma GEMV takes)
# gate_up linears of SILU_ROWS rows run here with the SiLU(gate) * up epilogue (fast_ops.norm_mlp: no silu_and_mul
# launch; at one row instead of the asm GEMV with x planes and its SiLU epilogue; env QUANTA_INT_MMA_SILU_ROWS, "" =
# off). H200, 8B W4A16_AWQ, tok/s, same call (h200_s9f_*): batch 1 462.0 -> 473.3, batch 4 1,554.4 -> 1,617.7,
# batch 16 4,791.5 -> 4,635.3 (slower there then; since the twenty-first session 1-16: silu_config's "_ps")
SILU_ROWS = _rows(envs.get("QUANTA_INT_MMA_SILU_ROWS"))
SILU_CONFIG = envs.get("QUANTA_INT_MMA_SILU_CONFIG")
# linears of XF_ROWS rows after an RMSNorm or silu_and_mul read x in fragment order written by it (x_frag; env
# QUANTA_INT_MMA_XF_ROWS, "" = off: batch 16, 9-16, H200, h200_s21b: 6,652.6 -> 6,624.2 tok/s; with qkv on
# t2_w8_px_ps 6,681.5 -> 6,689.8)
XF_ROWS = _rows(envs.get("QUANTA_INT_MMA_XF_ROWS"))


@dataclass(frozen=True)
class MmaConfig:
    tiles: int = 1  # TN: 16-row tiles a program
    warps: int = 4  # KW: warps a program, splitting the groups
    prefetch: bool = True  # PF: a warp's next group's words load before this group's math ("_np": after)
    xprefetch: bool = False  # PX: and the next group's x too ("_px"; x's registers twice)
    sprefetch: bool = False  # PS: and its scales and zeros ("_ps"; else they load in the group's own pass)
    deep: bool = False  # PF2: the words two groups ahead ("_p2"; 8 more registers)
    l2: bool = False  # L2PF: under PDL, all of the program's words prefetched into L2 before the wait ("_l2")
    regs: int = 0  # ptxas' register cap (Triton's maxnreg, "_r128"); 0: ptxas' own choice

    @classmethod
    def parse(cls, text: str) -> MmaConfig:
        """"t2_w4[_np][_px][_ps][_p2][_l2][_r128]" -> tiles 2, warps 4 (no prefetch of words; prefetch of x;
        of scales / zeros; words two groups ahead; all words into L2 before the PDL wait; at most 128 registers)."""
        parts = [p for p in text.split("_") if p]
        flags = ("np", "px", "ps", "p2", "l2")
        bad = [p for p in parts if p not in flags and not (p[0] in "twr" and p[1:].isdigit())]
        if bad or not parts:
            raise ValueError(f"mma GEMV config {text!r}: parts are t<tiles>, w<warps>, r<registers>, "
                             f"{', '.join(flags)} (e.g. 't1_w8_px')")
        vals = {p[0]: int(p[1:]) for p in parts if p[0] in "twr"}
        return cls(tiles=vals.get("t", 1), warps=vals.get("w", 4), prefetch="np" not in parts,
                   xprefetch="px" in parts, sprefetch="ps" in parts, deep="p2" in parts, l2="l2" in parts,
                   regs=vals.get("r", 0))

    def __str__(self) -> str:
        return (f"t{self.tiles}_w{self.warps}" + ("" if self.prefetch else "_np") + ("_px" if self.xprefetch else "")
                + ("_ps" if self.sprefetch else "") + ("_p2" if self.deep else "") + ("_l2" if self.l2 else "")
                + (f"_r{self.regs}" if self.regs else ""))


@functools.lru_cache(maxsize=256)
def config_for(m: int, n: int, k: int) -> MmaConfig:
    """QUANTA_INT_MMA_SHAPES' entry for (n, k), else QUANTA_INT_MMA_CONFIG, else by shape. H200, Llama-3.1-8B
    shapes, zero points, reading L2 flush (us; swap-AB `_dott` / asm GEMV in the same call; benchmarks/results/
    h200_s9*): 16 rows: qkv t2_w4_np 16.5 (18.3), o 14.9-15.0 (17.2), gate_up t2_w2_np 34.0 (47.1), down t2_w8 28.5
    (30.6; t1_w8 since 541a088: RESULTS.md, tenth session); one row: qkv t1_w8 11.4-11.5 (asm 10.5), o 10.1 (9.5),
    gate_up t1_w2 25.3 (30.3), down t1_w8 19.2 (18.3-19.8). The 9-16 row choices below are the eleventh session's."""
    shaped = shape_configs(SHAPES).get((n, k))
    if shaped or CONFIG:
        return shaped or MmaConfig.parse(CONFIG)
    if n >= 16384:  # many row tiles: small programs
        return MmaConfig(tiles=2 if m > 8 else 1, warps=2, prefetch=m <= 8, sprefetch=m > 8)
    # one tile a program, 8 warps: at two, 8B down_proj's 128 programs left 4 SMs idle (12.5% occupancy); qkv / o
    # at 9-16 rows on t2_w4_np had 192 / 128 programs of 4 warps, 9% / 6% achieved occupancy (Nsight Compute, H200;
    # 8B W4A16_AWQ batch 16: 5,394.7 vs 5,237.6 tok/s, h200_s11b). At 9-16 rows each warp's next group's x loads
    # with its words ("_px", 98 registers instead of 80) where the grid's 8-warp programs fit at ~2 an SM (down / o,
    # not qkv's 384 tiles): 16 rows down 21.9 vs 25.1 us, o 12.0 vs 12.5, qkv 18.0 vs 13.4; engine batch 16
    # 5,547.0 vs 5,423.7 / 5,407.2 tok/s (bf16 3,310.6, h200_s11c); and the words' prefetch kept beside it
    # ("t1_w8_px"): 5,749.7 vs 5,686.4 (t1_w8_np_px, sixteenth session, h200_s16b; fifteenth: 5,595.2 vs 5,530.7).
    # At 9-16 rows each group's scales and zeros load a group ahead too ("_ps", seventeenth session, h200_s17d):
    # 16 rows gate_up t2_w2_np 35.1 -> 26.9 us (others within 0.2 us); engine batch 16 5,758.1 / 5,778.6 ->
    # 5,899.5 / 5,916.5 tok/s (gate_up alone 5,805.1, h200_s17e; one row's SiLU t2_w2_ps: 488.1 vs 495.0, not taken)
    # One row (twenty-second session, h200_s22a-c; the chain bench, 8 weight copies a graph under PDL as in decode,
    # us): every warp of the grid resident at once (registers a thread -> warps an SM, ptxas allocating 256 a warp at
    # a time: 64 -> 32, 72 -> 28, 80 -> 25, 96 -> 21; 132 SMs), x a group ahead where that still fits. qkv's 3,072 warps
    # t1_w8_px_ps_r80 5.6 (t1_w8_ps_r96 5.9; t1_w8_px_ps_r96 takes 89 registers, 21 warps an SM: 7.7); o / down 16
    # warps a tile at 64 registers: t1_w16_ps_r64 4.6 / 9.9 (t1_w8_ps_r96 5.6 / 14.3). With silu_config(1)'s: 8B
    # W4A16_AWQ batch 1 527.6 / 526.3 -> 585.2 / 587.7 tok/s (bf16 230.5; the asm GEMV everywhere, h200_s21b: 502.3)
    from quanta.kernels.gemv_config import num_sms

    sms = num_sms(torch.device("cuda") if torch.cuda.is_available() else None)
    if m == 1 and n // 16 > 2 * sms:
        return MmaConfig(tiles=1, warps=8, prefetch=True, xprefetch=True, sprefetch=True, regs=80)
    if m == 1:
        return MmaConfig(tiles=1, warps=16, prefetch=True, sprefetch=True, regs=64)
    if m <= 8:
        return MmaConfig(tiles=1, warps=8, prefetch=k >= 8192)
    # 9-16 rows, chain bench (h200_s21a): qkv t2_w8_px_ps 8.4 (t1_w4_px_ps 10.4), down t2_w16_px_ps 14.6 (t1_w8_px_ps
    # 16.0; two tiles a program share x: where the grid still nearly fills the SMs); engine batch 16 6,652.6 ->
    # 6,736.2 tok/s (qkv's alone 6,681.5; bf16 3,323.3, h200_s21b)
    if n // 16 > 2 * sms:  # qkv (384 tiles; s17g-h: t1_w4_px_ps over t1_w8_px_ps, 5,971.4 / 5,948.6 vs 5,904.9)
        return MmaConfig(tiles=2, warps=8, prefetch=True, xprefetch=True, sprefetch=True)
    if k >= 8192 and n // 32 >= sms * 3 // 4:
        return MmaConfig(tiles=2, warps=16, prefetch=True, xprefetch=True, sprefetch=True)
    return MmaConfig(tiles=1, warps=8, prefetch=True, xprefetch=True, sprefetch=True)


@functools.lru_cache(maxsize=8)
def shape_configs(text: str) -> dict[tuple[int, int], MmaConfig]:
    """"NxK=t1_w8;NxK=t2_w4_np" -> {(N, K): MmaConfig} (QUANTA_INT_MMA_SHAPES)."""
    from quanta.kernels.gemv_config import shape_table

    return shape_table(text, MmaConfig.parse, "QUANTA_INT_MMA_SHAPES")


GROUPS = (64, 128)  # the group sizes the kernel takes (GROUP // 16 = 4 or 8 words a lane and group)


def supported(group: int, n: int, k: int, dtype: torch.dtype, device: torch.device) -> bool:
    """What the kernel takes: Gluon, CUDA sm_90 (bf16 needs sub.bf16x2), fp16 / bf16, rows and K in whole tiles
    and groups of 64 or 128 (its loads cover one or two 64-k halves of a group: not 256, nor a per-channel int4
    checkpoint's one group as wide as K)."""
    return (HAS_GLUON and group in GROUPS and n % 16 == 0 and k % group == 0 and dtype in _TYPES
            and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0))


def attach(layer, group: int) -> None:
    """Give a W4 layer its mma words and packed scales (layer.weight_mma / weight_mma_sz, next to the canonical bytes
    and scales that LLM.save writes, the one-row asm GEMV and the many-row dequantize path read: + 0.5 byte a weight
    and 4 bytes a (row, group) of GPU memory) where the kernel takes it."""
    packed = layer.weight_packed
    if (ROWS[1] < ROWS[0] and SILU_ROWS[1] < SILU_ROWS[0]) or getattr(layer, "weight_g_idx", None) is not None:
        return
    k, n = layer.in_features, layer.out_features
    if packed.shape[1] * 2 != k or not supported(group, n, k, layer.weight_scale.dtype, packed.device):
        return
    layer.weight_mma = mma_pack(packed, group)
    layer.weight_mma_sz = mma_pack_sz(layer.weight_scale, getattr(layer, "weight_zero_point", None))


def usable(layer, x: torch.Tensor) -> bool:
    words = getattr(layer, "weight_mma", None)
    m = x.numel() // layer.in_features
    return words is not None and x.dtype in _TYPES and ROWS[0] <= m <= min(ROWS[1], 16)


def usable_xf(layer, x: torch.Tensor) -> bool:
    """usable, at XF_ROWS rows: the op before (RMSNorm, silu_and_mul) writes x in fragment order (x_frag)."""
    m = x.numel() // layer.in_features
    return XF_ROWS[0] <= m <= XF_ROWS[1] and usable(layer, x)


def usable_silu(layer, x: torch.Tensor) -> bool:
    """SiLU(gate) * up of this gate | up layer on its mma words (SILU_ROWS rows; gate and up of whole tiles)."""
    words = getattr(layer, "weight_mma", None)
    m = x.numel() // layer.in_features
    return (words is not None and x.dtype in _TYPES and SILU_ROWS[0] <= m <= min(SILU_ROWS[1], 16)
            and words.shape[0] % 2 == 0)


@functools.lru_cache(maxsize=32)
def silu_config(m: int) -> MmaConfig:
    """The SiLU epilogue's config (tiles: the gate / up pair): QUANTA_INT_MMA_SILU_CONFIG, else 2 warps; one row
    capped at 128 registers (ptxas then issues the next group's loads before this group's math: offline SASS, 96
    registers "7L 4H 1L 2H 4L ..." -> "16L 16H"). H200, 8B gate_up, isolated 26.4 -> 23.7 us; W4A16_AWQ batch 1
    494.0 / 493.9 / 495.1 -> 496.4 / 496.1 tok/s (eighteenth session, h200_s18a / c; 2-8 rows not measured). One
    row with the packed scales a group ahead too ("_ps", twentieth session, h200_s20c; slower on the old layout):
    isolated 26.3 -> 23.8 us, batch 1 496.0 -> 506.3 tok/s (old layout and config 500.2, bf16 234.3)."""
    if SILU_CONFIG:
        return MmaConfig.parse(SILU_CONFIG)
    # 9-16 rows: scales a group ahead, as the plain gate_up's t2_w2_np_ps (chain bench 22.4 us, the plain gate_up
    # 22.8 + silu_and_mul; batch 16 6,441.6 / 6,445.4 -> 6,644.7 / 6,633.3 tok/s, h200_s21a). One row: words two
    # groups ahead (t2_w2_ps_p2_r128, chain 18.3 vs 20.2 us; batch 1 502.3 -> 514.4 tok/s, h200_s21b) until the
    # twenty-second session: 4 warps a gate / up pair at 72 registers, x a group ahead (3,584 warps, 28 an SM at 72:
    # one wave; 40 bytes of ptxas stack), chain 18.0 vs 18.4 us (h200_s22b)
    if m == 1:
        return MmaConfig(tiles=2, warps=4, prefetch=True, xprefetch=True, sprefetch=True, regs=72)
    return MmaConfig(tiles=2, warps=2, prefetch=m <= 8, sprefetch=m > 8)


def linear(layer, x: torch.Tensor, group: int, act: bool = False, inv: tuple | None = None,
           xf: torch.Tensor | None = None) -> torch.Tensor:
    """The layer's int4 weight times x (usable(layer, x)) on its mma words; act: SiLU(gate) * up (usable_silu);
    inv, xf: see w_int_mma_linear."""
    m = x.numel() // layer.in_features
    cfg = silu_config(m) if act else config_for(m, layer.out_features, layer.in_features)
    return w_int_mma_linear(x, layer.weight_mma, layer.weight_scale, getattr(layer, "weight_zero_point", None), group,
                            layer.bias, cfg, act, inv, layer.weight_mma_sz, xf)


def _inv_args(inv: tuple | None, m: int, k: int) -> dict:
    if inv is None:
        return {}
    parts, eps = inv
    if m != 1:
        raise ValueError(f"a split norm's xw is one row (M={m})")
    return dict(part_ptr=parts, n_parts=parts.numel(), k_norm=k, eps=eps, INV_RMS=True, NP_PAD=next_pow2(parts.numel()))


def w_int_mma_linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                     bias: torch.Tensor | None = None, config: MmaConfig | None = None,
                     act: bool = False, inv: tuple | None = None, sz: torch.Tensor | None = None,
                     xf: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] (<= 16 rows) @ dequant(W)^T (+ bias) -> [..., N] in x.dtype, W as mma words (mma_pack).
    act: W is gate | up [2I, K] (I a multiple of 16) and the result SiLU(gate) * up [..., I] (one launch; the
    config's tiles become the pair). inv = (partials, eps): x is one row of a split norm's xw (kernels/split_norm.py),
    the sums are scaled by its inverse RMS. sz: mma_pack_sz(scale, zero), packed here when not given. xf: x_frag(x,
    group), read instead of x (x still gives the rows and dtype)."""
    t, g, halves = words.shape[:3]
    n, k, wpg = t * 16, g * group, 4 * halves
    if act and t % 2:
        raise ValueError(f"the SiLU epilogue needs gate and up of whole 16-row tiles each (N={n})")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte x loads
        x2 = x2.contiguous() if x2.stride(-1) != 1 or x2.stride(0) % 8 else x2.clone()
    m = x2.shape[0]
    if m > 16 or wpg * 16 != group or group not in GROUPS:
        raise ValueError(f"w_int_mma_linear takes <= 16 rows and groups of {' or '.join(map(str, GROUPS))} matching "
                         f"the words' (M={m}, group {group}, words for {wpg * 16})")
    if xf is not None and tuple(xf.shape) != (g, group // 64, 2, 2, 32, 4):
        raise ValueError(f"xf must be x_frag(x, {group}) of shape {(g, group // 64, 2, 2, 32, 4)}, "
                         f"got {tuple(xf.shape)}")
    n_out = n // 2 if act else n
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    cfg = config or MmaConfig()
    tiles = 2 if act else cfg.tiles
    nt = 1 if m <= 8 else 2
    asm, cons = mma_ptx(x.dtype, nt)
    xw = x2.view(torch.int32) if xf is None else xf  # [m, k / 2] words, or x_frag's
    use_pdl = pdl_enabled(x.device)  # kernels/pdl.py: the first group's words load before the wait
    grid = (t // 2 if act else (t + tiles - 1) // tiles,)
    sz = mma_pack_sz(scale, zero) if sz is None else sz
    _w4_mma_kernel[grid](
        xw, words, sz, bias if bias is not None else y, y, m, n, g, xw.stride(0) if xf is None else 0, y.stride(0),
        ASM=asm, CONS=cons, MAGIC16=_TYPES[x.dtype][2], GROUP=group, NT=nt, TN=tiles, KW=cfg.warps,
        S_BF16=scale.dtype == torch.bfloat16, HAS_BIAS=bias is not None, PF=cfg.prefetch, USE_PDL=use_pdl, ACT=act,
        PX=cfg.xprefetch, PS=cfg.sprefetch, PF2=cfg.deep, L2PF=cfg.l2 and use_pdl, XF=xf is not None,
        **_inv_args(inv, m, k),
        num_warps=cfg.warps, **({"maxnreg": cfg.regs} if cfg.regs else {}), **pdl_launch_kwargs(use_pdl))
    return y.reshape(*x.shape[:-1], n_out)

