"""Fused-prologue GEMVs (kernels/gemv_fused.py) vs the unfused pair (norm / SiLU kernel + cuBLAS), batch-1 decode.

    python benchmarks/bench_fused_gemv.py [--model 1b] [--configs bn16_bk512_sk1_w4_s3,...] [--json out.json]

Each measurement is one CUDA graph holding the op for `--layers` distinct weight copies in a row (as one decode
step runs them: weights cold, activations warm, no launch overhead), replayed `--reps` times; the table shows
microseconds per op (graph time / layers). Pairs: input_layernorm -> qkv_proj, post_attention_layernorm ->
gate_up_proj, SiLU -> down_proj.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

SHAPES = {  # model: (hidden, qkv out, intermediate)
    "1b": (2048, 3072, 8192),
    "8b": (4096, 6144, 14336),
}
NORM_CONFIGS = [
    "bn16_bk512_sk1_w4_s3",
    "bn8_bk512_sk1_w4_s3",
    "bn32_bk256_sk1_w4_s3",
    "bn16_bk256_sk1_w4_s3",
    "bn16_bk512_sk2_w4_s3",
    "bn4_bk512_sk1_w4_s3",
    "bn32_bk256_sk1_w4_s3_dot",
    "bn64_bk128_sk1_w4_s3_dot",
    "bn4_bk512_sk1_w4_s3_nx",  # "_nx": the next K step's loads before this step's math
    "bn4_bk256_sk1_w4_s3_nx",
    "bn8_bk256_sk1_w4_s3_nx",
]
SILU_CONFIGS = [
    "bn4_bk512_sk0_w4_s3",
    "bn8_bk512_sk0_w4_s3",
    "bn4_bk1024_sk0_w8_s3",
    "bn16_bk512_sk0_w4_s3",
    "bn4_bk512_sk4_w4_s3",
    "bn8_bk256_sk8_w4_s3",
    "bn32_bk256_sk0_w4_s3_dot",
    "bn2_bk1024_sk0_w4_s3",
    "bn2_bk1024_sk0_w4_s3_nx",
    "bn4_bk512_sk0_w4_s3_nx",
    "bn2_bk512_sk0_w4_s3_nx",
]


def graph_us(fn, layers: int, reps: int) -> float:
    """Median microseconds per call of fn(i) for i in range(layers), all captured in one graph."""
    for i in range(layers):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(layers):
            fn(i)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1e3 / layers)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--m", type=int, default=1)
    ap.add_argument("--norm-configs", default=",".join(NORM_CONFIGS))
    ap.add_argument("--silu-configs", default=",".join(SILU_CONFIGS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from quanta.kernels.activation import silu_and_mul
    from quanta.kernels.gemv import GemvConfig
    from quanta.kernels.gemv_fused import gemv_add_rms_norm, gemv_add_rms_norm_ref, gemv_silu_mul
    from quanta.kernels.rms_norm import fused_add_rms_norm

    hidden, qkv, inter = SHAPES[args.model]
    dt, dev, n_layers, m = torch.bfloat16, "cuda", args.layers, args.m
    torch.manual_seed(0)
    x = torch.randn(m, hidden, device=dev, dtype=dt)
    r = torch.randn(m, hidden, device=dev, dtype=dt)
    gu = torch.randn(m, 2 * inter, device=dev, dtype=dt)
    nw = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dt)
    rows = []
    pairs = [("norm->qkv", qkv, hidden), ("norm->gate_up", 2 * inter, hidden), ("silu->down", hidden, inter)]
    for name, n, k in pairs:
        ws = [torch.randn(n, k, device=dev, dtype=dt) * 0.02 for _ in range(n_layers)]
        if name.startswith("norm"):

            def unfused(i, ws=ws):
                h, _ = fused_add_rms_norm(x, r, nw, 1e-5)
                return F.linear(h, ws[i])

            def linear_only(i, ws=ws):
                return F.linear(x, ws[i])

            ref = gemv_add_rms_norm_ref(x.float(), r.float(), nw.float(), 1e-5, ws[0].float())[0]
            configs = args.norm_configs.split(",")

            def fused(i, cfg, ws=ws):
                return gemv_add_rms_norm(x, r, nw, 1e-5, ws[i], None, cfg)[0]
        else:

            def unfused(i, ws=ws):
                return F.linear(silu_and_mul(gu), ws[i])

            def linear_only(i, ws=ws):
                return F.linear(gu[:, :inter], ws[i])

            ref = F.linear(F.silu(gu[:, :inter].float()) * gu[:, inter:].float(), ws[0].float())
            configs = args.silu_configs.split(",")

            def fused(i, cfg, ws=ws):
                return gemv_silu_mul(gu, ws[i], None, cfg)

        t_un = graph_us(unfused, n_layers, args.reps)
        t_lin = graph_us(linear_only, n_layers, args.reps)
        gbps = n * k * 2 / t_lin / 1e3
        rows.append(dict(pair=name, impl="unfused (kernel + cuBLAS)", us=t_un))
        rows.append(dict(pair=name, impl="cuBLAS linear alone", us=t_lin, gbps=gbps))
        for c in configs:
            cfg = GemvConfig.parse(c)
            try:
                out = fused(0, cfg)
                err = float((out.float() - ref).abs().max() / ref.abs().max())
                t = graph_us(lambda i, cfg=cfg: fused(i, cfg), n_layers, args.reps)
            except Exception as e:  # a config that does not compile is reported, not fatal
                rows.append(dict(pair=name, impl=f"fused {c}", error=f"{type(e).__name__}: {str(e)[:80]}"))
                continue
            rows.append(dict(pair=name, impl=f"fused {c}", us=t, err=err))
        del ws
        torch.cuda.empty_cache()
    print(f"{torch.cuda.get_device_name()}  model {args.model}  M={m}  ({n_layers} weight copies per graph)")
    for row in rows:
        extra = f"  err {row['err']:.1e}" if "err" in row else (f"  {row['gbps']:.0f} GB/s" if "gbps" in row else "")
        val = f"{row['us']:8.2f} us" if "us" in row else row.get("error", "")
        print(f"{row['pair']:14s} {row['impl']:40s} {val}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), model=args.model, m=m, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
