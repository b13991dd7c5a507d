"""int4 weight-only GEMV on the tensor cores (W4A16 decode, 1 - 16 rows; issue 6), written in Gluon.

The asm GEMV (w_int_gemv_asm.py, one row) spends ~3.4 SASS instructions a weight on packed half2 arithmetic, the
swap-AB kernel (w_int_gemv_t.py, <= 16 rows) ~5.4 (its tile reaches the wgmma operand through shared memory a byte
at a time). Here the weight is stored in the register order of `mma.sync.m16n8k16`'s A operand, so a thread's
int32 word IS its A fragment for one 16 x 16 tile (8 nibbles): per word, three shifts and four `lop3` make the
four bf16x2 (fp16x2) registers OFFSET + q (exact), four half2 subtracts take OFFSET + z away (exact, |q - z| <=
15), and one `mma.sync` per 8 batch rows multiplies them with x^T (fp32 accumulate). The group's scale multiplies
the fp32 partial once per (row, group) after its K16 steps. Static SASS of the K loop (sm_90, offline): ~2.0
instructions a weight at 1 - 8 rows, ~2.2 at 16, and no shared memory in the loop.

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
KW warps take every KW-th group (each warp's next group's words load before this one's math: "PF"), summed across
warps at the end. ACT (gate | up weights): TN = 2 holds gate tile t and up tile t + N / 32, and the epilogue stores
SiLU(gate) * up. PDL: the first group's words load before `griddepcontrol.wait` (coherent loads: ptxas hoists the
wait above `.nc` ones). sm_90 (bf16 needs sub.bf16x2). The twin is `w_int_mma_linear_ref` (unpack the words, then
w_int_kernel.w_int_linear_ref).

Measured (H200, Llama-3.1-8B shapes, W4A16_AWQ, same calls; benchmarks/results/h200_s9*): the linears of a decode
step in isolation (bench_int_gemv.py, reading L2 flush) 2,490 / 2,606 / 2,806 / 3,247 us at 2 / 4 / 8 / 16 rows
against 5,275 / 7,654 / 3,607 / 3,648 for the kernels they replace; in the engine (bench_quant.py) batch 4
516.4 -> 1,557.5 tok/s, batch 16 4,493.9 -> 4,782.8 (bf16: 854.2 / 3,274.0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quanta import envs
from quanta.kernels.pdl import pdl_enabled, pdl_launch_kwargs
from quanta.quantization.int_quant import unpack_int4

try:  # Gluon: Triton >= 3.5 (GPU only; the CPU runs the twin)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAS_GLUON = True
except Exception:  # noqa: BLE001 - no triton, or a triton without gluon
    HAS_GLUON = False
    gluon = gl = None

# x.dtype: (PTX pair type, PTX scalar type, 16-bit magic: OFFSET as a half, OFFSET)
_TYPES = {torch.bfloat16: ("bf16x2", "bf16", 0x4300, 128.0), torch.float16: ("f16x2", "f16", 0x6400, 1024.0)}

_DEQ = """shr.u32 s, $W, 4;
lop3.b32 a0, $W, 0x000F000F, MAGIC, 0xEA;
lop3.b32 a1, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $W, 8;
lop3.b32 a2, s, 0x000F000F, MAGIC, 0xEA;
shr.u32 s, $W, 12;
lop3.b32 a3, s, 0x000F000F, MAGIC, 0xEA;
sub.rn.T a0, a0, $ZL;
sub.rn.T a1, a1, $ZH;
sub.rn.T a2, a2, $ZL;
sub.rn.T a3, a3, $ZH;
"""
_MMA = "mma.sync.aligned.m16n8k16.row.col.f32.S.S.f32 {D}, {{a0, a1, a2, a3}}, {{XA, XB}}, {C};\n"


def mma_ptx(dtype: torch.dtype, nt: int) -> tuple[str, str]:
    """(asm, constraints) of one K16 step for nt n-tiles: outputs d[4 nt] (f32); inputs w, z_lo, z_hi (half2 of
    OFFSET + z for rows r and r + 8), then per n-tile x words (k slots 2c.., 2c+8..), then c[4 nt] (f32)."""
    t, s, magic, _ = _TYPES[dtype]
    n_out = 4 * nt
    w, zl, zh = n_out, n_out + 1, n_out + 2
    body = _DEQ.replace("$W", f"${w}").replace("$ZL", f"${zl}").replace("$ZH", f"${zh}")
    body = body.replace("MAGIC", f"0x{magic * 0x10001:08X}").replace(".T ", f".{t} ")
    for i in range(nt):
        xa, xb = n_out + 3 + 2 * i, n_out + 4 + 2 * i
        c0 = n_out + 3 + 2 * nt + 4 * i
        d = "{" + ", ".join(f"${4 * i + j}" for j in range(4)) + "}"
        c = "{" + ", ".join(f"${c0 + j}" for j in range(4)) + "}"
        body += _MMA.format(D=d, C=c).replace("XA", f"${xa}").replace("XB", f"${xb}").replace(".S.S.", f".{s}.{s}.")
    asm = "{\n.reg .b32 s, a0, a1, a2, a3;\n" + body + "}"
    constraints = ",".join(["=f"] * n_out + ["r"] * (3 + 2 * nt) + ["f"] * n_out)
    return asm, constraints


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


def w_int_mma_linear_ref(x, words, scale, zero, group: int, bias=None):
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    packed = mma_unpack(words)
    return w_int_linear_ref(x, packed, scale, zero, 4, group, packed.shape[1] * 2, bias)


def _rows(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition("-")
    return (int(lo), int(hi or lo)) if text else (0, -1)


# Linears of ROWS[0] .. ROWS[1] rows run here where the layer has its mma words (attach; env QUANTA_INT_MMA_ROWS,
# "" = off; one row stays on the asm GEMV, which has the PDL preload, x planes and the SiLU epilogue)
ROWS = _rows(envs.get("QUANTA_INT_MMA_ROWS"))
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
    prefetch: bool = True  # PF: a warp's next group's words load before this group's math ("_np": after)

    @classmethod
    def parse(cls, text: str) -> MmaConfig:
        """"t2_w4[_np]" -> tiles 2, warps 4 (no prefetch)."""
        parts = [p for p in text.split("_") if p]
        vals = {p[0]: int(p[1:]) for p in parts if p[0] in "tw"}
        return cls(tiles=vals.get("t", 1), warps=vals.get("w", 4), prefetch="np" not in parts)

    def __str__(self) -> str:
        return f"t{self.tiles}_w{self.warps}" + ("" if self.prefetch else "_np")


_LD4W = "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];"  # weights: streamed once
_LD4X = "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];"  # x: read by every program (L1 / L2)
# the first group's words before the PDL wait: a coherent load (ptxas hoists the wait above .nc loads)
_LD4P = "ld.global.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];"

if HAS_GLUON:
    LD4W = gl.constexpr(_LD4W)
    LD4X = gl.constexpr(_LD4X)
    LD4P = gl.constexpr(_LD4P)

    @gluon.jit
    def _ld4(ptr, ASM: gl.constexpr, PURE: gl.constexpr = True):
        """Four int32 words from 16-byte aligned ptr, as four tensors of ptr's shape (one vector load). PURE False
        (x under PDL): kept in program order, after the griddepcontrol.wait."""
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l", [ptr.to(gl.int64)],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=PURE, pack=1)

    @gluon.jit
    def _pdl_begin():
        """kernels/pdl.pdl_begin in Gluon: wait for the previous kernel, then let the next one launch."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)

    @gluon.jit
    def _k16(ASM: gl.constexpr, CONS: gl.constexpr, NT: gl.constexpr, w, zl, zh, xa, xb, xa1, xb1, a0, a1, a2, a3,
             a4, a5, a6, a7):
        """One K16 step: the accumulators of NT n-tiles (a4..a7 pass through when NT == 1)."""
        if NT == 2:
            a0, a1, a2, a3, a4, a5, a6, a7 = gl.inline_asm_elementwise(
                ASM, CONS, [w, zl, zh, xa, xb, xa1, xb1, a0, a1, a2, a3, a4, a5, a6, a7],
                dtype=(gl.float32, gl.float32, gl.float32, gl.float32, gl.float32, gl.float32, gl.float32,
                       gl.float32), is_pure=True, pack=1)
        else:
            a0, a1, a2, a3 = gl.inline_asm_elementwise(ASM, CONS, [w, zl, zh, xa, xb, a0, a1, a2, a3],
                                                       dtype=(gl.float32, gl.float32, gl.float32, gl.float32),
                                                       is_pure=True, pack=1)
        return a0, a1, a2, a3, a4, a5, a6, a7

    @gluon.jit
    def _wload(w_l, g, G, GROUP: gl.constexpr, PURE: gl.constexpr = True):
        """Group g's (clamped to G - 1) words of each lane: 8 tensors (GROUP 64: the last 4 repeat the first).
        PURE False: issued where written (the preload before the PDL wait)."""
        WPG: gl.constexpr = GROUP // 16
        w_g = w_l + gl.minimum(g, G - 1) * (32 * WPG)
        w0, w1, w2, w3 = _ld4(w_g, LD4W if PURE else LD4P, PURE)
        w4 = w0
        w5 = w1
        w6 = w2
        w7 = w3
        if WPG == 8:
            w4, w5, w6, w7 = _ld4(w_g + 4, LD4W if PURE else LD4P, PURE)
        return w0, w1, w2, w3, w4, w5, w6, w7

    @gluon.jit
    def _group(g, G, w0, w1, w2, w3, w4, w5, w6, w7, x_l, x_l1, s_ptr, z_ptr, row_lo, row_hi, stride_sn,
               stride_zn, zeros, t0, t1, t2, t3, t4, t5, t6, t7, ASM: gl.constexpr, CONS: gl.constexpr,
               MAGIC16: gl.constexpr, GROUP: gl.constexpr, NT: gl.constexpr, HAS_ZERO: gl.constexpr,
               USE_PDL: gl.constexpr):
        """The totals plus group g's (one a warp, [KW, 1, 1]; past G: adds nothing) scaled K16 products; w0..w7:
        its words (_wload)."""
        WPG: gl.constexpr = GROUP // 16
        gc = gl.minimum(g, G - 1)
        x_g = x_l + gc * (GROUP // 2)
        x_g1 = x_l1 + gc * (GROUP // 2)
        s_lo = gl.where(g < G, gl.load(s_ptr + row_lo * stride_sn + gc).to(gl.float32), 0.0)
        s_hi = gl.where(g < G, gl.load(s_ptr + row_hi * stride_sn + gc).to(gl.float32), 0.0)
        if HAS_ZERO:
            zl = (gl.load(z_ptr + row_lo * stride_zn + gc).to(gl.int32) | MAGIC16) * 65537
            zh = (gl.load(z_ptr + row_hi * stride_zn + gc).to(gl.int32) | MAGIC16) * 65537
        else:
            zl = gl.full_like(zeros, (8 | MAGIC16) * 65537, dtype=gl.int32)
            zh = zl
        a0 = zeros
        a1 = zeros
        a2 = zeros
        a3 = zeros
        a4 = zeros
        a5 = zeros
        a6 = zeros
        a7 = zeros
        for i in gl.static_range(WPG // 4):  # four K16 steps: 4 words a lane, 8 x words a batch row
            x0, x1, x2, x3 = _ld4(x_g + 8 * i, LD4X, not USE_PDL)
            x4, x5, x6, x7 = _ld4(x_g + 8 * i + 4, LD4X, not USE_PDL)
            y0 = x0
            y1 = x1
            y2 = x2
            y3 = x3
            y4 = x4
            y5 = x5
            y6 = x6
            y7 = x7
            if NT == 2:
                y0, y1, y2, y3 = _ld4(x_g1 + 8 * i, LD4X, not USE_PDL)
                y4, y5, y6, y7 = _ld4(x_g1 + 8 * i + 4, LD4X, not USE_PDL)
            if i == 0:
                v0 = w0
                v1 = w1
                v2 = w2
                v3 = w3
            else:
                v0 = w4
                v1 = w5
                v2 = w6
                v3 = w7
            a0, a1, a2, a3, a4, a5, a6, a7 = _k16(ASM, CONS, NT, v0, zl, zh, x0, x1, y0, y1,
                                                  a0, a1, a2, a3, a4, a5, a6, a7)
            a0, a1, a2, a3, a4, a5, a6, a7 = _k16(ASM, CONS, NT, v1, zl, zh, x2, x3, y2, y3,
                                                  a0, a1, a2, a3, a4, a5, a6, a7)
            a0, a1, a2, a3, a4, a5, a6, a7 = _k16(ASM, CONS, NT, v2, zl, zh, x4, x5, y4, y5,
                                                  a0, a1, a2, a3, a4, a5, a6, a7)
            a0, a1, a2, a3, a4, a5, a6, a7 = _k16(ASM, CONS, NT, v3, zl, zh, x6, x7, y6, y7,
                                                  a0, a1, a2, a3, a4, a5, a6, a7)
        t0 += a0 * s_lo
        t1 += a1 * s_lo
        t2 += a2 * s_hi
        t3 += a3 * s_hi
        if NT == 2:
            t4 += a4 * s_lo
            t5 += a5 * s_lo
            t6 += a6 * s_hi
            t7 += a7 * s_hi
        return t0, t1, t2, t3, t4, t5, t6, t7

    @gluon.jit
    def _w4_mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, G, stride_xm, stride_sn, stride_zn, stride_ym,
                       ASM: gl.constexpr, CONS: gl.constexpr, MAGIC16: gl.constexpr, GROUP: gl.constexpr,
                       NT: gl.constexpr, TN: gl.constexpr, KW: gl.constexpr, HAS_ZERO: gl.constexpr,
                       HAS_BIAS: gl.constexpr, PF: gl.constexpr = True, USE_PDL: gl.constexpr = False,
                       ACT: gl.constexpr = False):
        WPG: gl.constexpr = GROUP // 16  # words a lane and group (a multiple of 4)
        L3: gl.constexpr = gl.BlockedLayout([1, TN, 1], [1, 1, 32], [KW, 1, 1], [2, 1, 0])
        kw = gl.expand_dims(gl.expand_dims(gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3))), 1), 2)
        tn = gl.expand_dims(gl.expand_dims(gl.arange(0, TN, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3))), 0), 2)
        ln = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
        n_tiles = N // 16
        if ACT:  # W = gate | up, TN = 2: gate tile pid and up tile pid + n_tiles / 2, SiLU(gate) * up stored
            tile_c = gl.program_id(0) + tn * (n_tiles // 2)
        else:
            tile_c = gl.minimum(gl.program_id(0) * TN + tn, n_tiles - 1)  # [1, TN, 1]
        row_lo = (tile_c * 16 + ln // 4).to(gl.int64)  # [1, TN, 32]
        row_hi = row_lo + 8
        # x as int32 words: lane l reads batch row l // 4 (+ 8; rows >= M clamped: they only feed unstored
        # columns of the product), words (l % 4) * GROUP / 8 .. + 2 WPG of a group
        xr = gl.minimum(ln // 4, M - 1)
        x_l = x_ptr + xr.to(gl.int64) * stride_xm + (ln % 4) * (GROUP // 8)  # [1, 1, 32]
        xr1 = gl.minimum(ln // 4 + 8, M - 1)
        x_l1 = x_ptr + xr1.to(gl.int64) * stride_xm + (ln % 4) * (GROUP // 8)
        w_l = w_ptr + tile_c.to(gl.int64) * G * (32 * WPG) + ln * WPG  # [1, TN, 32]
        zeros = gl.zeros([KW, TN, 32], gl.float32, L3)
        t0 = zeros
        t1 = zeros
        t2 = zeros
        t3 = zeros
        t4 = zeros
        t5 = zeros
        t6 = zeros
        t7 = zeros
        # the K loop: each warp's next group's words load before this group's math (PF), or with it
        w0, w1, w2, w3, w4, w5, w6, w7 = _wload(w_l, kw, G, GROUP, not USE_PDL)
        if USE_PDL:  # the first group's words are in flight: now wait for x (kernels/pdl.py)
            _pdl_begin()
        for g0 in range(0, G, KW):
            v0, v1, v2, v3, v4, v5, v6, v7 = w0, w1, w2, w3, w4, w5, w6, w7
            if PF:
                w0, w1, w2, w3, w4, w5, w6, w7 = _wload(w_l, g0 + KW + kw, G, GROUP)
            t0, t1, t2, t3, t4, t5, t6, t7 = _group(
                g0 + kw, G, v0, v1, v2, v3, v4, v5, v6, v7, x_l, x_l1, s_ptr, z_ptr, row_lo, row_hi, stride_sn,
                stride_zn, zeros, t0, t1, t2, t3, t4, t5, t6, t7, ASM, CONS, MAGIC16, GROUP, NT, HAS_ZERO, USE_PDL)
            if not PF:
                w0, w1, w2, w3, w4, w5, w6, w7 = _wload(w_l, g0 + KW + kw, G, GROUP)
        # across the KW warps; lane l holds rows 16 t + l // 4 (+ 8), batch rows 2 (l % 4) (+ 1) (+ 8)
        LR: gl.constexpr = gl.SliceLayout(0, L3)
        if ACT:
            sel = gl.expand_dims(gl.arange(0, TN, layout=gl.SliceLayout(1, LR)), 1)  # [2, 1]: gate, up
            l1 = gl.arange(0, 32, layout=gl.SliceLayout(0, LR))
            r1 = (gl.program_id(0) * 16 + l1 // 4).to(gl.int64)  # [32] rows of the output
            c1 = 2 * (l1 % 4)
            _store_act(y_ptr, b_ptr, gl.sum(t0, axis=0), sel, r1, c1, M, N, stride_ym, HAS_BIAS)
            _store_act(y_ptr, b_ptr, gl.sum(t1, axis=0), sel, r1, c1 + 1, M, N, stride_ym, HAS_BIAS)
            _store_act(y_ptr, b_ptr, gl.sum(t2, axis=0), sel, r1 + 8, c1, M, N, stride_ym, HAS_BIAS)
            _store_act(y_ptr, b_ptr, gl.sum(t3, axis=0), sel, r1 + 8, c1 + 1, M, N, stride_ym, HAS_BIAS)
            if NT == 2:
                _store_act(y_ptr, b_ptr, gl.sum(t4, axis=0), sel, r1, c1 + 8, M, N, stride_ym, HAS_BIAS)
                _store_act(y_ptr, b_ptr, gl.sum(t5, axis=0), sel, r1, c1 + 9, M, N, stride_ym, HAS_BIAS)
                _store_act(y_ptr, b_ptr, gl.sum(t6, axis=0), sel, r1 + 8, c1 + 8, M, N, stride_ym, HAS_BIAS)
                _store_act(y_ptr, b_ptr, gl.sum(t7, axis=0), sel, r1 + 8, c1 + 9, M, N, stride_ym, HAS_BIAS)
            return
        tile_r = gl.program_id(0) * TN + gl.expand_dims(gl.arange(0, TN, layout=gl.SliceLayout(1, LR)), 1)
        ln_r = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, LR)), 0)
        ok = tile_r < n_tiles
        r0 = (tile_r * 16 + ln_r // 4).to(gl.int64)  # [TN, 32]
        m0 = 2 * (ln_r % 4)
        _store(y_ptr, b_ptr, gl.sum(t0, axis=0), r0, m0, ok, M, stride_ym, HAS_BIAS)
        _store(y_ptr, b_ptr, gl.sum(t1, axis=0), r0, m0 + 1, ok, M, stride_ym, HAS_BIAS)
        _store(y_ptr, b_ptr, gl.sum(t2, axis=0), r0 + 8, m0, ok, M, stride_ym, HAS_BIAS)
        _store(y_ptr, b_ptr, gl.sum(t3, axis=0), r0 + 8, m0 + 1, ok, M, stride_ym, HAS_BIAS)
        if NT == 2:
            _store(y_ptr, b_ptr, gl.sum(t4, axis=0), r0, m0 + 8, ok, M, stride_ym, HAS_BIAS)
            _store(y_ptr, b_ptr, gl.sum(t5, axis=0), r0, m0 + 9, ok, M, stride_ym, HAS_BIAS)
            _store(y_ptr, b_ptr, gl.sum(t6, axis=0), r0 + 8, m0 + 8, ok, M, stride_ym, HAS_BIAS)
            _store(y_ptr, b_ptr, gl.sum(t7, axis=0), r0 + 8, m0 + 9, ok, M, stride_ym, HAS_BIAS)

    @gluon.jit
    def _store_act(y_ptr, b_ptr, v, sel, row, m, M, N, stride_ym, HAS_BIAS: gl.constexpr):
        """v [2, 32]: (gate, up) of rows `row` (< N / 2) -> y[m, row] = SiLU(gate) * up (fp32 math)."""
        gate = gl.sum(gl.where(sel == 0, v, 0.0), axis=0)
        up = gl.sum(gl.where(sel == 1, v, 0.0), axis=0)
        if HAS_BIAS:
            gate = gate + gl.load(b_ptr + row).to(gl.float32)
            up = up + gl.load(b_ptr + row + N // 2).to(gl.float32)
        act = gate / (1.0 + gl.exp(-gate)) * up
        gl.store(y_ptr + m.to(gl.int64) * stride_ym + row, act.to(y_ptr.dtype.element_ty), mask=m < M)

    @gluon.jit
    def _store(y_ptr, b_ptr, v, row, m, ok, M, stride_ym, HAS_BIAS: gl.constexpr):
        if HAS_BIAS:
            v = v + gl.load(b_ptr + row, mask=ok, other=0.0).to(gl.float32)
        gl.store(y_ptr + m.to(gl.int64) * stride_ym + row, v.to(y_ptr.dtype.element_ty), mask=ok & (m < M))


def config_for(m: int, n: int, k: int) -> MmaConfig:
    """QUANTA_INT_MMA_CONFIG, else by shape. H200, Llama-3.1-8B shapes, zero points, reading L2 flush (us; swap-AB
    `_dott` / asm GEMV in the same call; benchmarks/results/h200_s9*): 16 rows: qkv t2_w4_np 16.5 (18.3), o 14.9-15.0
    (17.2), gate_up t2_w2_np 34.0 (47.1), down t2_w8 28.5 (30.6); one row: qkv t1_w8 11.4-11.5 (asm 10.5), o
    10.1 (9.5), gate_up t1_w2 25.3 (30.3), down t1_w8 19.2 (18.3-19.8)."""
    if CONFIG:
        return MmaConfig.parse(CONFIG)
    tiles = 2 if m > 8 else 1
    if k >= 8192:  # few row tiles, long K: more warps share it
        return MmaConfig(tiles=tiles, warps=8)
    if n >= 16384:  # many row tiles: small programs
        return MmaConfig(tiles=tiles, warps=2, prefetch=m <= 8)
    return MmaConfig(tiles=tiles, warps=4 if m > 8 else 8, prefetch=False)


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
    layer.weight_mma = mma_pack(packed, group)


def usable(layer, x: torch.Tensor) -> bool:
    words = getattr(layer, "weight_mma", None)
    m = x.numel() // layer.in_features
    return words is not None and x.dtype in _TYPES and ROWS[0] <= m <= min(ROWS[1], 16)


def usable_silu(layer, x: torch.Tensor) -> bool:
    """SiLU(gate) * up of this gate | up layer on its mma words (SILU_ROWS rows; gate and up of whole tiles)."""
    words = getattr(layer, "weight_mma", None)
    m = x.numel() // layer.in_features
    return (words is not None and x.dtype in _TYPES and SILU_ROWS[0] <= m <= min(SILU_ROWS[1], 16)
            and words.shape[0] % 2 == 0)


def silu_config(m: int) -> MmaConfig:
    """The SiLU epilogue's config (tiles: the gate / up pair): QUANTA_INT_MMA_SILU_CONFIG, else 2 warps."""
    return MmaConfig.parse(SILU_CONFIG) if SILU_CONFIG else MmaConfig(tiles=2, warps=2, prefetch=m <= 8)


def linear(layer, x: torch.Tensor, group: int, act: bool = False) -> torch.Tensor:
    """The layer's int4 weight times x (usable(layer, x)) on its mma words; act: SiLU(gate) * up (usable_silu)."""
    m = x.numel() // layer.in_features
    cfg = silu_config(m) if act else config_for(m, layer.out_features, layer.in_features)
    return w_int_mma_linear(x, layer.weight_mma, layer.weight_scale, getattr(layer, "weight_zero_point", None), group,
                            layer.bias, cfg, act)


def w_int_mma_linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int,
                     bias: torch.Tensor | None = None, config: MmaConfig | None = None,
                     act: bool = False) -> torch.Tensor:
    """x [..., K] (<= 16 rows) @ dequant(W)^T (+ bias) -> [..., N] in x.dtype, W as mma words (mma_pack).
    act: W is gate | up [2I, K] (I a multiple of 16) and the result SiLU(gate) * up [..., I] (one launch; the
    config's tiles become the pair)."""
    t, g, _, wpg = words.shape
    n, k = t * 16, g * group
    if act and t % 2:
        raise ValueError(f"the SiLU epilogue needs gate and up of whole 16-row tiles each (N={n})")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1 or x2.stride(0) % 8 or x2.data_ptr() % 16:  # 16-byte x loads
        x2 = x2.contiguous() if x2.stride(-1) != 1 or x2.stride(0) % 8 else x2.clone()
    m = x2.shape[0]
    if m > 16 or wpg * 16 != group or wpg % 4:
        raise ValueError(f"w_int_mma_linear takes <= 16 rows and groups of 64k matching the words' (M={m}, "
                         f"group {group}, words for {wpg * 16})")
    n_out = n // 2 if act else n
    y = torch.empty(m, n_out, dtype=x.dtype, device=x.device)
    if m == 0:
        return y.reshape(*x.shape[:-1], n_out)
    cfg = config or MmaConfig()
    tiles = 2 if act else cfg.tiles
    nt = 1 if m <= 8 else 2
    asm, cons = mma_ptx(x.dtype, nt)
    xw = x2.view(torch.int32)  # [m, k / 2]
    use_pdl = pdl_enabled(x.device)  # kernels/pdl.py: the first group's words load before the wait
    grid = (t // 2 if act else triton_cdiv(t, tiles),)
    _w4_mma_kernel[grid](
        xw, words, scale, zero if zero is not None else scale, bias if bias is not None else scale, y,
        m, n, g, xw.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0, y.stride(0),
        ASM=asm, CONS=cons, MAGIC16=_TYPES[x.dtype][2], GROUP=group, NT=nt, TN=tiles, KW=cfg.warps,
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, PF=cfg.prefetch, USE_PDL=use_pdl, ACT=act,
        num_warps=cfg.warps, **pdl_launch_kwargs(use_pdl))
    return y.reshape(*x.shape[:-1], n_out)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
