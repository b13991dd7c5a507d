"""W4A16 / W8A16 decode GEMV at 1-2 rows by kernel and config (issue 6), per Llama layer.

    python benchmarks/bench_int_gemv.py [--models 8b] [--ms 1,2] [--bits 4] [--json out.json]

Each variant is `kernel:config` (kernel = bytes: w_int_kernel's GEMV |
tinygemm: PyTorch's _weight_int4pack_mm, w_int_tinygemm.py, config ignored | asm: w_int_gemv_asm.py, one row |
mma: w_int_mma.py's tensor-core GEMV on mma words, config "t2_w4[_np]" or "auto" (config_for) | mmaxf / siluxf:
the same with x in fragment order (w_int_mma.x_frag, made outside the timing) |
auto: w_int_linear's own pick, config ignored | silu: the mma GEMV with the SiLU(gate) * up epilogue, gate_up only). Times are medians of CUDA-graph replays after a 256 MiB L2
flush (kernels/gemv.time_cuda: cold weights, as in decode); with --chain L, of one graph running L distinct weight
copies back to back, per launch (each launch's PDL preload then overlaps the launch before it, as in a decode step;
the flush-only numbers mispredicted the engine for the 16-row gate_up in the twentieth session: RESULTS.md); cuBLAS
bf16 on the same shape (one copy) is the baseline. Every
variant is checked against w_int_linear_ref first. Prints a table and the per-step sum of the linear layers
(x layers, lm_head in bf16 through cuBLAS).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHAPES = {  # model: (layers, [(name, N, K)], lm_head (N, K))
    "1b": (
        16,
        [("qkv", 3072, 2048), ("o", 2048, 2048), ("gate_up", 16384, 2048), ("down", 2048, 8192)],
        (128256, 2048),
    ),
    "8b": (
        32,
        [("qkv", 6144, 4096), ("o", 4096, 4096), ("gate_up", 28672, 4096), ("down", 4096, 14336)],
        (128256, 4096),
    ),
}
VARIANTS = [
    "bytes:bn4_bk2048_sk0_w4_s3",  # the byte GEMV (w_int_kernel.py)
    "asm:bn8_bk1024_sk0_w4_s1",  # w_int_gemv_asm.py: half2 math in inline PTX, one row (the default)
    "asm:bn8_bk1024_sk0_w4_s1_nx",  # "_nx": the next K step's words and scales in registers before this step's math
    "asm:bn4_bk1024_sk0_w4_s1_nx",
    "asm:bn8_bk512_sk0_w4_s1_nx",
    "asm:bn8_bk1024_sk0_w2_s1_nx",
    "asm:bn8_bk1024_sk0_w4_s3_tma",  # "_tma": words by TMA, Triton's pipeline num_stages deep
    "asm:bn8_bk1024_sk0_w4_s4_tma",
    "asm:bn8_bk1024_sk0_w4_s6_tma",
    "asm:bn16_bk1024_sk0_w4_s4_tma",
    "asm:bn8_bk2048_sk0_w4_s3_tma",
    "asm:bn8_bk1024_sk0_w2_s4_tma",
    "asm:bn4_bk1024_sk0_w4_s4_tma",
    "bytes:bn64_bk128_sk0_w4_s3_dott",  # the swap-AB tensor-core GEMV from bytes (the default at 5-16 rows)
]


def best_variant(path: str, kinds: str = "asm", m: int = 1) -> str:
    """The config of the fastest variant in a --json file whose name has one of `kinds` (comma-separated: "asm:"
    prefixes, "_nx" / "_tma" suffixes...), by its per-step sum at m rows (gpu_round.sh quant / lat8awq)."""
    rows = json.loads(Path(path).read_text())["rows"]
    summary = next(r["summary"] for r in rows if "summary" in r and r["m"] == m)
    keys = kinds.split(",")
    best = min((t, v) for v, t in summary.items() if any(key in v for key in keys) and t == t)
    return best[1].split(":", 1)[1]


def best_per_shape(path: str, kinds: str = "asm:", m: int = 1) -> str:
    """QUANTA_INT_GEMV_ASM_SHAPES for the fastest `kinds` variant of each shape in a --json file."""
    best: dict = {}
    for r in json.loads(Path(path).read_text())["rows"]:
        if r.get("m") == m and "variant" in r and r["us"] == r["us"] and any(key in r["variant"] for key in kinds.split(",")):
            key = f"{r['n']}x{r['k']}"
            cfg = r.get("config") or r["variant"].split(":", 1)[1]  # "auto": the config it resolved to
            if key not in best or r["us"] < best[key][0]:
                best[key] = (r["us"], cfg)
    return ";".join(f"{key}={cfg}" for key, (_, cfg) in best.items())


def _weights(n, k, bits, group, zero_point, dev, seed, tg=False, mma=False) -> dict:
    """One random int weight of [n, k] with its scales (zero points), tinygemm and mma packings where asked."""
    from quanta.quantization import w_int_mma, w_int_tinygemm

    g = torch.Generator(device=dev).manual_seed(seed)
    packed = torch.randint(0, 256, (n, k * bits // 8), device=dev, generator=g, dtype=torch.uint8)
    scale = (torch.rand(n, k // group, device=dev, generator=g) * 0.01 + 0.001).bfloat16()
    zero = None
    if zero_point:
        zero = torch.randint(0, 2**bits, (n, k // group), device=dev, generator=g, dtype=torch.uint8)
    w = dict(packed=packed, scale=scale, zero=zero, tg=None, words=None, sz=None)
    if tg and bits == 4:
        w["tg"] = w_int_tinygemm.pack(packed, scale, zero)
    if mma and bits == 4:
        w.update(words=w_int_mma.mma_pack(packed, group), sz=w_int_mma.mma_pack_sz(scale, zero))  # as attach does
    return w


def _variant_fn(kind, cfg_s, w, x, m, n, k, bits, group, name):
    """(fn, resolved config) of one `kind:config` variant on the weights w, or None where it does not apply."""
    from quanta.kernels.gemv import GemvConfig
    from quanta.quantization import w_int_gemv_asm, w_int_mma, w_int_tinygemm
    from quanta.quantization.w_int_kernel import w_int_gemv, w_int_linear

    packed, scale, zero = w["packed"], w["scale"], w["zero"]
    if kind == "tinygemm":
        return partial(w_int_tinygemm.linear, x, *w["tg"], group, n), None
    xf = w_int_mma.x_frag(x, group) if kind.endswith("xf") else None  # x in fragment order, made outside the timing
    if kind in ("mma", "mmaxf"):
        mcfg = w_int_mma.config_for(m, n, k) if cfg_s == "auto" else w_int_mma.MmaConfig.parse(cfg_s)
        fn = partial(w_int_mma.w_int_mma_linear, x, w["words"], scale, zero, group, None, mcfg, sz=w["sz"], xf=xf)
        return fn, str(mcfg)
    if kind in ("silu", "siluxf"):  # gate_up only: SiLU(gate) * up in the mma GEMV's epilogue
        if name != "gate_up":
            return None
        cfg = w_int_mma.MmaConfig.parse(cfg_s)
        fn = partial(w_int_mma.w_int_mma_linear, x, w["words"], scale, zero, group, None, cfg, True, sz=w["sz"], xf=xf)
        return fn, None
    if kind == "auto":  # w_int_linear's own pick (gemv_config / the asm GEMV at one row)
        return partial(w_int_linear, x, packed, scale, zero, bits, group, k), None
    cfg = GemvConfig.parse(cfg_s)
    w_int_gemv_asm.ASM_ENABLED = kind == "asm"
    if kind == "asm" and m > 1:
        return None
    planes = w_int_gemv_asm.x_planes(x, min(group, cfg.block_k)) if cfg.x_planes else None
    return partial(w_int_gemv, x, packed, scale, zero, bits, group, k, None, cfg, planes=planes), None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="8b")
    ap.add_argument("--ms", default="1,2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--zero-point", action="store_true")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--chain", type=int, default=1, help="time this many distinct weight copies back to back in one "
                    "graph (each launch's PDL preload overlaps the one before, as in a decode step), per launch")
    ap.add_argument("--json", default=None)
    ap.add_argument("--best-of", default=None, help="print the fastest asm config in this --json file and exit")
    ap.add_argument("--best-kinds", default="asm:", help="--best-of among variants naming one of these")
    ap.add_argument("--best-m", type=int, default=1, help="--best-of at this many rows")
    ap.add_argument("--per-shape", action="store_true", help="--best-of: the fastest config of each shape")
    a = ap.parse_args()
    if a.best_of:
        pick = best_per_shape if a.per_shape else best_variant
        print(pick(a.best_of, a.best_kinds, a.best_m))
        return
    from quanta.kernels.gemv import time_cuda
    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.w_int_kernel import w_int_linear_ref

    dev, bits, group = "cuda", a.bits, a.group
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    rows, t0 = [], time.time()
    print(f"device: {torch.cuda.get_device_name()}  int{bits} group {group} zero point {a.zero_point}", flush=True)
    for model in a.models.split(","):
        layers, shapes, (n_lm, k_lm) = SHAPES[model]
        for m in (int(v) for v in a.ms.split(",")):
            total = {"cublas": 0.0}
            for name, n, k in shapes:
                kinds = {v.split(":")[0] for v in a.variants.split(",")}
                need = dict(tg="tinygemm" in kinds, mma=bool(kinds & {"mma", "silu", "mmaxf", "siluxf"}))
                copies = [_weights(n, k, bits, group, a.zero_point, dev, n + k + i, **need) for i in range(a.chain)]
                w0 = copies[0]
                packed, scale, zero = w0["packed"], w0["scale"], w0["zero"]
                x = torch.randn(m, k, device=dev).bfloat16()
                w_bf16 = torch.randn(n, k, device=dev).bfloat16()
                t_ref = time_cuda(partial(F.linear, x, w_bf16), a.reps, flush=flush)
                del w_bf16
                total["cublas"] += layers * t_ref
                ref = w_int_linear_ref(x.float(), packed, scale.float(), zero, bits, group, k)
                nbytes = packed.numel() + scale.numel() * 2 + (zero.numel() if zero is not None else 0)
                line = f"{model} {name:8s} N={n:6d} K={k:6d} M={m} | cuBLAS bf16 {t_ref:7.1f} us |"
                for v in a.variants.split(","):
                    kind, cfg_s = v.split(":")
                    made = [_variant_fn(kind, cfg_s, w, x, m, n, k, bits, group, name) for w in copies]
                    if made[0] is None:
                        continue
                    fn, resolved = made[0]
                    fns = [f for f, _ in made]
                    timed = fn if len(fns) == 1 else (lambda fns=fns: [f() for f in fns])
                    want = ref
                    if kind.startswith("silu"):
                        want = F.silu(ref[:, : n // 2]) * ref[:, n // 2 :]
                    try:
                        err = float((fn().float() - want).abs().max() / want.abs().max())
                        t = time_cuda(timed, a.reps, flush=flush) / len(fns) if err < 2e-2 else float("nan")
                    except Exception as e:  # a config that does not compile here is reported, not fatal
                        err, t = f"{type(e).__name__}: {str(e)[:60]}", float("nan")
                    total[v] = total.get(v, 0.0) + layers * t
                    gbps = nbytes / t / 1e3 if t == t else float("nan")
                    rows.append(
                        dict(
                            model=model, layer=name, n=n, k=k, m=m, variant=v, us=t, gbps=gbps, cublas_us=t_ref, err=err,
                            **({"config": resolved} if resolved else {}),
                        )
                    )
                    line += f" {v.split(':')[0][:2]}:{cfg_s.rsplit('_sk', 1)[0]} {t:6.1f}"
                w_int_gemv_asm.ASM_ENABLED = True
                print(line, flush=True)
            x = torch.randn(m, k_lm, device=dev).bfloat16()
            w = torch.randn(n_lm, k_lm, device=dev).bfloat16()
            t_lm = time_cuda(partial(F.linear, x, w), a.reps, flush=flush)
            del w
            print(f"{model} M={m}: per step (x{layers} layers + lm_head bf16 {t_lm:.0f} us):")
            for v, t in total.items():
                step = t + t_lm
                print(f"   {v:32s} {step:8.1f} us  ({(total['cublas'] + t_lm) / step:.2f}x cuBLAS bf16)")
            rows.append(dict(model=model, m=m, summary={v: t + t_lm for v, t in total.items()}, lm_head_us=t_lm))
    print(f"(elapsed {time.time() - t0:.0f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
