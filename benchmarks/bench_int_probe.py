"""How fast can a Triton kernel READ an int4 weight in the int GEMVs' tiling? (issue 6, batch-1 decode)

    python benchmarks/bench_int_probe.py [--json out.json]

The int4 GEMVs run at 1.0-1.6 TB/s on an H200 (bench_int_gemv.py). This kernel loads the same packed weight in
the same [BLOCK_N rows, BLOCK_K values] steps (as bytes, or as int32 words) and only adds the loaded integers up
(one integer add a load element), so its time is the memory side alone: if it reaches the copy bandwidth, the
GEMVs lose the rest to their arithmetic; if not, to how they load. Cold L2 (kernels/gemv.time_cuda's flush),
CUDA-graph replays, Llama-3.1-8B gate_up and down shapes; torch's copy of the same bytes and cuBLAS's GEMV on
them (as a bf16 weight [N, K / 4]) are the baselines. QUANTA_BENCH_FLUSH=read: a reading flush (clean L2 lines).
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from quanta.kernels._compat import tl, triton  # noqa: E402

SHAPES = [("gate_up", 28672, 4096), ("down", 4096, 14336), ("qkv", 6144, 4096)]
# (elements: "bytes" | "words", BLOCK_N, BLOCK_K values a step, num_warps, splits, stages: the K loop's software
# pipeline, tl.range(num_stages=...): cp.async, stages - 1 steps in flight; 1 = plain loads)
# "tma": words through a host TMA descriptor, block [BLOCK_N, BLOCK_K / 8], pipelined `stages` deep by Triton
CONFIGS = [
    ("bytes", 4, 2048, 4, 1, 1), ("words", 8, 1024, 4, 1, 1), ("words", 8, 1024, 4, 1, 3),
    ("words", 16, 1024, 4, 1, 3), ("words", 8, 2048, 4, 1, 3), ("words", 32, 512, 8, 1, 3),
    ("tma", 8, 1024, 4, 1, 3), ("tma", 8, 1024, 4, 1, 4), ("tma", 16, 1024, 4, 1, 4), ("tma", 32, 1024, 4, 1, 3),
    ("tma", 64, 512, 4, 1, 4), ("tma", 8, 2048, 4, 1, 3), ("tma", 32, 1024, 8, 1, 4), ("tma", 16, 1024, 4, 2, 4),
    ("tma", 128, 256, 4, 1, 6), ("tma", 8, 1024, 1, 1, 4),
]


@triton.jit
def _probe(w_ptr, out_ptr, N, ROW, K_SPLIT, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, STAGES: tl.constexpr = 1):
    """Sum of the elements of BLOCK_N rows over [pid_k * K_SPLIT, +K_SPLIT), BLOCK_E elements a step."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.minimum(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)
    ptrs = w_ptr + rows[:, None] * ROW + tl.arange(0, BLOCK_E)[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.int32)
    for e0 in tl.range(pid_k * K_SPLIT, pid_k * K_SPLIT + K_SPLIT, BLOCK_E, num_stages=STAGES):
        acc += tl.load(ptrs + e0).to(tl.int32)
    tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1))


@triton.jit
def _probe_tma(desc, out_ptr, N, K_SPLIT, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, STAGES: tl.constexpr):
    """_probe with the [BLOCK_N, BLOCK_E] words of a step brought in by TMA (Triton's pipelined descriptor loads)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.int32)
    for e0 in tl.range(pid_k * K_SPLIT, pid_k * K_SPLIT + K_SPLIT, BLOCK_E, num_stages=STAGES):
        acc += desc.load([pid_n * BLOCK_N, e0])
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.atomic_add(out_ptr + rows, tl.sum(acc, axis=1), mask=rows < N)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from quanta.kernels.gemv import time_cuda

    dev = "cuda"
    flush = torch.empty(256 << 20, dtype=torch.int8, device=dev)
    rows = []
    print(f"device: {torch.cuda.get_device_name()}  (TB/s of int4 weight bytes read; copy = read + write)")
    for name, n, k in SHAPES:
        packed = torch.randint(0, 256, (n, k // 2), device=dev, dtype=torch.uint8)
        nbytes = packed.numel()
        dst = torch.empty_like(packed)
        t_copy = time_cuda(partial(dst.copy_, packed), a.reps, flush=flush)
        line = f"{name:8s} N={n:6d} K={k:6d} {nbytes / 2**20:6.1f} MiB | copy {2 * nbytes / t_copy / 1e6:5.2f} |"
        rows.append(dict(layer=name, n=n, k=k, kind="copy", us=t_copy, tbps=2 * nbytes / t_copy / 1e6))
        w16 = packed.view(torch.bfloat16)  # cuBLAS GEMV reading the same bytes as a bf16 weight [N, K / 4]
        x16 = torch.randn(1, w16.shape[1], device=dev, dtype=torch.bfloat16)
        t_mv = time_cuda(partial(torch.nn.functional.linear, x16, w16), a.reps, flush=flush)
        line += f" cuBLAS bf16 same bytes {nbytes / t_mv / 1e6:5.2f} |"
        rows.append(dict(layer=name, n=n, k=k, kind="cublas", us=t_mv, tbps=nbytes / t_mv / 1e6))
        out = torch.zeros(n, dtype=torch.int32, device=dev)
        for kind, bn, bk, warps, splits, stages in CONFIGS:
            src = packed if kind == "bytes" else packed.view(torch.int32)
            per_row = src.shape[1]
            be = bk // 2 if kind == "bytes" else bk // 8  # elements a step
            k_split = -(-per_row // splits)
            if per_row % be or k_split % be:
                continue
            grid = (triton.cdiv(n, bn), splits)
            if kind == "tma":
                from triton.tools.tensor_descriptor import TensorDescriptor

                desc = TensorDescriptor(src, list(src.shape), [src.stride(0), 1], [bn, be])
                fn = partial(_probe_tma[grid], desc, out, n, k_split, BLOCK_N=bn, BLOCK_E=be, STAGES=stages,
                             num_warps=warps)
            else:
                fn = partial(_probe[grid], src, out, n, per_row, k_split, BLOCK_N=bn, BLOCK_E=be, STAGES=stages,
                             num_warps=warps)
            try:
                t = time_cuda(fn, a.reps, flush=flush)
            except Exception as e:  # a config that does not compile here is reported, not fatal
                print(f"{kind} {bn}x{bk}: {type(e).__name__}: {str(e)[:120]}")
                continue
            tbps = nbytes / t / 1e6
            rows.append(dict(layer=name, n=n, k=k, kind=kind, block_n=bn, block_k=bk, warps=warps, splits=splits,
                             stages=stages, us=t, tbps=tbps))
            line += f" {kind[0]}:{bn}x{bk}w{warps}sk{splits}st{stages} {tbps:4.2f}"
        print(line, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
