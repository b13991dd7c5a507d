"""Offline SASS fingerprints of the mma GEMV kernel (quantization/w_int_mma_kernel.py), no GPU needed: compile
`_w4_mma_kernel` for sm_90 over a set of constexpr combinations and print one hash of each kernel's SASS (addresses
stripped) with its instruction count. Two trees whose fingerprints match compile to the same machine code, so a
refactor that keeps them needs no new GPU run. Use the GPU machine's Triton (3.6) for the device's code, e.g.

    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=src python benchmarks/sass_sig.py --triton /tmp/t36 > before.txt   # then again after; diff

It also prints the one-row int4 asm GEMV's (quantization/w_int_gemv_asm.py) over ASM_COMBOS, its default paths
(no split norm), with only the arguments that tree's kernel has, so an older tree compiles too, and the one-launch
decode attention's over DECODE_COMBOS (merge chunks as the launcher sizes them from MERGE_VALUES, env
MERGE_VALUES to try others), the 16-bit batch-1 GEMVs' over GEMV_COMBOS (kernels/gemv.py, gemv_fused.py) and the
three-launch decode's split kernel over SPLIT_COMBOS. Each line ends with the kernel's registers and stack bytes
(ptxas spills).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
import sys
import tempfile

# (NT, TN, KW, PF, PX, GROUP, USE_PDL, ACT)
COMBOS = [(2, 1, 8, 0, 1, 128, 1, 0), (2, 1, 8, 1, 0, 128, 1, 0), (1, 1, 8, 0, 0, 128, 1, 0), (1, 2, 2, 1, 0, 128, 1, 1),
          (2, 2, 2, 0, 0, 128, 0, 0), (1, 1, 4, 1, 1, 64, 0, 0), (2, 2, 4, 0, 1, 64, 1, 1), (2, 1, 16, 0, 1, 128, 1, 0),
          (2, 1, 16, 1, 0, 128, 1, 0)]
_PTRS = ["x_ptr", "w_ptr", "sz_ptr", "b_ptr", "y_ptr"]
_INTS = ["M", "N", "G", "stride_xm", "stride_ym"]
_NODIV = ("M",)  # ints without a divisibility-16 hint
_CONSTS = ["ASM", "CONS", "MAGIC16", "GROUP", "NT", "TN", "KW", "S_BF16", "HAS_BIAS", "PF", "USE_PDL", "ACT", "PX"]
# asm GEMV: (XPLANES, NEXT, ACT_OUT, USE_PDL[, BLOCK_N, BLOCK_K]; default 4 with planes else 8, 1024)
ASM_COMBOS = [(0, 0, 0, 1), (1, 0, 0, 1), (0, 1, 0, 1), (1, 0, 1, 1), (0, 0, 0, 0), (0, 0, 0, 1, 8, 2048),
              (0, 0, 0, 1, 8, 4096), (0, 0, 0, 1, 4, 4096), (0, 1, 0, 1, 8, 2048)]
ASM_L2_COMBOS = [(0, 1, 0, 1), (1, 0, 0, 1), (1, 0, 1, 1)]  # with L2_PREFETCH (QUANTA_INT_L2_PREFETCH)
_ASM_PTRS = dict(x_ptr="*bf16", w_ptr="*i32", s_ptr="*bf16", z_ptr="*u8", b_ptr="*bf16", y_ptr="*bf16", ws_ptr="*fp32",
                 cnt_ptr="*i32")
_ASM_INTS = ["M", "N", "K", "K_PAD", "K_SPLIT", "num_splits", "stride_xm", "stride_wn", "stride_sn", "stride_zn",
             "stride_ym"]


def _sass(kernel, cuobjdump: str) -> list[tuple[int, str]]:
    """(address, instruction) of the kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]


def loop_order(sass: list[tuple[int, str]], math: str = r"HMMA|HFMA2|HMUL2") -> str:
    """The first K loop's (backward branch's) global loads L and HMMAs / half2 FMAs H in issue order, run-length coded,
    e.g. '14L 16H': whether a loop's loads go out before its math (no such loop: the whole kernel's, "all: ...")."""
    loops = [(int(m.group(1), 16), a) for a, ins in sass if (m := re.search(r"BRA 0x([0-9a-f]+)", ins))
             and int(m.group(1), 16) < a]
    for lo, hi in loops + [(0, 1 << 62)]:  # the first loop with loads and math; else the whole kernel ("all:")
        runs: list[list] = []
        for a, ins in sass:
            op = "L" if "LDG" in ins else "H" if re.search(math, ins) else None
            if op and lo <= a <= hi:
                if runs and runs[-1][0] == op:
                    runs[-1][1] += 1
                else:
                    runs.append([op, 1])
        if len({op for op, _ in runs}) == 2:
            return ("all: " if hi == 1 << 62 else "") + " ".join(f"{n}{op}" for op, n in runs)
    return "no loads and math"


def _mma_loops(configs: str, triton, target, cuobjdump: str) -> None:
    """--mma-loop: each mma GEMV config's (w_int_mma.MmaConfig, "_r" caps included) registers and K-loop order at 16
    rows (NT 2; "_one": at 1-8 rows, NT 1; "_act": the SiLU epilogue at 1-8 rows; before them "_xf": x in fragment
    order, w_int_mma.x_frag), e.g. t1_w4_px_ps_r144, t1_w8_px_ps_xf."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource

    from quanta.quantization import w_int_mma
    from quanta.quantization.w_int_mma_kernel import _w4_mma_kernel

    for text in configs.split(","):
        act, one = text.endswith("_act"), text.endswith("_one")
        base = text.removesuffix("_act").removesuffix("_one")
        xf = base.endswith("_xf")
        cfg = w_int_mma.MmaConfig.parse(base.removesuffix("_xf"))
        nt = 1 if act or one else 2
        asm, cons = w_int_mma.mma_ptx(torch.bfloat16, nt)
        consts = dict(ASM=asm, CONS=cons, MAGIC16=0x4300, GROUP=128, NT=nt, TN=2 if act else cfg.tiles, KW=cfg.warps,
                      S_BF16=True, HAS_BIAS=False, PF=cfg.prefetch, USE_PDL=True, ACT=act, PX=cfg.xprefetch,
                      PS=cfg.sprefetch, PF2=cfg.deep, L2PF=cfg.l2, XF=xf)
        types = dict(zip(_PTRS, ["*i32", "*i32", "*i32", "*bf16", "*bf16"]))
        sig = {**types, **{n: "i32" for n in _INTS}, **{n: "constexpr" for n in consts}}
        names = list(sig)
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _PTRS + _INTS if n not in _NODIV}
        opts = dict(num_warps=cfg.warps, **({"maxnreg": cfg.regs} if cfg.regs else {}))
        kernel = triton.compile(GluonASTSource(_w4_mma_kernel, sig, constexprs=consts, attrs=attrs), target=target,
                                options=opts)
        print(f"{text}: {_fingerprint(kernel, cuobjdump)} loop: {loop_order(_sass(kernel, cuobjdump))}")


def _fingerprint(kernel, cuobjdump: str) -> str:
    """'<sha1 of the SASS, addresses stripped> (<instructions> lines) REG:<registers> STACK:<bytes>' (the stack is
    where ptxas spills)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        res = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    body = [re.sub(r"/\*[0-9a-f]+\*/", "", line).strip() for line in sass.splitlines()
            if re.match(r"\s+/\*[0-9a-f]{4,}\*/", line)]
    digest = hashlib.sha1("\n".join(body).encode()).hexdigest()[:12]
    usage = " ".join(re.findall(r"(?:REG|STACK):\d+", res)[:2])
    return f"{digest} ({len(body)} lines) {usage}"


def _asm_fingerprints(triton, target, cuobjdump: str, caps: str = "") -> None:
    """caps ("--asm-loop 0,96,128"): the default paths' combos (o / down "_nx", qkv planes, gate_up planes + SiLU)
    at each register cap (0: ptxas' own), with their K loops' load / math order instead."""
    import torch
    from triton.compiler import ASTSource

    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.w_int_gemv_asm import _w_int_gemv_asm_kernel as kern

    l2 = [(c, True) for c in ASM_L2_COMBOS] if "L2_PREFETCH" in kern.arg_names else []
    combos = [(c, False) for c in ASM_COMBOS] + l2
    if caps:  # env ASM_LOOP_COMBOS="1,1,0,1;1,0,0,1,4,2048" for others
        text = os.environ.get("ASM_LOOP_COMBOS", "0,1,0,1;1,0,0,1;1,0,1,1")
        combos = [(tuple(int(v) for v in c.split(",")), False) for c in text.split(";")]
    for ((xp, nx, act, pdl, *blocks), l2_on), cap in [(c, int(r)) for c in combos for r in (caps or "0").split(",")]:
        bn, bk = blocks or (4 if xp else 8, 1024)
        consts = dict(GROUP=128, SUB=128, BITS=4, HAS_ZERO=True, HAS_BIAS=False, USE_SPLIT=False,
                      PTX=w_int_gemv_asm.ptx(torch.bfloat16), MAGIC16=0x4300, BLOCK_M=1, BLOCK_N=bn,
                      BLOCK_K=bk, STAGES=1, NEXT=bool(nx), TMA=False, XPLANES=bool(xp), ACT_OUT=bool(act),
                      USE_PDL=bool(pdl), PRELOAD=bool(pdl), **({"L2_PREFETCH": True} if l2_on else {}))
        names = [n for n in kern.arg_names if n in _ASM_PTRS or n in consts or n in _ASM_INTS]
        sig = {n: "constexpr" if n in consts else _ASM_PTRS.get(n, "i32") for n in names}
        sig["x_ptr"] = "*i32" if xp else "*bf16"
        opts = dict(num_warps=4, **({"maxnreg": cap} if cap else {}))
        kernel = triton.compile(ASTSource(kern, sig, constexprs=consts), target=target, options=opts)
        size = f" bn{bn}_bk{bk}" if blocks else ""
        size += " L2_PREFETCH" if l2_on else ""
        size += f" r{cap}" if cap else ""
        loop = f" loop: {loop_order(_sass(kernel, cuobjdump))}" if caps else ""
        print(f"asm XPLANES={xp} NEXT={nx} ACT_OUT={act} PDL={pdl}{size}: {_fingerprint(kernel, cuobjdump)}{loop}")


# one-launch decode attention (kernels/decode_attention_fused.py): (HEAD_DIM, TILE_N, num_warps, PREFETCH), 1B / 8B
DECODE_COMBOS = [(64, 64, 4, 1), (64, 64, 8, 1), (64, 64, 4, 0), (64, 256, 8, 0), (128, 64, 4, 0), (128, 64, 8, 0), (128, 32, 4, 0),
                 (128, 32, 4, 1), (64, 32, 4, 1), (64, 16, 4, 1), (64, 32, 2, 1), (128, 16, 4, 1)]
_DECODE_PTRS = dict(cnt_ptr="*i32", part_out_ptr="*fp32", part_lse_ptr="*fp32", pos_ptr="*i64", slot_ptr="*i64",
                    block_tables_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32")


def _decode_fingerprints(triton, target, cuobjdump: str) -> None:
    from triton.compiler import ASTSource

    from quanta.kernels.decode_attention_fused import _decode_fused_kernel as kern

    for d, tile, warps, pf in DECODE_COMBOS:
        consts = dict(QUERIES_PER_KV=4, G_PAD=16, HEAD_DIM=d, HEAD_DIM_PAD=d, BLOCK_SIZE=16, TILE_N=tile, MIN_TILES=1,
                      ONE_SPLIT_TILES=128 // tile, HAS_WINDOW=False, WRITE_KV=True, HAS_ROPE=True, MULTI_SPLIT=True,
                      DOT_PREC="tf32", PREFETCH=bool(pf), USE_PDL=True, G_MERGE=4,
                      MERGE_CHUNK=min(64, int(os.environ.get("MERGE_VALUES", 8192)) // (4 * d)), PDL_PRELOAD=True)
        if "SPLITS_PAD" in kern.arg_names:  # trees before 276e0ea
            consts["SPLITS_PAD"] = 64
        sig = {n: "constexpr" if n in consts else "fp32" if n == "scale_log2" else
               _DECODE_PTRS.get(n, "*bf16") if n.endswith("_ptr") else "i32" for n in kern.arg_names}
        kernel = triton.compile(ASTSource(kern, sig, constexprs=consts), target=target, options=dict(num_warps=warps))
        print(f"decode HEAD_DIM={d} TILE_N={tile} warps={warps} PREFETCH={pf}: {_fingerprint(kernel, cuobjdump)}")


# the three-launch decode's split kernel (kernels/paged_attention_decode.py, batch > 1): (HEAD_DIM, TILE_N, num_warps)
SPLIT_COMBOS = [(128, 64, 4), (128, 64, 8), (128, 32, 4), (128, 16, 4), (64, 64, 4)]


def _split_fingerprints(triton, target, cuobjdump: str) -> None:
    from triton.compiler import ASTSource

    from quanta.kernels.paged_attention_decode import _decode_split_kernel as kern

    for d, tile, warps in SPLIT_COMBOS:
        consts = dict(QUERIES_PER_KV=4, HAS_WINDOW=False, G_PAD=16, HEAD_DIM=d, HEAD_DIM_PAD=d, BLOCK_SIZE=16,
                      TILE_N=tile, SINGLE_SPLIT=False, DOT_PREC="tf32")
        sig = {n: "constexpr" if n in consts else "fp32" if n == "scale_log2" else
               "*fp32" if n in ("part_out_ptr", "part_lse_ptr") else "*i32" if n in ("block_tables_ptr", "seq_lens_ptr",
               "qsl_ptr") else "*bf16" if n.endswith("_ptr") else "i32" for n in kern.arg_names}
        kernel = triton.compile(ASTSource(kern, sig, constexprs=consts), target=target, options=dict(num_warps=warps))
        print(f"split decode HEAD_DIM={d} TILE_N={tile} warps={warps}: {_fingerprint(kernel, cuobjdump)}")


# 16-bit GEMVs at batch 1 (kernels/gemv.py, gemv_fused.py; the 1B shapes' configs): (name, kernel, consts, num_warps)
GEMV_COMBOS = [
    ("gemv bn4_bk2048 (o_proj)", "gemv", dict(BLOCK_N=4, BLOCK_K=2048), 4),
    ("gemv bn8_bk2048", "gemv", dict(BLOCK_N=8, BLOCK_K=2048), 4),
    ("gemv bn4_bk2048_r128", "gemv", dict(BLOCK_N=4, BLOCK_K=2048, maxnreg=128), 4),
    ("gemv bn2_bk2048", "gemv", dict(BLOCK_N=2, BLOCK_K=2048), 4),
    ("silu bn4_bk1024_nx_s1", "fused", dict(PROLOGUE=2, BLOCK_N=4, BLOCK_K=1024, NEXT=True), 4),
    ("norm bn4_bk512_nx", "fused", dict(PROLOGUE=1, HAS_RES=True, BLOCK_N=4, BLOCK_K=512, NEXT=True, NORM_BLOCK=2048), 4),
]


def _gemv_fingerprints(triton, target, cuobjdump: str, caps: str = "") -> None:
    """caps ("--gemv-loop 0,128"): each combo at each register cap with its K loop's loads L and FMAs H instead."""
    from triton.compiler import ASTSource

    from quanta.kernels import gemv, gemv_fused

    kernels = {"gemv": gemv._gemv_kernel, "fused": gemv_fused._gemv_prologue_kernel}
    combos = GEMV_COMBOS
    if caps:
        combos = [(f"{n} r{r}" if int(r) else n, w, {**e, **({"maxnreg": int(r)} if int(r) else {})}, nw)
                  for n, w, e, nw in GEMV_COMBOS if "maxnreg" not in e for r in caps.split(",")]
    for name, which, extra, warps in combos:
        kern = kernels[which]
        consts = dict(HAS_BIAS=False, USE_SPLIT=False, USE_DOT=False, BLOCK_M=1, USE_PDL=True, PREFETCH=True,
                      PF_LINE=64, PF_COLS=64, PRELOAD=True, HAS_RES=False, NORM_BLOCK=16)
        consts.update(extra)
        opts = dict(num_warps=warps, num_stages=1, **({"maxnreg": extra["maxnreg"]} if "maxnreg" in extra else {}))
        consts = {n: v for n, v in consts.items() if n in kern.arg_names}
        sig = {n: "constexpr" if n in consts else "*fp32" if n == "ws_ptr" else
               "*i32" if n == "cnt_ptr" else "*bf16" if n.endswith("_ptr") else "fp32" if n == "eps" else "i32"
               for n in kern.arg_names}
        kernel = triton.compile(ASTSource(kern, sig, constexprs=consts), target=target, options=opts)
        loop = f" loop: {loop_order(_sass(kernel, cuobjdump), r'FFMA|HFMA2')}" if caps else ""
        print(f"{name}: {_fingerprint(kernel, cuobjdump)}{loop}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--triton", default="", help="a folder holding the Triton to compile with (put first on sys.path)")
    ap.add_argument("--mma-loop", default="", help="only these mma GEMV configs' registers and K-loop order")
    ap.add_argument("--gemv-loop", default="", help="only the 16-bit batch-1 GEMVs at these register caps: "
                    "registers and K-loop order")
    ap.add_argument("--asm-loop", default="", help="only the asm GEMV's default paths at these register caps "
                    "(e.g. 0,96,128; 0 = none): registers and K-loop order")
    a = ap.parse_args()
    if a.triton:
        sys.path.insert(0, a.triton)
    if a.mma_loop or a.asm_loop or a.gemv_loop:
        import triton
        from triton.backends.compiler import GPUTarget

        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if a.asm_loop:
            return _asm_fingerprints(triton, GPUTarget("cuda", 90, 32), cuobjdump, a.asm_loop)
        if a.gemv_loop:
            return _gemv_fingerprints(triton, GPUTarget("cuda", 90, 32), cuobjdump, a.gemv_loop)
        return _mma_loops(a.mma_loop, triton, GPUTarget("cuda", 90, 32), cuobjdump)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from quanta.quantization import w_int_mma
    from quanta.quantization.w_int_mma_kernel import _w4_mma_kernel

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    types = dict(zip(_PTRS, ["*i32", "*i32", "*i32", "*bf16", "*bf16"]))
    sig = {**types, **{n: "i32" for n in _INTS}, **{n: "constexpr" for n in _CONSTS}}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in _PTRS + _INTS if n not in _NODIV}
    print(f"triton {triton.__version__}")
    for nt, tn, kw, pf, px, group, pdl, act in COMBOS:
        asm, cons = w_int_mma.mma_ptx(torch.bfloat16, nt)
        consts = dict(ASM=asm, CONS=cons, MAGIC16=0x4300, GROUP=group, NT=nt, TN=tn, KW=kw, S_BF16=True,
                      HAS_BIAS=False, PF=bool(pf), USE_PDL=bool(pdl), ACT=bool(act), PX=bool(px))
        kernel = triton.compile(GluonASTSource(_w4_mma_kernel, sig, constexprs=consts, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=kw))
        print(f"NT={nt} TN={tn} KW={kw} PF={pf} PX={px} GROUP={group} PDL={pdl} ACT={act}: "
              f"{_fingerprint(kernel, cuobjdump)}")
    _asm_fingerprints(triton, GPUTarget("cuda", 90, 32), cuobjdump)
    _decode_fingerprints(triton, GPUTarget("cuda", 90, 32), cuobjdump)
    _gemv_fingerprints(triton, GPUTarget("cuda", 90, 32), cuobjdump)
    _split_fingerprints(triton, GPUTarget("cuda", 90, 32), cuobjdump)


if __name__ == "__main__":
    main()
