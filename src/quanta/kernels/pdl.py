"""Programmatic dependent launch (PDL, Hopper+) for the decode kernels, and an L2 weight prefetch to go with it.

A kernel launched with `launch_pdl=True` may start while the kernel before it in the stream is still running,
once every program of that kernel has called `griddepcontrol.launch_dependents` (or exited). Until its own
`griddepcontrol.wait` returns (the previous kernel finished and its stores are visible) it may only touch data
no earlier kernel writes: model weights. So a PDL kernel here does, in order:

1. PRELOAD (QUANTA_PDL_PRELOAD=1, the default under PDL): its first K step's weights into registers (the GEMVs),
   or everything but q / k / v (decode attention: lengths, block table, first KV tile), so the first round trip
   to memory overlaps the previous kernel's drain instead of following it; or (QUANTA_PDL_PREFETCH=1, off: H100,
   1B batch 1, 746.8 vs 778.4 tok/s without PDL) `pdl_prefetch_l2(ptrs)` on all the weights it will stream;
2. `pdl_begin(USE_PDL)`: wait for the previous kernel, then let the next one launch early;
3. its normal work.

Why reading before the wait is safe for more than weights: a kernel starts only once every program of the one
before it has passed its own wait, i.e. once the kernel two back has finished. So only what the immediately
preceding kernel writes (a GEMV's input row, attention's q / k / v) has to wait.

Under CUDA graphs the launch attribute becomes a programmatic edge of the graph. A PDL kernel after a kernel
that never triggers (cuBLAS, PyTorch) simply starts when that one ends; kernels launched without PDL after ours
wait for them as usual. With USE_PDL False the kernels are exactly the plain ones (the constexpr branch is
compiled out; the interpreter never runs it). ON by default on Hopper or newer (env QUANTA_PDL=0 turns it off);
QUANTA_PDL_PRELOAD=0 / QUANTA_PDL_PREFETCH=1 pick the overlap of step 1. H200, batch-1 decode, tok/s, same call
(benchmarks/results/h200_s8a_*): 8B W4A16_AWQ 420.8 off -> 460.3 on; 1B bf16 952.0 -> 998.1 (PDL without the
preloads: 950.7; + o_proj on the skinny GEMV, fast_ops.GEMV_LINEAR_MAX_BYTES: 1,026.7); 8B bf16 218.1 -> 220.6.
"""

from __future__ import annotations

import os

import torch

from quanta import envs
from quanta.kernels._compat import HAS_TRITON, tl, triton

_ENABLED: dict[int, bool] = {}
_FORCED: list[bool] = []  # set_pdl's override (tests and benchmarks), else the env decides


def set_pdl(on: bool | None) -> None:
    """Force PDL on (where the GPU has it) or off for kernels launched from now on; None: back to QUANTA_PDL.
    Kernels already captured in CUDA graphs keep what they were captured with."""
    _FORCED[:] = [] if on is None else [on]
    _ENABLED.clear()


def pdl_enabled(device: torch.device) -> bool:
    """PDL for kernels launched on `device`: env QUANTA_PDL not 0, a CUDA device of compute capability >= 9, a
    Triton that has it (`tl.extra.cuda.gdc_wait` and `launch_pdl`), not the Triton interpreter."""
    if device.type != "cuda" or not HAS_TRITON:
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    on = _ENABLED.get(idx)
    if on is None:
        on = (
            (_FORCED[0] if _FORCED else envs.get("QUANTA_PDL"))
            and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and hasattr(tl.extra.cuda, "gdc_wait")
            and torch.cuda.get_device_capability(idx)[0] >= 9
        )
        _ENABLED[idx] = on
    return on


# Read once (kernel launchers ask on every launch): what a PDL kernel does before its wait (step 1 above)
_PREFETCH = envs.get("QUANTA_PDL_PREFETCH")
_PRELOAD = envs.get("QUANTA_PDL_PRELOAD")


def prefetch_enabled() -> bool:
    return _PREFETCH


def preload_enabled() -> bool:
    return _PRELOAD


def pdl_launch_kwargs(on: bool) -> dict:
    """Extra launch keywords of a kernel compiled with USE_PDL=on."""
    return {"launch_pdl": True} if on else {}


# fmt: off
@triton.jit
def pdl_begin(USE_PDL: tl.constexpr):
    """Wait for the previous kernel (its stores become visible), then allow the next kernel to launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_prefetch_l2(ptrs, mask):
    """Ask L2 to fetch the 128-byte lines at `ptrs` (any shape; masked lanes skipped); nothing is returned or
    waited for. Use it on weights only, before pdl_begin."""
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
        "=r,l,r", [ptrs, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )
# fmt: on


# fmt: off
@triton.jit
def pdl_prefetch_rows(row_ptrs, k_lo, k_hi, ROWS: tl.constexpr, LINE: tl.constexpr, COLS: tl.constexpr):
    """Prefetch elements [k_lo, k_hi) of ROWS weight rows (row_ptrs: [ROWS, 1] pointers to element 0) into L2:
    one request per LINE elements (128 bytes), COLS lines of each row per step."""
    for k0 in range(k_lo, k_hi, COLS * LINE):
        kk = k0 + tl.arange(0, COLS) * LINE
        pdl_prefetch_l2(row_ptrs + kk[None, :], tl.broadcast_to(kk[None, :] < k_hi, [ROWS, COLS]))
# fmt: on
