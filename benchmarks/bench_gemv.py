"""Decode GEMV vs cuBLAS on Llama linear shapes: bf16 (our GEMV, several configs) and W4A16 g128 / W8A16.

    python benchmarks/bench_gemv.py --json gemv.json                  # everything, < 2 min on an H100
    python benchmarks/bench_gemv.py --models 8b --ms 1 --configs bn4_bk512_sk0_w4_s3,bn8_bk256_sk2_w8_s4
    python benchmarks/bench_gemv.py --dry-run                          # CPU, TRITON_INTERPRET, tiny shapes

Each timing is the median of CUDA-event pairs around one CUDA-graph replay of one call (as decode runs: no
Python launch overhead), every replay after a 256 MiB L2 flush (decode reads each weight cold). GB/s = (weight + scales + x + y bytes) / time; `bw%` = that over the card's copy
bandwidth (torch copy of a 1 GiB buffer, 2 * bytes / time). Columns: cuBLAS F.linear (bf16), the best bf16 GEMV
config, int4 g128 symmetric via the old tl.dot kernel (`w_int_gemm`) and the new GEMV, int8 per-channel (the
W8A16 layout) GEMV. The summary adds up one decode step's linear layers (x layers + lm_head in bf16).
Best configs go into quanta.kernels.gemv.GEMV_CONFIGS[(kind, M, N, K)] (kind w16 / w4 / w8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import partial

MODELS = {  # name: (layers, {layer: (N, K)})
    "1b": (16, {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
                "lm_head": (128256, 2048)}),
    "8b": (32, {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                "lm_head": (128256, 4096)}),
}
DRY_MODELS = {"tiny": (2, {"qkv": (40, 256), "down": (19, 384), "lm_head": (70, 128)})}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="1b,8b")
    p.add_argument("--ms", default="1,2,4,8,16")
    p.add_argument("--configs", default="", help="extra GEMV configs to time, comma-separated (bn4_bk512_sk0_w4_s3)")
    p.add_argument("--full", action="store_true", help="time every candidate config for int8 too")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--dry-run", action="store_true", help="CPU + TRITON_INTERPRET, tiny shapes: checks the script")
    return p.parse_args()


def main() -> None:
    a = parse()
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch

    from quanta.kernels.gemv import GemvConfig, candidate_configs, gemv, time_cuda
    from quanta.quantization.w_int_kernel import w_int_gemm, w_int_gemv, w_int_linear_ref

    dev = "cpu" if a.dry_run else "cuda"
    dtype = torch.float32 if a.dry_run else torch.bfloat16
    models = DRY_MODELS if a.dry_run else {k: MODELS[k] for k in a.models.split(",")}
    ms = [1, 3, 8] if a.dry_run else [int(v) for v in a.ms.split(",")]
    extra = [GemvConfig.parse(c) for c in a.configs.split(",") if c]
    flush = None if a.dry_run else torch.empty(256 << 20, dtype=torch.int8, device=dev)

    def timed(fn) -> float:
        if a.dry_run:
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        return time_cuda(fn, a.reps, flush=flush)

    if a.dry_run:
        copy_bw = float("nan")
        print("dry run: CPU, Triton interpreter, tiny shapes (timings meaningless)")
    else:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        # eager: a memcpy captured in a CUDA graph runs on the (slower) copy engine
        copy_bw = 2 * src.numel() / (time_cuda(partial(dst.copy_, src), 10, graph=False) * 1e-6) / 1e9
        del src, dst
        import triton

        print(f"device: {torch.cuda.get_device_name()}  triton {triton.__version__}  torch {torch.__version__}  "
              f"copy bandwidth {copy_bw:.0f} GB/s")

    rows: list[dict] = []
    best_cfg: dict[str, str] = {}

    def record(model, layer, n, k, m, impl, cfg, us, nbytes, ok=True) -> dict:
        gbps = nbytes / (us * 1e-6) / 1e9
        r = dict(model=model, layer=layer, n=n, k=k, m=m, impl=impl, config=str(cfg) if cfg else "", us=us,
                 gbps=gbps, bw_frac=gbps / copy_bw, ok=ok)
        rows.append(r)
        return r

    def sweep(fn, cfgs, ref, tol, **kw) -> dict | None:
        """Time fn(cfg) for each config; the fastest correct one."""
        best = None
        for cfg in cfgs:
            try:
                out = fn(cfg)
                ok = bool((out.float() - ref).abs().max() <= tol * ref.abs().max())
                r = record(cfg=cfg, us=timed(partial(fn, cfg)), ok=ok, **kw)
            except Exception as e:  # a config that fails to compile: report, go on
                print(f"    {kw['impl']} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            if not ok:
                print(f"    {kw['impl']} {cfg}: WRONG RESULT", flush=True)
            elif best is None or r["us"] < best["us"]:
                best = r
        return best

    hdr = (f"{'model':5s} {'layer':8s} {'N':>6s} {'K':>6s} {'M':>3s} | {'cuBLAS':>7s} {'bw%':>4s} | {'gemv':>7s} "
           f"{'bw%':>4s} {'x':>5s} {'best bf16 config':24s} | {'w4 old':>7s} {'w4 new':>7s} {'bw%':>4s} "
           f"{'best w4 config':24s} | {'w8 new':>7s} {'bw%':>4s}")
    print(hdr)
    t_start = time.time()
    for model, (_, shapes) in models.items():
        for layer, (n, k) in shapes.items():
            g = torch.Generator(device=dev).manual_seed(n * 7 + k)
            w = torch.randn(n, k, device=dev, dtype=dtype, generator=g) * 0.02
            p4 = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8, generator=g)
            s4 = (torch.rand(n, k // 128, device=dev, generator=g) * 0.004 + 0.001).to(dtype)
            p8 = torch.randint(0, 256, (n, k), device=dev, dtype=torch.uint8, generator=g)
            s8 = (torch.rand(n, 1, device=dev, generator=g) * 0.0002 + 0.0001).to(dtype)
            wb, w4b, w8b = w.numel() * w.element_size(), p4.numel() + s4.numel() * 2, p8.numel() + s8.numel() * 2
            for m in ms:
                x = torch.randn(m, k, device=dev, dtype=dtype, generator=g)
                io = (m * k + m * n) * x.element_size()
                kw = dict(model=model, layer=layer, n=n, k=k, m=m)
                ref = torch.nn.functional.linear(x.float(), w.float())
                cb = record(impl="cublas", cfg=None, us=timed(partial(torch.nn.functional.linear, x, w)),
                            nbytes=wb + io, **kw)
                cfgs = candidate_configs("w16", m, n, k) + extra
                bf = sweep(lambda c, x=x, w=w: gemv(x, w, None, c), cfgs, ref, 2e-2, impl="gemv_bf16",
                           nbytes=wb + io, **kw)
                ref4 = w_int_linear_ref(x.float(), p4, s4.float(), None, 4, 128, k)
                old4 = sweep(lambda c, x=x, p=p4, s=s4, k=k: w_int_gemm(x, p, s, None, 4, 128, k), [None], ref4, 2e-2,
                             impl="w4_old", nbytes=w4b + io, **kw)
                c4 = candidate_configs("w4", m, n, k) + extra  # incl. the swap-AB "_dott" / "_dotto" ones
                new4 = sweep(lambda c, x=x, p=p4, s=s4, k=k: w_int_gemv(x, p, s, None, 4, 128, k, None, c),
                             c4, ref4, 2e-2, impl="w4_gemv",
                             nbytes=w4b + io, **kw)
                ref8 = w_int_linear_ref(x.float(), p8, s8.float(), None, 8, k, k)
                c8 = candidate_configs("w8", m, n, k)
                new8 = sweep(lambda c, x=x, p=p8, s=s8, k=k: w_int_gemv(x, p, s, None, 8, k, k, None, c),
                             c8 if a.full or a.dry_run else c8[:2] + [c for c in c8 if c.use_dot_t] + extra,
                             ref8, 2e-2, impl="w8_gemv",
                             nbytes=w8b + io, **kw)

                def us(r):
                    return f"{r['us']:7.1f}" if r else "    n/a"

                def pct(r):
                    return f"{100 * r['bw_frac']:4.0f}" if r else " n/a"

                for kind, r in (("w16", bf), ("w4", new4), ("w8", new8)):
                    if r:
                        best_cfg[f"{kind},{m},{n},{k}"] = r["config"]
                print(f"{model:5s} {layer:8s} {n:6d} {k:6d} {m:3d} | {us(cb)} {pct(cb)} | {us(bf)} {pct(bf)} "
                      f"{(cb['us'] / bf['us']) if bf else 0:5.2f} {bf['config'] if bf else '':24s} | {us(old4)} "
                      f"{us(new4)} {pct(new4)} {new4['config'] if new4 else '':24s} | {us(new8)} {pct(new8)}",
                      flush=True)
    print(f"\n(elapsed {time.time() - t_start:.0f} s)\nper decode step, linear layers only (x layers + lm_head bf16):")
    summary = {}
    for model, (layers, shapes) in models.items():
        for m in ms:
            def tot(impl, model=model, m=m, layers=layers, shapes=shapes):
                best = {}
                for r in rows:
                    if r["model"] == model and r["m"] == m and r["impl"] == impl and r["ok"]:
                        best[r["layer"]] = min(best.get(r["layer"], float("inf")), r["us"])
                head = best.get("lm_head", float("nan")) if impl == "cublas" else None
                body = sum(v for key, v in best.items() if key != "lm_head") * layers
                return body, head

            cub_body, cub_head = tot("cublas")
            bf_body, _ = tot("gemv_bf16")
            w4_body, _ = tot("w4_gemv")
            w4_old, _ = tot("w4_old")
            lm = min([r["us"] for r in rows if r["model"] == model and r["m"] == m and r["layer"] == "lm_head"
                      and r["impl"] in ("cublas", "gemv_bf16") and r["ok"]] or [float("nan")])
            s = dict(cublas_us=cub_body + cub_head, gemv_bf16_us=min(bf_body, cub_body) + lm,
                     w4_gemv_us=w4_body + lm, w4_old_us=w4_old + lm)
            summary[f"{model},m={m}"] = s
            print(f"  {model} M={m:2d}: cuBLAS bf16 {s['cublas_us']:9.1f} us | best bf16 {s['gemv_bf16_us']:9.1f} us | "
                  f"W4A16 old {s['w4_old_us']:9.1f} us | W4A16 gemv {s['w4_gemv_us']:9.1f} us  -> "
                  f"{s['cublas_us'] / s['w4_gemv_us']:.2f}x vs cuBLAS bf16")
    print("\nbest configs (GEMV_CONFIGS keys kind,M,N,K):")
    for key, cfg in best_cfg.items():
        print(f"  {key}: {cfg}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(copy_gbps=copy_bw, rows=rows, best=best_cfg, summary=summary), f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    sys.exit(main())
