"""Launch the int4 decode GEMVs of the Llama-3.1-8B shapes a few times each, for Nsight Compute (hardware counters:
occupancy, warp stall reasons, DRAM throughput), e.g. (gpu_round.sh ncu):

    ncu --clock-control none --kernel-name regex:"_w4_mma|_w_int_gemv_asm" --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python benchmarks/ncu_int_gemv.py

Cases (default all): mma16 (qkv, o, gate_up and down at 16 rows, the mma GEMV's default configs), silu1 (gate_up +
SiLU at one row), asm1 (qkv, o and down at one row, the asm GEMV). Each runs twice (the first launch compiles).
--variants t2_w8_px,t4_w8_px: mma16 also on these configs (x read once a program for 2 / 4 tiles: its L1 / L2 load
traffic against the default's, e.g. `NCU_ARGS="--cases mma16 --variants t2_w8_px,t4_w8_px" gpu_round.sh ncu`)."""

from __future__ import annotations

import argparse
from functools import partial

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default="mma16,silu1,asm1")
    ap.add_argument("--variants", default="", help="mma16 also on these configs (comma-separated, e.g. t2_w8_px)")
    a = ap.parse_args()
    from quanta.quantization import w_int_mma
    from quanta.quantization.w_int_kernel import w_int_linear

    dev, group = "cuda", 128
    g = torch.Generator(device=dev).manual_seed(0)

    def layer(n, k):
        packed = torch.randint(0, 256, (n, k // 2), device=dev, generator=g, dtype=torch.uint8)
        scale = (torch.rand(n, k // group, device=dev, generator=g) * 0.01 + 0.001).bfloat16()
        zero = torch.randint(0, 16, (n, k // group), device=dev, generator=g, dtype=torch.uint8)
        return packed, scale, zero

    qkv, o, gate_up, down = layer(6144, 4096), layer(4096, 4096), layer(28672, 4096), layer(4096, 14336)
    runs = []
    for case in a.cases.split(","):
        if case == "mma16":
            for (packed, scale, zero), k in ((qkv, 4096), (o, 4096), (gate_up, 4096), (down, 14336)):
                words, x = w_int_mma.mma_pack(packed, group), torch.randn(16, k, device=dev).bfloat16()
                cfgs = [w_int_mma.config_for(16, packed.shape[0], k)]
                cfgs += [w_int_mma.MmaConfig.parse(v) for v in a.variants.split(",") if v]
                for cfg in cfgs:
                    runs.append((f"mma16 N={packed.shape[0]} {cfg}",
                                 partial(w_int_mma.w_int_mma_linear, x, words, scale, zero, group, None, cfg,
                                         sz=w_int_mma.mma_pack_sz(scale, zero))))
        elif case == "silu1":
            packed, scale, zero = gate_up
            words, x = w_int_mma.mma_pack(packed, group), torch.randn(1, 4096, device=dev).bfloat16()
            cfg = w_int_mma.silu_config(1)
            runs.append((f"silu1 {cfg}", partial(w_int_mma.w_int_mma_linear, x, words, scale, zero, group, None, cfg,
                                                  True, sz=w_int_mma.mma_pack_sz(scale, zero))))
        elif case == "asm1":
            for name, (packed, scale, zero) in (("qkv", qkv), ("o", o), ("down", down)):
                k = packed.shape[1] * 2
                x = torch.randn(1, k, device=dev).bfloat16()
                runs.append((f"asm1 {name}", partial(w_int_linear, x, packed, scale, zero, 4, group, k)))
    for name, fn in runs:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
        print("ran", name, flush=True)


if __name__ == "__main__":
    main()
