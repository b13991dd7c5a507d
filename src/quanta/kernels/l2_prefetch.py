"""L2 prefetch of the next kernels' weights from inside a latency-bound kernel (Hopper+; issues 5 and 6).

At batch 1 the one-launch decode attention (kernels/decode_attention_fused.py) takes 5-9 us a layer on an H200
and reads almost nothing: HBM sits idle. The weights the layer streams next (o_proj, then the start of
gate_up_proj) are known, so the attention's programs ask L2 to fetch them first thing (one
`cp.async.bulk.prefetch.L2.global` per thread and chunk: fire and forget, nothing waits for it), and the next
GEMV reads them from L2 instead of HBM. The request is a hint: it changes no value, only where the bytes come from.

Earlier tries that did not pay (RESULTS.md): a separate prefetch kernel on a side stream (H200, 1B: 1.211 vs 1.130
ms a step) and per-line `prefetch.global.L2` in the GEMVs themselves under PDL (H100, 1B: 746.8 vs 778.4 tok/s).
Here the prefetch costs the attention a few instructions per thread and no extra launch.

Host side: `prefetch_regions(modules, device)` lists the CUDA parameters / buffers of `modules` (in order, each
module's largest tensor first) as (uint8 view, bytes) regions, at most MAX_REGIONS, together at most
QUANTA_L2_PREFETCH_MB MiB (the last region cut short). Env QUANTA_L2_PREFETCH=0 turns it off.
"""

from __future__ import annotations

import itertools
import os

import torch

from quanta.kernels._compat import HAS_TRITON, tl, triton

MAX_REGIONS = 4


def prefetch_on() -> bool:
    return os.environ.get("QUANTA_L2_PREFETCH", "1") == "1"


def prefetch_budget() -> int:
    return int(float(os.environ.get("QUANTA_L2_PREFETCH_MB", "24")) * (1 << 20))


def _can_prefetch(device: torch.device) -> bool:
    return (device.type == "cuda" and HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(device)[0] >= 9)


def prefetch_regions(modules, device: torch.device) -> list[tuple[torch.Tensor, int]]:
    """(uint8 view, bytes) of the weights of `modules` to prefetch into L2, in order, within the budget; [] where
    the GPU has no bulk prefetch (before Hopper, CPU, the interpreter) or QUANTA_L2_PREFETCH=0."""
    if not modules or not prefetch_on() or not _can_prefetch(device):
        return []
    budget, regions = prefetch_budget(), []
    for module in modules:
        tensors = itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False))
        for t in sorted(tensors, key=lambda t: -t.numel() * t.element_size()):
            if len(regions) == MAX_REGIONS or budget < 16:
                return regions
            if t.device != device or not t.is_contiguous() or t.data_ptr() % 16:
                continue
            nbytes = min(t.numel() * t.element_size(), budget) // 16 * 16
            if nbytes:
                regions.append((t.detach().reshape(-1).view(torch.uint8), nbytes))
                budget -= nbytes
    return regions


def region_args(regions: list[tuple[torch.Tensor, int]], placeholder: torch.Tensor) -> tuple[list, int]:
    """The kernel arguments (ptr0, ptr1, ptr2, ptr3, bytes0, bytes1, bytes2, bytes3) and NPF for `regions`."""
    assert len(regions) <= MAX_REGIONS
    pad = [(placeholder, 0)] * (MAX_REGIONS - len(regions))
    rs = list(regions) + pad
    return [r[0] for r in rs] + [r[1] for r in rs], len(regions)


# fmt: off
@triton.jit
def _prefetch_region(ptr, nbytes, prog, nprogs, NT: tl.constexpr, CHUNK_MIN: tl.constexpr):
    # Program `prog` of `nprogs` prefetches its slice of [ptr, ptr + nbytes): one request per thread, chunks of
    # >= CHUNK_MIN bytes, 16-byte aligned sizes (nbytes and the slices are multiples of 16).
    per = tl.cdiv(tl.cdiv(nbytes, nprogs), 16) * 16
    chunk = tl.maximum(tl.cdiv(tl.cdiv(per, NT), 16) * 16, CHUNK_MIN)
    lo = prog.to(tl.int64) * per
    hi = tl.minimum(lo + per, nbytes)
    off = lo + tl.arange(0, NT).to(tl.int64) * chunk
    size = tl.maximum(tl.minimum(hi - off, chunk), 0).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [ptr + off, size], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def l2_prefetch(p0, p1, p2, p3, n0, n1, n2, n3, prog, nprogs, NPF: tl.constexpr, NT: tl.constexpr):
    """Program `prog` of `nprogs` asks L2 for its share of the NPF regions (p_i, n_i bytes); returns at once.
    NPF == 0 compiles to nothing (the interpreter and pre-Hopper GPUs always get 0)."""
    if NPF > 0:
        _prefetch_region(p0, n0, prog, nprogs, NT, 4096)
    if NPF > 1:
        _prefetch_region(p1, n1, prog, nprogs, NT, 4096)
    if NPF > 2:
        _prefetch_region(p2, n2, prog, nprogs, NT, 4096)
    if NPF > 3:
        _prefetch_region(p3, n3, prog, nprogs, NT, 4096)
# fmt: on
