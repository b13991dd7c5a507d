"""Decode GEMV with the op before it fused into its prologue: one launch instead of two (or three).

Batch-1 decode of a small model is a chain of short kernels whose fixed cost (launch, ramp-up, drain: ~1.5-2 us
each) adds up to a large share of the step. Two pairs are fused here, on top of kernels/gemv.py's skinny GEMV
(same configs, split-K epilogue and CUDA-graph safety):

- `gemv_add_rms_norm(x, residual, norm_w, eps, W)`: RMSNorm(x + residual) @ W^T, and the new residual
  x + residual (the decoder layer's input_layernorm -> qkv_proj and post_attention_layernorm -> gate_up_proj).
  Every program first reads the whole row(s) once for the sum of squares (a few KiB from L2), then streams its
  weights; the programs of row block 0 also store the new residual for their K range.
- `gemv_silu_mul(gu, W)`: (SiLU(gate) * up) @ W^T with gu = gate | up (the MLP's down_proj), which also
  replaces cuBLAS's separate split-K reduce kernel by the GEMV's in-kernel one.

Numerics follow the unfused kernels (kernels/rms_norm.py, kernels/activation.py): the sum, the normalised value
and the SiLU product are rounded to the activation dtype exactly where those kernels round. The `*_ref` twins
run the unfused PyTorch references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quanta import envs
from quanta.kernels._compat import next_pow2, require_triton, tl, triton
from quanta.kernels.gemv import MAX_M, GemvConfig, gemv_epilogue, plan_split
from quanta.kernels.pdl import (
    pdl_begin,
    pdl_enabled,
    pdl_launch_kwargs,
    pdl_prefetch_rows,
    prefetch_enabled,
    preload_enabled,
)

PRO_NORM = 1  # x = RMSNorm(x + residual) * norm_weight
PRO_SILU = 2  # x = SiLU(gu[:, :K]) * gu[:, K:]


def fused_config(prologue: int, m: int, n: int, k: int) -> GemvConfig:
    """Config of the fused GEMV (benchmarks/bench_fused_gemv.py, H200, 1B shapes at M=1: bn4_bk512 without
    split-K for the norm prologue, which re-reads the whole row per split); env
    QUANTA_GEMV_FUSED_CONFIG[_NORM|_SILU]='bn4_bk512_sk1_w4_s3' forces one."""
    env = envs.get(f"QUANTA_GEMV_FUSED_CONFIG_{'NORM' if prologue == PRO_NORM else 'SILU'}")
    env = env or envs.get("QUANTA_GEMV_FUSED_CONFIG")
    if env:
        return GemvConfig.parse(env)
    if m > 4:
        return GemvConfig(block_n=32, block_k=256, num_warps=4, use_dot=True)
    # one row: the next K step's loads issued before this step's math ("_nx"): H200, 1B batch-1 latency 944.8 /
    # 949.8 tok/s vs 922.5 / 928.5 without, two alternating runs each (benchmarks/results/h200_s5_nxab_*)
    nx = m == 1
    # Not taken (H200, 1B batch 1, tok/s vs the defaults' 1,113.8-1,122.9 in the same calls, h200_s13a_* / s13c_*):
    # norm on bn4_bk2048_sk1_w4_s1 1,079.3, the norm kernel + plain qkv GEMV 1,062.0, gate_up fused too 940.2; SiLU
    # on bn4_bk2048_nx 1,026.9, bn4_bk2048_w8_nx 1,090.4, bn8_bk1024_w8_nx 1,111.2, bn2_bk2048_nx 1,063.8
    if prologue == PRO_NORM:
        return GemvConfig(block_n=4 if m <= 2 else 8, block_k=512 if m <= 2 else 256, split_k=1, num_warps=4,
                          next_step=nx)
    if m == 1:  # H200, 1B batch-1 latency: bn4_bk1024_sk1_w4_s1_nx 1,064.3 tok/s vs bn2_bk1024 (before) 1,032.4 /
        # 1,031.6, bn4_bk512 1,039.2, bn8_bk512 998.2, SiLU and down apart 1,000.6 (benchmarks/results/h200_s11e_*)
        return GemvConfig(block_n=4, block_k=1024, split_k=1, num_warps=4, num_stages=1, next_step=True)
    if m <= 2:  # H100, 1B down_proj at M=1: bn2_bk1024 15.8 us, bn4_bk512 16.8 (benchmarks/results/h100_s4_*)
        return GemvConfig(block_n=2, block_k=1024, num_warps=4, next_step=nx)
    return GemvConfig(block_n=8, block_k=512, num_warps=4)


# fmt: off
@triton.jit
def _step_loads(k0, k_hi, offs_k, mask_m, x_rows, r_rows, nw_ptr, w_rows, K, PROLOGUE: tl.constexpr,
                HAS_RES: tl.constexpr, LOAD_W: tl.constexpr = True):
    """The loads of the K step at k0 (none past k_hi): the weight tile and the prologue's inputs, (w, a, b, c) =
    norm: (W, x, residual or x, norm weight); SiLU: (W, gate, up, up again: unused). LOAD_W False: w is 0."""
    kk = k0 + offs_k
    live = kk < k_hi
    msk = mask_m & live[None, :]
    w = 0.0
    if LOAD_W:
        w = tl.load(w_rows + kk[None, :], mask=live[None, :], other=0.0)
    a = tl.load(x_rows + kk[None, :], mask=msk, other=0.0)
    if PROLOGUE == 1:
        b = a
        if HAS_RES:
            b = tl.load(r_rows + kk[None, :], mask=msk, other=0.0)
        c = tl.load(nw_ptr + kk, mask=live, other=0.0)
    else:
        b = tl.load(x_rows + K + kk[None, :], mask=msk, other=0.0)
        c = b  # unused
    return w, a, b, c


@triton.jit
def _gemv_prologue_kernel(
    x_ptr, r_ptr, nw_ptr, res_out_ptr, w_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr,
    M, N, K, K_SPLIT, num_splits, eps,
    stride_xm, stride_rm, stride_om, stride_wn, stride_ym,
    PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, USE_SPLIT: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr = False, PREFETCH: tl.constexpr = False, PF_LINE: tl.constexpr = 64,
    PF_COLS: tl.constexpr = 64, NEXT: tl.constexpr = False, PRELOAD: tl.constexpr = False,
):
    """Program (pid_n, pid_k): rows [pid_n * BLOCK_N, +BLOCK_N) of W over K range [pid_k * K_SPLIT, +K_SPLIT),
    with the input row(s) built on the fly by the prologue. x: [M, K] (norm) or [M, 2K] (SiLU: gate | up).
    NEXT: step k + 1's loads are issued before step k's math (config suffix "_nx")."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    dtype = x_ptr.dtype.element_ty
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m[:, None] < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped, not masked: loads stay unpredicated along N
    w_rows = w_ptr + rows[:, None] * stride_wn
    x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm
    r_rows = r_ptr + offs_m[:, None].to(tl.int64) * stride_rm
    k_lo = pid_k * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, K)
    if PREFETCH:  # PDL: this program's weights HBM -> L2 while the previous kernel finishes (kernels/pdl.py)
        pdl_prefetch_rows(w_rows, k_lo, k_hi, BLOCK_N, PF_LINE, PF_COLS)
    if PRELOAD:  # PDL: the first step's weight tile in flight before the wait (kernels/pdl.py)
        w_pre = tl.load(w_rows + (k_lo + offs_k)[None, :], mask=(k_lo + offs_k < k_hi)[None, :], other=0.0)
    pdl_begin(USE_PDL)
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PROLOGUE == 1:  # pass 1: each row's mean square of h = x + residual (rounded as the norm kernel does)
        offs_nb = tl.arange(0, NORM_BLOCK)
        ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, NORM_BLOCK):
            kk = k0 + offs_nb
            msk = mask_m & (kk[None, :] < K)
            h = tl.load(x_rows + kk[None, :], mask=msk, other=0.0)
            if HAS_RES:
                h = (h.to(tl.float32) + tl.load(r_rows + kk[None, :], mask=msk, other=0.0).to(tl.float32)).to(dtype)
            hf = h.to(tl.float32)
            ss += tl.sum(hf * hf, axis=1)
        rstd = tl.rsqrt(ss / K + eps)
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    w, a, b, c = _step_loads(k_lo, k_hi, offs_k, mask_m, x_rows, r_rows, nw_ptr, w_rows, K, PROLOGUE, HAS_RES,
                             not PRELOAD)
    if PRELOAD:
        w = w_pre
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if NEXT:  # issue the next step's loads before this step's math: two steps in flight per program
            w_n, a_n, b_n, c_n = _step_loads(k0 + BLOCK_K, k_hi, offs_k, mask_m, x_rows, r_rows, nw_ptr, w_rows, K,
                                             PROLOGUE, HAS_RES)
        kk = k0 + offs_k
        if PROLOGUE == 1:
            h = a
            if HAS_RES:
                h = (a.to(tl.float32) + b.to(tl.float32)).to(dtype)
                own = (offs_m[:, None] < tl.where(pid_n == 0, M, 0)) & (kk[None, :] < K)  # row block 0 stores
                tl.store(res_out_ptr + offs_m[:, None].to(tl.int64) * stride_om + kk[None, :], h, mask=own)
            hn = (h.to(tl.float32) * rstd[:, None]).to(dtype)
            x = (c.to(tl.float32)[None, :] * hn.to(tl.float32)).to(dtype)
        else:
            g = a.to(tl.float32)
            x = (g / (1.0 + tl.exp(-g)) * b.to(tl.float32)).to(dtype)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w))
        else:
            acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
        if NEXT:
            w, a, b, c = w_n, a_n, b_n, c_n
        else:  # the next step's loads after this step's math (one step in flight)
            w, a, b, c = _step_loads(k0 + BLOCK_K, k_hi, offs_k, mask_m, x_rows, r_rows, nw_ptr, w_rows, K,
                                     PROLOGUE, HAS_RES)
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    gemv_epilogue(acc, offs_m, offs_n, M, N, pid_n, pid_k, num_splits, y_ptr, stride_ym, b_ptr, ws_ptr, cnt_ptr,
                  HAS_BIAS, USE_SPLIT)
# fmt: on


def _launch(prologue: int, x2, r2, nw, eps: float, weight, bias, config: GemvConfig | None):
    require_triton()
    n, k = weight.shape
    m = x2.shape[0]
    assert m <= MAX_M and weight.stride(1) == 1 and x2.stride(1) == 1, (m, weight.stride(), x2.stride())
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    res_out = torch.empty(m, k, dtype=x2.dtype, device=x2.device) if r2 is not None else None
    if m == 0 or n == 0:
        return y, res_out
    cfg = config or fused_config(prologue, m, n, k)
    use_dot = cfg.use_dot and x2.dtype in (torch.float16, torch.bfloat16) and cfg.block_n >= 16
    block_m = 16 if use_dot else next_pow2(m)
    split, k_split, ws, cnt = plan_split(cfg, m, n, k, y)
    r_arg = r2 if r2 is not None else x2
    use_pdl = pdl_enabled(x2.device)
    # fmt: off
    _gemv_prologue_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x2, r_arg, nw if nw is not None else weight, res_out if res_out is not None else y, weight,
        bias if bias is not None else weight, y, ws, cnt,
        m, n, k, k_split, split, eps,
        x2.stride(0), r_arg.stride(0), res_out.stride(0) if res_out is not None else 0, weight.stride(0), y.stride(0),
        PROLOGUE=prologue, HAS_RES=r2 is not None, HAS_BIAS=bias is not None, USE_SPLIT=split > 1,
        USE_DOT=use_dot, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        NORM_BLOCK=max(16, min(next_pow2(k), 2048 // block_m)),
        USE_PDL=use_pdl, PREFETCH=use_pdl and prefetch_enabled(), PF_LINE=128 // weight.element_size(),
        PF_COLS=max(1, 256 // cfg.block_n), NEXT=cfg.next_step, PRELOAD=use_pdl and preload_enabled(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_launch_kwargs(use_pdl),
        **cfg.launch_kwargs(),
    )
    # fmt: on
    return y, res_out


def gemv_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) @ weight^T (+ bias), x + residual); without a residual, (RMSNorm(x) @ W^T, x).
    x, residual: [..., K] with <= MAX_M rows; weight [N, K] row-major."""
    k = weight.shape[1]
    x2 = x.reshape(-1, k)
    r2 = residual.reshape(-1, k) if residual is not None else None
    y, res_out = _launch(PRO_NORM, x2, r2, norm_weight, eps, weight, bias, config)
    new_res = res_out.view(x.shape) if res_out is not None else x
    return y.view(*x.shape[:-1], weight.shape[0]), new_res


def gemv_add_rms_norm_ref(x, residual, norm_weight, eps, weight, bias=None, config=None):
    from quanta.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref

    if residual is None:
        return F.linear(rms_norm_ref(x, norm_weight, eps), weight, bias), x
    h, new_res = fused_add_rms_norm_ref(x, residual, norm_weight, eps)
    return F.linear(h, weight, bias), new_res


def gemv_silu_mul(
    gu: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, config: GemvConfig | None = None
) -> torch.Tensor:
    """(SiLU(gu[..., :K]) * gu[..., K:]) @ weight^T (+ bias); gu: [..., 2K] with <= MAX_M rows, weight [N, K]."""
    k = weight.shape[1]
    assert gu.shape[-1] == 2 * k, (gu.shape, weight.shape)
    x2 = gu.reshape(-1, 2 * k)
    y, _ = _launch(PRO_SILU, x2, None, None, 0.0, weight, bias, config)
    return y.view(*gu.shape[:-1], weight.shape[0])


def gemv_silu_mul_ref(gu, weight, bias=None, config=None):
    from quanta.kernels.activation import silu_and_mul_ref

    return F.linear(silu_and_mul_ref(gu), weight, bias)
