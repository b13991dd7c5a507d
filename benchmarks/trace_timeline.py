"""The GPU kernel time line of a torch.profiler trace (profile_step.py --trace --timeline): how much of the wall
time some kernel runs (busy), the idle gaps between kernels, how much kernels overlap (PDL), and per kernel name
its launches, mean duration and mean gap before it (idle time since the previous kernel ended). Kernels of one name
with different grids (the same GEMV on qkv / o / down) are listed apart, their grid after the name. Copies and
memsets on the GPU (the step's input uploads, the sampled tokens' download) count as GPU work too, listed by name."""

from __future__ import annotations

from collections import defaultdict

GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def summarize(events: list[dict], steps: int = 1, top: int = 25) -> str:
    ks = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATS), key=lambda e: e["ts"])
    if not ks:
        return "no kernel events in the trace"
    t0, t1 = ks[0]["ts"], max(e["ts"] + e["dur"] for e in ks)
    busy, gaps, end = 0.0, 0.0, t0
    per = defaultdict(lambda: [0, 0.0, 0.0])  # launches, duration, idle gap before
    for e in ks:
        s, d = e["ts"], e["dur"]
        gap = max(0.0, s - end)
        gaps += gap
        busy += max(0.0, s + d - max(s, end))
        end = max(end, s + d)
        grid = (e.get("args") or {}).get("grid")
        rec = per[e["name"][:52] + (f" {list(grid)}" if grid else "")]
        rec[0] += 1
        rec[1] += d
        rec[2] += gap
    wall = t1 - t0
    summed = sum(e["dur"] for e in ks)
    copies = sum(e.get("cat") != "kernel" for e in ks)
    lines = [f"kernels: {len(ks) - copies} + copies / memsets: {copies} ({len(ks) / steps:.0f} a step); wall {wall / steps:.1f} us a step, busy {busy / steps:.1f}, "
             f"idle gaps {gaps / steps:.1f}, sum of durations {summed / steps:.1f} (overlap {(summed - busy) / steps:.1f})",
             f"{'kernel':70s} {'n/step':>7s} {'mean us':>8s} {'us/step':>8s} {'gap us':>7s}"]
    for name, (n, d, g) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"{name:70s} {n / steps:7.1f} {d / n:8.2f} {d / steps:8.1f} {g / n:7.2f}")
    return "\n".join(lines)
