"""Skinny GEMM for decode (M = 1..16): y[M, N] = x[M, K] @ W[N, K]^T (+ bias), W row-major (nn.Linear layout).

Batch-1 decode reads every weight once per token, so a linear layer is bound by HBM bandwidth. cuBLAS's
M=1 GEMV reaches ~74% of copy bandwidth on small Llama shapes; a tl.dot GEMM padded to M=16 launches too few
programs. Here each program owns BLOCK_N output rows and streams them along K in BLOCK_K chunks (16-byte loads):
- M <= 4 (`use_dot=False`): a broadcast multiply x[m, None, k] * W[None, n, k] accumulated element-wise in fp32
  ([BLOCK_M, BLOCK_N, BLOCK_K] registers), reduced over K once at the end;
- M in 5..16 (`use_dot=True`, fp16/bf16 only): tl.dot on [16, BLOCK_K] x [BLOCK_K, BLOCK_N] tiles.
Split-K: when N / BLOCK_N programs cannot fill the GPU several times over, SPLIT_K programs share a row block;
each writes its fp32 partial to a workspace, bumps a per-row-block counter, and the last one to arrive sums the
partials, adds the bias, stores y and resets the counter to 0. One launch, no memset (the counters are zeroed
once when first allocated, then left at 0 by every launch), safe to capture in CUDA graphs.

Configs (`GemvConfig`, kernels/gemv_config.py) come from `gemv_config(kind, m, n, k)`: the exact-shape table `GEMV_CONFIGS` (fill it
from benchmarks/bench_gemv.py), else a heuristic; env `QUANTA_GEMV_CONFIG=bn4_bk512_sk0_w4_s3[_dot]` forces one
config everywhere (sk0 = automatic split-K). No triton.autotune: nothing is timed at first call / during capture.

`fast_linear(x, weight, bias)` picks this GEMV or F.linear per (M, N, K, dtype) from a per-process table that
`tune_linear_shapes(shapes, ms)` fills by timing both on the GPU. Intended call site (not wired here): the
engine calls `tune_linear_shapes` once at startup, after loading the model and before CUDA-graph capture, with
the (out_features, in_features) of every unquantized Linear and the decode batch sizes it will capture; then
`Linear.forward` calls `fast_linear(x, self.weight, self.bias)` instead of F.linear (untuned shapes = F.linear).
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F

from quanta import envs
from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.counters import zeroed_counters
from quanta.kernels.gemv_config import (  # GemvConfig, GEMV_CONFIGS, gemv_config... are imported from here too
    GEMV_CONFIGS,  # noqa: F401
    GemvConfig,
    _cdiv,
    auto_split_k,
    candidate_configs,
    default_config,  # noqa: F401
    gemv_config,
    num_sms,
)
from quanta.kernels.pdl import (
    pdl_begin,
    pdl_enabled,
    pdl_launch_kwargs,
    pdl_prefetch_rows,
    prefetch_enabled,
    preload_enabled,
)

MAX_M = 16  # the GEMV handles M <= MAX_M rows; larger M is a GEMM


# ------------------------------------------------------------------ split-K bookkeeping
def split_counters(device: torch.device, n: int) -> torch.Tensor | None:
    """Zeroed int32 counters (>= n) for split-K GEMV (kernels/counters.py: None while capturing if too small)."""
    return zeroed_counters("gemv", device, n)


def plan_split(cfg: GemvConfig, m: int, n: int, k: int, out: torch.Tensor):
    """Split-K plan of one GEMV launch: (split, K range per split (whole cfg.block_k steps), fp32 partial
    workspace [split, m, n], counters). Without split-K the workspace and counters are `out` (unused)."""
    split = cfg.split_k or auto_split_k(cfg, n, k, num_sms(out.device))
    split = max(1, min(split, _cdiv(k, cfg.block_k)))
    cnt = split_counters(out.device, _cdiv(n, cfg.block_n)) if split > 1 else None
    if cnt is None:
        return 1, _cdiv(k, cfg.block_k) * cfg.block_k, out, out
    k_split = _cdiv(_cdiv(k, split), cfg.block_k) * cfg.block_k
    split = _cdiv(k, k_split)
    ws = torch.empty(split, m, n, dtype=torch.float32, device=out.device) if split > 1 else out
    return split, k_split, ws, cnt if split > 1 else out


# fmt: off
@triton.jit
def _store_rows(acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def gemv_epilogue(acc, offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr,
                  HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 -> y (+ bias). Split-K: partial to ws [splits, M, N]; the last program of the
    row block (counted by an acq_rel atomic) adds the partials up, stores y and resets the counter."""
    if USE_SPLIT:
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        part = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is stored before the (single-thread) atomic releases them
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1)
        if arrived == num_splits - 1:
            total = tl.zeros_like(acc)
            for s in range(num_splits):
                total += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            _store_rows(total, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, HAS_BIAS)
            tl.atomic_xchg(cnt_ptr + pid_n, 0)
    else:
        _store_rows(acc, offs_m, offs_n, M, N, y_ptr, stride_ym, b_ptr, HAS_BIAS)


@triton.jit
def _gemv_step(acc, x, w, USE_DOT: tl.constexpr):
    # acc [BM, BN] += x [BM, BK] @ w [BN, BK]^T (tensor cores), or acc [BM, BN, BK] += the fp32 products
    if USE_DOT:
        acc += tl.dot(x, tl.trans(w))
    else:
        acc += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    return acc


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_SPLIT, num_splits,
    stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, PF_LINE: tl.constexpr = 64,
    PF_COLS: tl.constexpr = 64, PRELOAD: tl.constexpr = False,
):
    """Program (pid_n, pid_k): rows [pid_n * BLOCK_N, +BLOCK_N) of W over K range [pid_k * K_SPLIT, +K_SPLIT).
    K_SPLIT is a multiple of BLOCK_K, so the mask `k < K` only trims the last step of the last split.
    PRELOAD (PDL): the first step's weight tile is loaded before the wait, that step runs before the loop."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked: loads stay unpredicated along N
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    w_rows = w_ptr + rows[:, None] * stride_wn
    mask_m = offs_m[:, None] < M
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if PREFETCH:  # PDL: this program's weights HBM -> L2 while the previous kernel finishes (kernels/pdl.py)
        pdl_prefetch_rows(w_rows, k_lo, k_hi, BLOCK_N, PF_LINE, PF_COLS)
    if PRELOAD:  # PDL: the first step's weights in flight before the wait (kernels/pdl.py)
        w_pre = tl.load(w_rows + (k_lo + offs_k)[None, :], mask=(k_lo + offs_k < K)[None, :], other=0.0)
    pdl_begin(USE_PDL)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_start = k_lo
    if PRELOAD:
        kk = k_lo + offs_k
        x = tl.load(x_rows + kk[None, :], mask=mask_m & (kk[None, :] < K), other=0.0)
        acc = _gemv_step(acc, x, w_pre, USE_DOT)
        k_start = k_lo + BLOCK_K
    for k0 in range(k_start, k_hi, BLOCK_K):
        kk = k0 + offs_k
        w = tl.load(w_rows + kk[None, :], mask=kk[None, :] < K, other=0.0)
        x = tl.load(x_rows + kk[None, :], mask=mask_m & (kk[None, :] < K), other=0.0)
        acc = _gemv_step(acc, x, w, USE_DOT)
    if not USE_DOT:
        acc = tl.sum(acc, axis=2)
    gemv_epilogue(acc, offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr,
                  HAS_BIAS, USE_SPLIT)
# fmt: on


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [..., K] @ weight[N, K]^T (+ bias) -> [..., N] in x.dtype, for <= MAX_M rows of x (Triton)."""
    require_triton()
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    assert m <= MAX_M and weight.stride(1) == 1, (m, weight.stride())
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    cfg = config or gemv_config("w16", m, n, k)
    use_dot = cfg.use_dot and x.dtype in (torch.float16, torch.bfloat16) and cfg.block_n >= 16
    split, k_split, ws, cnt = plan_split(cfg, m, n, k, y)
    use_pdl = pdl_enabled(x.device)
    # fmt: off
    _gemv_kernel[(_cdiv(n, cfg.block_n), split)](
        x2, weight, bias if bias is not None else weight, y, ws, cnt,
        m, n, k, k_split, split,
        x2.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, USE_SPLIT=split > 1, USE_DOT=use_dot,
        BLOCK_M=16 if use_dot else next_pow2(m), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        USE_PDL=use_pdl, PREFETCH=use_pdl and prefetch_enabled(), PF_LINE=128 // weight.element_size(),
        PF_COLS=max(1, 256 // cfg.block_n), PRELOAD=use_pdl and preload_enabled(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_kwargs(use_pdl),
        **cfg.launch_kwargs(),
    )
    # fmt: on
    return y.reshape(*x.shape[:-1], n)


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             config: GemvConfig | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------ per-shape dispatch: GEMV or cuBLAS
_LINEAR_CHOICE: dict[tuple[int, int, int, torch.dtype], GemvConfig] = {}


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the GEMV where `tune_linear_shapes` found it faster for this (M, N, K, dtype). No timing here."""
    n, k = weight.shape
    m = x.numel() // k if k else 0
    cfg = _LINEAR_CHOICE.get((m, n, k, x.dtype)) if m <= MAX_M else None
    if cfg is None or not x.is_cuda or weight.stride(1) != 1:
        return F.linear(x, weight, bias)
    return gemv(x, weight, bias, cfg)


def time_cuda(fn, reps: int = 30, warmup: int = 3, flush: torch.Tensor | None = None, graph: bool = True) -> float:
    """Median microseconds of fn() on the GPU. fn is captured in a CUDA graph (as decode runs; falls back to eager
    launches if capture fails), and each replay runs after a 256 MiB L2 flush: weights are cold in decode, and
    the flush keeps the GPU busy while the CPU enqueues the timed replay (no launch overhead in the number).
    The flush writes the buffer (default); env QUANTA_BENCH_FLUSH=read reads it instead, so that L2 holds clean
    lines as in decode: the written lines are written back while fn runs, which slows small kernels (H200: the
    int4 GEMVs took ~2.37 ms a step here and 1.73 ms in the engine's trace)."""
    for _ in range(warmup):
        fn()
    run = fn
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run = g.replay
        except Exception:  # not capturable: time eager launches
            torch.cuda.synchronize()
    if flush is None:
        flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    read_flush = envs.get("QUANTA_BENCH_FLUSH") == "read"
    for s, e in zip(starts, ends):
        if read_flush:  # evict by reading: L2 holds clean lines (as in decode), no write-back during fn
            flush.amax()
        else:
            flush.zero_()
        s.record()
        run()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2] * 1e3


def tune_linear_shapes(shapes, ms=(1, 2, 4, 8, 16), dtype: torch.dtype = torch.bfloat16, device="cuda",
                       candidates: list[GemvConfig] | None = None, reps: int = 30, margin: float = 0.97) -> list[dict]:
    """For every (N, K) in `shapes` and M in `ms`: time F.linear and the GEMV candidates (random weights), keep the
    GEMV config for fast_linear when it beats F.linear by `margin`. Call before CUDA-graph capture (it compiles
    and times kernels). Returns one dict per (M, N, K) with the timings, for logging."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device=device)
    report = []
    for n, k in dict.fromkeys((int(a), int(b)) for a, b in shapes):
        w = torch.randn(n, k, device=device, dtype=dtype)
        for m in ms:
            if m > MAX_M:
                continue
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = F.linear(x.float(), w.float())
            t_ref = time_cuda(partial(F.linear, x, w), reps, flush=flush)
            best, t_best = None, float("inf")
            for cfg in candidates or candidate_configs("w16", m, n, k):
                try:
                    out = gemv(x, w, None, cfg)
                    if (out.float() - ref).abs().max() > 2e-2 * ref.abs().max():
                        continue
                    t = time_cuda(partial(gemv, x, w, None, cfg), reps, flush=flush)
                except Exception:  # a config that does not compile on this GPU / triton is skipped
                    continue
                if t < t_best:
                    best, t_best = cfg, t
            key = (m, n, k, dtype)
            if best is not None and t_best < margin * t_ref:
                _LINEAR_CHOICE[key] = best
            else:
                _LINEAR_CHOICE.pop(key, None)
            report.append(dict(m=m, n=n, k=k, cublas_us=t_ref, gemv_us=t_best, config=str(best),
                               use_gemv=key in _LINEAR_CHOICE))
        del w
    return report


def set_linear_choice(m: int, n: int, k: int, dtype: torch.dtype, config: GemvConfig | None) -> None:
    """Pin (or with None, clear) the dispatch of one shape by hand, e.g. from a saved tuning run."""
    if config is None:
        _LINEAR_CHOICE.pop((m, n, k, dtype), None)
    else:
        _LINEAR_CHOICE[(m, n, k, dtype)] = replace(config)
