"""The card's measured limits: copy bandwidth and bf16 matmul rate (PERFORMANCE.md's method)."""

from __future__ import annotations

import time

import torch


def _time(fn, iters: int) -> float:
    """Median seconds of fn() over iters runs (CUDA events on GPU, perf_counter on CPU)."""
    fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = 1 << 27
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = _time(lambda: dst.copy_(src), 10)
    return 2 * nbytes / t


def matmul_flops(device: torch.device, n: int = 8192) -> float:
    if device.type != "cuda":
        n, dtype = 1024, torch.float32
    else:
        dtype = torch.bfloat16
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = _time(lambda: a @ b, 10)
    return 2 * n**3 / t


def weight_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
