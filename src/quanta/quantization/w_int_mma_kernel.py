"""The Gluon kernel of the tensor-core int4 GEMV (w_int_mma.py has the layout, the dispatch and the launcher).

One K16 step of a lane is `mma_ptx`'s inline PTX: dequantize its word into the four A registers, then one
`mma.sync.m16n8k16` per n-tile of 8 batch rows. `_w4_mma_kernel`: TN 16-row tiles a program, its KW warps on every
KW-th group of K (words prefetched one group ahead, "PF", or two, "PF2"; with "PX" the group's x as well, with "PS"
its scales and zeros; "L2PF", under PDL: all its words asked of L2 before the wait), summed across warps, stored
(or SiLU(gate) * up, ACT); INV_RMS: x is a split norm's xw, the sums scaled by its inverse RMS (kernels/split_norm.py).
"""

from __future__ import annotations

import functools

import torch

try:  # Gluon: Triton >= 3.5 (GPU only; the CPU runs the twin)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAS_GLUON = True
except Exception:  # noqa: BLE001 - no triton, or a triton without gluon
    HAS_GLUON = False
    gluon = gl = None

# x.dtype: (PTX pair type, PTX scalar type, 16-bit magic: OFFSET as a half: 128 in bf16, 1024 in fp16)
_TYPES = {torch.bfloat16: ("bf16x2", "bf16", 0x4300), torch.float16: ("f16x2", "f16", 0x6400)}

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


@functools.lru_cache(maxsize=8)
def mma_ptx(dtype: torch.dtype, nt: int) -> tuple[str, str]:
    """(asm, constraints) of one K16 step for nt n-tiles: outputs d[4 nt] (f32); inputs w, z_lo, z_hi (half2 of
    OFFSET + z for rows r and r + 8), then per n-tile x words (k slots 2c.., 2c+8..), then c[4 nt] (f32)."""
    t, s, magic = _TYPES[dtype]
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


_LD4W = "ld.global.nc.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];"  # weights: streamed once
_LD4X = "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];"  # x: read by every program (L1 / L2)
# the first group's words before the PDL wait: a coherent load (ptxas hoists the wait above .nc loads)
_LD4P = "ld.global.L1::no_allocate.v4.b32 {$0, $1, $2, $3}, [$4];"

if HAS_GLUON:
    LD4W = gl.constexpr(_LD4W)
    LD4X = gl.constexpr(_LD4X)
    LD4P = gl.constexpr(_LD4P)
    LD2 = gl.constexpr("ld.global.nc.v2.b32 {$0, $1}, [$2];")  # a lane's packed scale / zero pair

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
        """Group g's (clamped to G - 1) words of each lane, one 16-byte load a 64-k half (GROUP 64: the last 4 repeat
        the first). PURE False: issued where written (the preload before the PDL wait)."""
        WPG: gl.constexpr = GROUP // 16
        w_g = w_l + gl.minimum(g, G - 1) * (32 * WPG)
        w0, w1, w2, w3 = _ld4(w_g, LD4W if PURE else LD4P, PURE)
        w4 = w0
        w5 = w1
        w6 = w2
        w7 = w3
        if WPG == 8:
            w4, w5, w6, w7 = _ld4(w_g + 128, LD4W if PURE else LD4P, PURE)
        return w0, w1, w2, w3, w4, w5, w6, w7

    @gluon.jit
    def _l2_prefetch(w_ptr, tile, G, WPG: gl.constexpr, KW: gl.constexpr):
        """Ask L2 for all of tile `tile`'s words (G * WPG lines of 128 bytes, contiguous); nothing is waited for."""
        lay: gl.constexpr = gl.BlockedLayout([1], [32], [KW], [0])
        base = w_ptr + tile.to(gl.int64) * G * (32 * WPG)
        for i in range(0, G * WPG, KW * 32):
            idx = i + gl.arange(0, KW * 32, layout=lay)
            gl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }", "=r,l,r",
                [(base + idx * 32).to(gl.int64), (idx < G * WPG).to(gl.int32)], dtype=gl.int32, is_pure=False,
                pack=1)

    @gluon.jit
    def _ld8(ptr, PURE: gl.constexpr, J1: gl.constexpr):
        """A lane's 8 x words of a 64-k half, 4 at ptr and 4 at ptr + J1 (plain x: 16, a row's 4 lanes 64 bytes a load;
        XF: 128, the warp's 512 contiguous bytes)."""
        p0, p1, p2, p3 = _ld4(ptr, LD4X, PURE)
        p4, p5, p6, p7 = _ld4(ptr + J1, LD4X, PURE)
        return p0, p1, p2, p3, p4, p5, p6, p7

    @gluon.jit
    def _xload(x_l, x_l1, g, G, GROUP: gl.constexpr, NT: gl.constexpr, PURE: gl.constexpr, XF: gl.constexpr):
        """x of group g (clamped to G - 1) for its K16 steps, as 8-tuples (a, b, c, d): a lane's 8 words of batch
        row l // 4 (a) and l // 4 + 8 (b; NT 1: a again) of the group's first 64 k, then of its second 64 (c, d;
        GROUP 64: a, b again). PURE False (x under PDL): kept in program order, after the wait. XF: x in fragment
        order (w_int_mma.x_frag: 16 GROUP / 2 words a group, its halves 512 apart, a load's second 4 words 128)."""
        GS: gl.constexpr = GROUP * 8 if XF else GROUP // 2
        HS: gl.constexpr = 512 if XF else 32
        J1: gl.constexpr = 128 if XF else 16
        x_g = x_l + gl.minimum(g, G - 1) * GS
        x_g1 = x_l1 + gl.minimum(g, G - 1) * GS
        a = _ld8(x_g, PURE, J1)
        b = a
        if NT == 2:
            b = _ld8(x_g1, PURE, J1)
        c = a
        d = b
        if GROUP == 128:
            c = _ld8(x_g + HS, PURE, J1)
            d = c
            if NT == 2:
                d = _ld8(x_g1 + HS, PURE, J1)
        return a, b, c, d

    @gluon.jit
    def _sload(g, G, sz_l, MAGIC16: gl.constexpr, S_BF16: gl.constexpr):
        """Group g's scales (fp32; 0 past G) and zero halves (half2 of OFFSET + z) of rows r / r + 8: one 8-byte load
        of the packed (scale bits << 16 | z) pair (mma_pack_sz)."""
        gc = gl.minimum(g, G - 1)
        lo, hi = gl.inline_asm_elementwise(LD2, "=r,=r,l", [(sz_l + gc * 2).to(gl.int64)],
                                           dtype=(gl.int32, gl.int32), is_pure=True, pack=1)
        if S_BF16:
            s_lo = (lo & -65536).to(gl.float32, bitcast=True)
            s_hi = (hi & -65536).to(gl.float32, bitcast=True)
        else:
            s_lo = (lo >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            s_hi = (hi >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        s_lo = gl.where(g < G, s_lo, 0.0)
        s_hi = gl.where(g < G, s_hi, 0.0)
        zl = ((lo & 0xFFFF) | MAGIC16) * 65537
        zh = ((hi & 0xFFFF) | MAGIC16) * 65537
        return s_lo, s_hi, zl, zh

    @gluon.jit
    def _group(w0, w1, w2, w3, w4, w5, w6, w7, xs, sz, zeros, t0, t1, t2, t3, t4, t5, t6, t7, ASM: gl.constexpr,
               CONS: gl.constexpr, GROUP: gl.constexpr, NT: gl.constexpr):
        """The totals plus a group's (one a warp, [KW, 1, 1]; past G its scales are 0) scaled K16 products; w0..w7:
        its words (_wload), xs: its x (_xload), sz: its scales and zeros (_sload)."""
        a, b, c, d = xs
        s_lo, s_hi, zl, zh = sz
        e0 = zeros
        e1 = zeros
        e2 = zeros
        e3 = zeros
        e4 = zeros
        e5 = zeros
        e6 = zeros
        e7 = zeros
        # the first 64 k: 4 K16 steps, 4 words a lane, 8 x words a batch row
        e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w0, zl, zh, a[0], a[1], b[0], b[1], e0, e1, e2, e3, e4,
                                              e5, e6, e7)
        e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w1, zl, zh, a[2], a[3], b[2], b[3], e0, e1, e2, e3, e4,
                                              e5, e6, e7)
        e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w2, zl, zh, a[4], a[5], b[4], b[5], e0, e1, e2, e3, e4,
                                              e5, e6, e7)
        e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w3, zl, zh, a[6], a[7], b[6], b[7], e0, e1, e2, e3, e4,
                                              e5, e6, e7)
        if GROUP == 128:  # the second 64 k
            e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w4, zl, zh, c[0], c[1], d[0], d[1], e0, e1, e2, e3,
                                                  e4, e5, e6, e7)
            e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w5, zl, zh, c[2], c[3], d[2], d[3], e0, e1, e2, e3,
                                                  e4, e5, e6, e7)
            e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w6, zl, zh, c[4], c[5], d[4], d[5], e0, e1, e2, e3,
                                                  e4, e5, e6, e7)
            e0, e1, e2, e3, e4, e5, e6, e7 = _k16(ASM, CONS, NT, w7, zl, zh, c[6], c[7], d[6], d[7], e0, e1, e2, e3,
                                                  e4, e5, e6, e7)
        t0 += e0 * s_lo
        t1 += e1 * s_lo
        t2 += e2 * s_hi
        t3 += e3 * s_hi
        if NT == 2:
            t4 += e4 * s_lo
            t5 += e5 * s_lo
            t6 += e6 * s_hi
            t7 += e7 * s_hi
        return t0, t1, t2, t3, t4, t5, t6, t7

    @gluon.jit
    def _w4_mma_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, M, N, G, stride_xm, stride_ym,
                       ASM: gl.constexpr, CONS: gl.constexpr, MAGIC16: gl.constexpr, GROUP: gl.constexpr,
                       NT: gl.constexpr, TN: gl.constexpr, KW: gl.constexpr, S_BF16: gl.constexpr,
                       HAS_BIAS: gl.constexpr, PF: gl.constexpr = True, USE_PDL: gl.constexpr = False,
                       ACT: gl.constexpr = False, PX: gl.constexpr = False, part_ptr=None, n_parts=1, k_norm=1,
                       eps=0.0, INV_RMS: gl.constexpr = False, NP_PAD: gl.constexpr = 1,
                       PS: gl.constexpr = False, PF2: gl.constexpr = False, L2PF: gl.constexpr = False,
                       XF: gl.constexpr = False):
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
        # x as int32 words: lane l reads batch row l // 4 (+ 8; rows >= M clamped: they only feed unstored
        # columns of the product), words 4 (l % 4) .. + 4 and 16 + 4 (l % 4) .. + 4 of each 32 (64 k) of a group
        if XF:  # x_frag's order: batch rows 8 nt + l // 4 of lane l at 4 l, the second n-tile 256 words on
            x_l = x_ptr + ln * 4
            x_l1 = x_l + 256
        else:
            x_l = x_ptr + gl.minimum(ln // 4, M - 1).to(gl.int64) * stride_xm + (ln % 4) * 4  # [1, 1, 32]
            x_l1 = x_ptr + gl.minimum(ln // 4 + 8, M - 1).to(gl.int64) * stride_xm + (ln % 4) * 4
        w_l = w_ptr + tile_c.to(gl.int64) * G * (32 * WPG) + ln * 4  # [1, TN, 32]: a half's 4 words at + 128 H
        sz_l = sz_ptr + (tile_c.to(gl.int64) * 8 + ln // 4) * G * 2  # [1, TN, 32]: packed [t, r, g, h], rows r, r + 8
        zeros = gl.zeros([KW, TN, 32], gl.float32, L3)
        t0 = zeros
        t1 = zeros
        t2 = zeros
        t3 = zeros
        t4 = zeros
        t5 = zeros
        t6 = zeros
        t7 = zeros
        # the K loop: each warp's next group's words load before this group's math (PF), or with it; PX: its x too
        w0, w1, w2, w3, w4, w5, w6, w7 = _wload(w_l, kw, G, GROUP, not USE_PDL)
        if PF2:  # and the group after it (words two groups ahead in the loop)
            u0, u1, u2, u3, u4, u5, u6, u7 = _wload(w_l, KW + kw, G, GROUP, not USE_PDL)
        if PS:  # the first group's scales and zeros too (weights: before the PDL wait)
            szn = _sload(kw, G, sz_l, MAGIC16, S_BF16)
        if L2PF:  # and all of the program's words asked of L2 (kernels/pdl.py's prefetch), before the wait
            for t in gl.static_range(TN):
                if ACT:
                    _l2_prefetch(w_ptr, gl.program_id(0) + t * (n_tiles // 2), G, WPG, KW)
                else:
                    _l2_prefetch(w_ptr, gl.minimum(gl.program_id(0) * TN + t, n_tiles - 1), G, WPG, KW)
        if USE_PDL:  # the first group's words are in flight: now wait for x (kernels/pdl.py)
            _pdl_begin()
        if INV_RMS:  # x is a split norm's xw (kernels/split_norm.py): its producer's partials, summed after the loop
            offs_p = gl.arange(0, NP_PAD, layout=gl.BlockedLayout([1], [32], [KW], [0]))
            parts = gl.load(part_ptr + offs_p, mask=offs_p < n_parts, other=0.0)
        if PX:
            xn = _xload(x_l, x_l1, kw, G, GROUP, NT, not USE_PDL, XF)
        for g0 in range(0, G, KW):
            v0, v1, v2, v3, v4, v5, v6, v7 = w0, w1, w2, w3, w4, w5, w6, w7
            if PF2:
                w0, w1, w2, w3, w4, w5, w6, w7 = u0, u1, u2, u3, u4, u5, u6, u7
                u0, u1, u2, u3, u4, u5, u6, u7 = _wload(w_l, g0 + 2 * KW + kw, G, GROUP)
            elif PF:
                w0, w1, w2, w3, w4, w5, w6, w7 = _wload(w_l, g0 + KW + kw, G, GROUP)
            if PX:
                xs = xn
                xn = _xload(x_l, x_l1, g0 + KW + kw, G, GROUP, NT, not USE_PDL, XF)
            else:
                xs = _xload(x_l, x_l1, g0 + kw, G, GROUP, NT, not USE_PDL, XF)
            if PS:
                sz = szn
                szn = _sload(g0 + KW + kw, G, sz_l, MAGIC16, S_BF16)
            else:
                sz = _sload(g0 + kw, G, sz_l, MAGIC16, S_BF16)
            t0, t1, t2, t3, t4, t5, t6, t7 = _group(v0, v1, v2, v3, v4, v5, v6, v7, xs, sz, zeros, t0, t1, t2, t3, t4,
                                                    t5, t6, t7, ASM, CONS, GROUP, NT)
            if not PF and not PF2:
                w0, w1, w2, w3, w4, w5, w6, w7 = _wload(w_l, g0 + KW + kw, G, GROUP)
        inv = 1.0
        if INV_RMS:
            inv = gl.rsqrt(gl.sum(parts, axis=0) / k_norm + eps)
        # the sum across the KW warps through one conflict-free shared buffer, then the stores
        _sum_store(t0, t1, t2, t3, t4, t5, t6, t7, y_ptr, b_ptr, inv, M, N, stride_ym, n_tiles, HAS_BIAS, ACT, NT, TN,
                   KW)

    @gluon.jit
    def _sum_store(t0, t1, t2, t3, t4, t5, t6, t7, y_ptr, b_ptr, inv, M, N, stride_ym, n_tiles, HAS_BIAS: gl.constexpr,
                   ACT: gl.constexpr, NT: gl.constexpr, TN: gl.constexpr, KW: gl.constexpr):
        """The epilogue with the KW warps' totals summed through shared memory in one round: each warp stores its
        4 NT accumulators ([KW, TN, 32] each; lanes on consecutive words: no bank conflicts), one barrier, then
        each thread sums KW of them for a (accumulator, tile, lane) and stores it (or SiLU(gate) * up). Instead of
        one gl.sum a accumulator (Nsight Compute, 16 rows, o_proj t1_w8: 4.3-4.5-way bank conflicts, ~280 K shared
        wavefronts a launch; nineteenth session; that path removed in the twentieth)."""
        NACC: gl.constexpr = 4 * NT
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])
        buf = gl.allocate_shared_memory(gl.float32, [NACC * KW, TN, 32], SH)
        buf.slice(0, KW).store(t0)
        buf.slice(KW, KW).store(t1)
        buf.slice(2 * KW, KW).store(t2)
        buf.slice(3 * KW, KW).store(t3)
        if NT == 2:
            buf.slice(4 * KW, KW).store(t4)
            buf.slice(5 * KW, KW).store(t5)
            buf.slice(6 * KW, KW).store(t6)
            buf.slice(7 * KW, KW).store(t7)
        gl.thread_barrier()
        LB: gl.constexpr = gl.BlockedLayout([1, KW, TN, 1], [1, 1, 1, 32], [KW, 1, 1, 1], [3, 2, 1, 0])
        LV: gl.constexpr = gl.SliceLayout(1, LB)  # [NACC, TN, 32]
        v = gl.sum(buf.reshape([NACC, KW, TN, 32]).load(LB), axis=1) * inv
        if ACT:  # tile 0 of the pair is gate, tile 1 up; rows pid * 16 + .. of the output
            L2: gl.constexpr = gl.SliceLayout(1, LV)  # [NACC, 32]
            L_TN: gl.constexpr = gl.SliceLayout(0, gl.SliceLayout(2, LV))
            sel = gl.expand_dims(gl.expand_dims(gl.arange(0, TN, layout=L_TN), 0), 2)
            gate = gl.sum(gl.where(sel == 0, v, 0.0), axis=1)
            up = gl.sum(gl.where(sel == 1, v, 0.0), axis=1)
            a = gl.expand_dims(gl.arange(0, NACC, layout=gl.SliceLayout(1, L2)), 1)
            ln = gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, L2)), 0)
            row = (gl.program_id(0) * 16 + ln // 4 + 8 * ((a % 4) // 2)).to(gl.int64)
            m = 2 * (ln % 4) + a % 2 + 8 * (a // 4)
            if HAS_BIAS:
                gate = gate + gl.load(b_ptr + row).to(gl.float32)
                up = up + gl.load(b_ptr + row + N // 2).to(gl.float32)
            act = gate / (1.0 + gl.exp(-gate)) * up
            gl.store(y_ptr + m.to(gl.int64) * stride_ym + row, act.to(y_ptr.dtype.element_ty), mask=m < M)
        else:
            L_A: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, LV))
            a = gl.expand_dims(gl.expand_dims(gl.arange(0, NACC, layout=L_A), 1), 2)
            tn = gl.expand_dims(gl.expand_dims(gl.arange(0, TN, layout=gl.SliceLayout(0, gl.SliceLayout(2, LV))), 0), 2)
            ln = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, LV))), 0), 1)
            tile = gl.program_id(0) * TN + tn
            row = (tile * 16 + ln // 4 + 8 * ((a % 4) // 2)).to(gl.int64)
            m = 2 * (ln % 4) + a % 2 + 8 * (a // 4)
            ok = tile < n_tiles
            if HAS_BIAS:
                v = v + gl.load(b_ptr + row, mask=ok, other=0.0).to(gl.float32)
            gl.store(y_ptr + m.to(gl.int64) * stride_ym + row, v.to(y_ptr.dtype.element_ty), mask=ok & (m < M))
