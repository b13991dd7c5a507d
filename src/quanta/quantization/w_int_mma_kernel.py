"""The Gluon kernel of the tensor-core int4 GEMV (w_int_mma.py has the layout, the dispatch and the launcher).

One K16 step of a lane is `mma_ptx`'s inline PTX: dequantize its word into the four A registers, then one
`mma.sync.m16n8k16` per n-tile of 8 batch rows. `_w4_mma_kernel`: TN 16-row tiles a program, its KW warps on every
KW-th group of K, summed across warps, stored (or SiLU(gate) * up, ACT). A pass of the K loop loads DEPTH groups'
words and scale / zero word pairs ("stages") of each warp, then does their math; the first pass's loads go before
the PDL wait.
"""

from __future__ import annotations

import functools

import torch

try:  # Gluon: Triton >= 3.5 (GPU only; the CPU runs the twin)
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy

    HAS_GLUON = True
except Exception:  # noqa: BLE001 - no triton, or a triton without gluon
    HAS_GLUON = False
    gluon = gl = async_copy = None

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


_LD4X = "ld.global.nc.v4.b32 {$0, $1, $2, $3}, [$4];"  # x: read by every program (L1 / L2)

if HAS_GLUON:
    LD4X = gl.constexpr(_LD4X)

    @gluon.jit
    def _ld4(ptr, ASM: gl.constexpr, PURE: gl.constexpr = True):
        """Four int32 words from 16-byte aligned ptr, as four tensors of ptr's shape (one vector load). PURE False
        (x under PDL, the preloads): kept in program order around the griddepcontrol.wait."""
        return gl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,l", [ptr.to(gl.int64)],
                                         dtype=(gl.int32, gl.int32, gl.int32, gl.int32), is_pure=PURE, pack=1)

    @gluon.jit
    def _copy_stage(sw, sq, w_l, q_l, gw, gq, G, WPG: gl.constexpr):
        """cp.async of group gw's words ([KW, TN, 32, WPG] pointers w_l of group 0) and gq's scale / zero words
        into the slot (sw, sq); groups past G copy nothing (zero-filled); one commit group."""
        async_copy.async_copy_global_to_shared(sw, w_l + gl.minimum(gw, G - 1) * (32 * WPG), mask=gw < G)
        async_copy.async_copy_global_to_shared(sq, q_l + gl.minimum(gq, G - 1) * 16, mask=gq < G)
        async_copy.commit_group()

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
    def _word(v, jv, j: gl.constexpr):
        """v[..., j] of a [.., n] tensor whose last dimension is in each thread's registers (folds to a register)."""
        return gl.sum(gl.where(jv == j, v, 0), axis=3)

    @gluon.jit
    def _group(g, G, wv, qv, jw, jq, x_l, x_l1, zeros, t0, t1, t2, t3, t4, t5, t6, t7, ASM: gl.constexpr,
               CONS: gl.constexpr, GROUP: gl.constexpr, NT: gl.constexpr, S_BF16: gl.constexpr,
               USE_PDL: gl.constexpr):
        """The totals plus group g's (one a warp, [KW, 1, 1]; past G: zero-filled stages, adds nothing) scaled K16
        products; wv [KW, TN, 32, WPG], qv [KW, TN, 32, 2]: its stage (words, scale / zero words)."""
        WPG: gl.constexpr = GROUP // 16
        w0 = _word(wv, jw, 0)
        w1 = _word(wv, jw, 1)
        w2 = _word(wv, jw, 2)
        w3 = _word(wv, jw, 3)
        w4 = w0
        w5 = w1
        w6 = w2
        w7 = w3
        if WPG == 8:
            w4 = _word(wv, jw, 4)
            w5 = _word(wv, jw, 5)
            w6 = _word(wv, jw, 6)
            w7 = _word(wv, jw, 7)
        qs = gl.convert_layout(_word(qv, jq, 0), zeros.type.layout)
        qz = gl.convert_layout(_word(qv, jq, 1), zeros.type.layout)
        gc = gl.minimum(g, G - 1)
        x_g = x_l + gc * (GROUP // 2)
        x_g1 = x_l1 + gc * (GROUP // 2)
        if S_BF16:  # the scale pair's bits (rows r, r + 8) as float32
            s_lo = (qs << 16).to(gl.float32, bitcast=True)
            s_hi = (qs & -65536).to(gl.float32, bitcast=True)
        else:
            s_lo = qs.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            s_hi = (qs >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        zl = (qz & 65535) * 65537  # the half2 of OFFSET + z of row r, of row r + 8
        zh = ((qz >> 16) & 65535) * 65537
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
    def _w4_mma_kernel(x_ptr, w_ptr, q_ptr, b_ptr, y_ptr, M, N, G, stride_xm, stride_ym,
                       ASM: gl.constexpr, CONS: gl.constexpr, GROUP: gl.constexpr, NT: gl.constexpr,
                       TN: gl.constexpr, KW: gl.constexpr, DEPTH: gl.constexpr, S_BF16: gl.constexpr,
                       HAS_BIAS: gl.constexpr, USE_PDL: gl.constexpr = False,
                       ACT: gl.constexpr = False):
        WPG: gl.constexpr = GROUP // 16  # words a lane and group (a multiple of 4)
        NS: gl.constexpr = DEPTH + 1  # stage slots in shared memory
        L4: gl.constexpr = gl.BlockedLayout([1, TN, 1, WPG], [1, 1, 32, 1], [KW, 1, 1, 1], [3, 2, 1, 0])
        L4Q: gl.constexpr = gl.BlockedLayout([1, TN, 1, 2], [1, 1, 32, 1], [KW, 1, 1, 1], [3, 2, 1, 0])
        L3: gl.constexpr = gl.SliceLayout(3, L4)  # [KW, TN, 32]: warp, tile, lane
        SH: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [3, 2, 1, 0])
        kw = gl.expand_dims(gl.expand_dims(gl.arange(0, KW, layout=gl.SliceLayout(1, gl.SliceLayout(2, L3))), 1), 2)
        tn = gl.expand_dims(gl.expand_dims(gl.arange(0, TN, layout=gl.SliceLayout(0, gl.SliceLayout(2, L3))), 0), 2)
        ln = gl.expand_dims(gl.expand_dims(gl.arange(0, 32, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3))), 0), 1)
        n_tiles = N // 16
        if ACT:  # W = gate | up, TN = 2: gate tile pid and up tile pid + n_tiles / 2, SiLU(gate) * up stored
            tile_c = gl.program_id(0) + tn * (n_tiles // 2)
        else:
            tile_c = gl.minimum(gl.program_id(0) * TN + tn, n_tiles - 1)  # [1, TN, 1]
        # x as int32 words: lane l reads batch row l // 4 (+ 8; rows >= M clamped: they only feed unstored
        # columns of the product), words (l % 4) * GROUP / 8 .. + 2 WPG of a group
        xr = gl.minimum(ln // 4, M - 1)
        x_l = x_ptr + xr.to(gl.int64) * stride_xm + (ln % 4) * (GROUP // 8)  # [1, 1, 32]
        xr1 = gl.minimum(ln // 4 + 8, M - 1)
        x_l1 = x_ptr + xr1.to(gl.int64) * stride_xm + (ln % 4) * (GROUP // 8)
        # a stage: group g's words of each lane [KW, TN, 32, WPG] and scale / zero words [KW, TN, 32, 2] (rows
        # l // 4 and + 8), copied by cp.async into the slot each thread later reads itself (no barrier)
        jw = gl.arange(0, WPG, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4))))
        jw = gl.expand_dims(gl.expand_dims(gl.expand_dims(jw, 0), 1), 2)
        jq = gl.arange(0, 2, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, L4Q))))
        jq = gl.expand_dims(gl.expand_dims(gl.expand_dims(jq, 0), 1), 2)
        w_l = gl.expand_dims(w_ptr + tile_c.to(gl.int64) * G * (32 * WPG) + ln * WPG, 3) + jw
        q_l = gl.convert_layout(q_ptr + tile_c.to(gl.int64) * G * 16 + (ln // 4) * 2, gl.SliceLayout(3, L4Q))
        q_l = gl.expand_dims(q_l, 3) + jq
        kw4 = gl.expand_dims(kw, 3)
        kwq = gl.expand_dims(gl.convert_layout(kw, gl.SliceLayout(3, L4Q)), 3)
        smem_w = gl.allocate_shared_memory(gl.int32, [NS, KW, TN, 32, WPG], SH)
        smem_q = gl.allocate_shared_memory(gl.int32, [NS, KW, TN, 32, 2], SH)
        zeros = gl.zeros([KW, TN, 32], gl.float32, L3)
        t0 = zeros
        t1 = zeros
        t2 = zeros
        t3 = zeros
        t4 = zeros
        t5 = zeros
        t6 = zeros
        t7 = zeros
        # the K loop: DEPTH groups a warp in flight (cp.async groups); the first DEPTH copies go before the PDL wait
        for s in gl.static_range(DEPTH):
            _copy_stage(smem_w.index(s), smem_q.index(s), w_l, q_l, s * KW + kw4, s * KW + kwq, G, WPG)
        if USE_PDL:  # the first stages are in flight: now wait for x (kernels/pdl.py)
            _pdl_begin()
        for i in range(0, gl.cdiv(G, KW)):
            g_next = (i + DEPTH) * KW
            slot = (i + DEPTH) % NS
            _copy_stage(smem_w.index(slot), smem_q.index(slot), w_l, q_l, g_next + kw4, g_next + kwq, G, WPG)
            async_copy.wait_group(DEPTH)  # this pass's stage is in
            wv = smem_w.index(i % NS).load(L4)
            qv = smem_q.index(i % NS).load(L4Q)
            t0, t1, t2, t3, t4, t5, t6, t7 = _group(i * KW + kw, G, wv, qv, jw, jq, x_l, x_l1, zeros, t0, t1, t2, t3,
                                                    t4, t5, t6, t7, ASM, CONS, GROUP, NT, S_BF16, USE_PDL)
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
