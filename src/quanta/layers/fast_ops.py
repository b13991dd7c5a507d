"""Dispatch for the small fused ops: Triton kernels on CUDA, PyTorch references elsewhere.

The choice is made once per process (`set_use_kernels`); model code calls these functions only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quanta import envs
from quanta.layers.linear import Linear, MergedLinear
from quanta.layers.norm import RMSNorm, rms_norm_ref

_USE_KERNELS = False
# Batch-1 decode (<= this many rows) runs norm -> linear and SiLU -> linear as one fused GEMV (kernels/gemv_fused.py)
# when the linear is a plain bf16 / fp16 one; 0 turns the fusion off. H200, 1B shapes: at M=1 the fused GEMVs win
# (1.076 vs 1.130 ms/step); at M=4 they are ~2x slower than norm kernel + cuBLAS.
FUSED_GEMV_MAX_ROWS = envs.get("QUANTA_FUSED_GEMV_ROWS")
# ... for weights up to these sizes (measured on the 1B shapes: the fused GEMV wins on small projections, cuBLAS
# keeps the large gate_up one).
FUSED_NORM_MAX_BYTES = envs.get("QUANTA_FUSED_NORM_MAX_MB") << 20
FUSED_SILU_MAX_BYTES = envs.get("QUANTA_FUSED_SILU_MAX_MB") << 20
# Plain projections with no op to fuse (o_proj) of up to this size run on the skinny GEMV (kernels/gemv.py) instead
# of cuBLAS at batch 1 where PDL is on (kernels/pdl.py): their first weights load while the kernel before runs. H200,
# batch 1 with PDL (benchmarks/results/h200_s8*, h200_s9a_*): 1B o_proj 1,026.7 / 1,024.0 tok/s vs 998.1 on cuBLAS;
# 8B qkv (48 MiB, after the unfused norm: `norm_linear`) and o_proj 225.8 vs 220.1 (64 MiB, same call); the 1B
# gate_up (64 MiB) stays on cuBLAS (1,013.1 vs 1,025.5; on the bn4_bk2048 config 1,079.1 vs 1,116.3, bn8_bk2048_w8
# 866.8: h200_s13a_*). Without PDL the GEMV lost (H100: 763.9 vs 778.4), so it follows PDL. Env
# QUANTA_GEMV_LINEAR_MB sets it either way (0 = cuBLAS).
GEMV_LINEAR_PDL_BYTES = 48 << 20
GEMV_LINEAR_MAX_BYTES = envs.get("QUANTA_GEMV_LINEAR_MB") << 20
# The batch-1 lm_head on the skinny GEMV (bn2_bk1024) instead of cuBLAS: 182.9 vs 197.0 us for the 1B lm_head and
# 347.7 vs 380.9 for the 8B one in bench_gemv (H100, cold weights); off until measured in the engine.
GEMV_LMHEAD = envs.get("QUANTA_GEMV_LMHEAD")


# One-row int4 decode: the residual add + RMSNorm between o_proj and gate_up_proj, and between down_proj and the next
# layer's qkv_proj, split across the two GEMVs (kernels/split_norm.py): no norm launch between them. OFF (env
# QUANTA_SPLIT_NORM=1 turns it on): H200, 8B W4A16_AWQ batch 1, 470.0 / 469.5 tok/s vs 474.2 / 474.3 without
# (benchmarks/results/h200_s12d_*). Without PDL it gains (time line: 2.224 vs 2.258 ms a step, 63 of 65 norm launches
# gone) but the consumers lose it: the qkv GEMV reading 512 partials per program took 8.78 us vs 6.71 (h200_s12c_tl).
# With the producer triggering its consumer's launch at its start (447 tok/s), the consumer's waiting programs sat
# beside the producer's K loops: the producer now triggers after its K loop.
# The same for one 16-bit row (post_attention_layernorm: o_proj's skinny GEMV ending with h and h * w, cuBLAS gate_up
# on h * w, the SiLU GEMV scaling by the inverse RMS; a488b65 / 3c0e2fd, reverted): H200, 1B batch 1, 1,089.8 /
# 1,090.0 tok/s (partials after the wait) and 1,080.5 / 1,098.8 (RMS from h before the wait) vs 1,118.7-1,122.2
# (h200_s14f_*, h200_s14i_*); PDL off it gained (1,006 vs 980): under PDL the norm launch is mostly hidden.
SPLIT_NORM = envs.get("QUANTA_SPLIT_NORM")


@dataclass
class Prenormed:
    """A linear's output that its GEMV already added to the residual, half-normed for the next GEMV
    (kernels/split_norm.py): xw = h * norm.weight [1, K] (x planes of chunk `sub` for the asm GEMV, plain for 0),
    parts the fp32 partial sums of h^2 (one a producer program)."""

    xw: torch.Tensor
    parts: torch.Tensor
    eps: float
    sub: int

    @property
    def inv(self) -> tuple:
        return self.parts, self.eps


def set_use_kernels(flag: bool) -> None:
    global _USE_KERNELS
    _USE_KERNELS = flag


def use_kernels() -> bool:
    return _USE_KERNELS


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _USE_KERNELS and x.is_cuda:
        from quanta.kernels.rms_norm import rms_norm as k

        return k(x, weight, eps)
    return rms_norm_ref(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _USE_KERNELS and x.is_cuda:
        from quanta.kernels.rms_norm import fused_add_rms_norm as k

        return k(x, residual, weight, eps)
    residual = x + residual
    return rms_norm_ref(residual, weight, eps), residual


def greedy_sample(logits: torch.Tensor, handoff=None) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, vocab] -> (argmax ids [R] int64, their log-probabilities [R] float32); handoff: the CUDA-graph token
    hand-over of kernels/greedy.py (kernel path only)."""
    if _USE_KERNELS and logits.is_cuda:
        from quanta.kernels.greedy import greedy_sample_fused

        return greedy_sample_fused(logits, handoff)
    if handoff is not None:
        raise ValueError("greedy_sample: handoff needs the CUDA kernels")
    from quanta.sampling.sampler import greedy_sample as ref

    return ref(logits.float())


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    if _USE_KERNELS and x.is_cuda:
        from quanta.kernels.activation import silu_and_mul as k

        return k(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _fusable(linear, x: torch.Tensor, max_bytes: int) -> bool:
    """A plain (unquantized, un-wrapped) linear of <= max_bytes on a CUDA half-precision batch of
    <= FUSED_GEMV_MAX_ROWS rows."""
    return (
        _USE_KERNELS
        and x.is_cuda
        and type(linear) in (Linear, MergedLinear)
        and linear.quant_method is None
        and x.dtype in (torch.bfloat16, torch.float16)
        and linear.weight.dtype == x.dtype
        and x.numel() // x.shape[-1] <= FUSED_GEMV_MAX_ROWS
        and linear.weight.numel() * linear.weight.element_size() <= max_bytes
    )


def norm_linear(norm, linear, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(norm(x + residual)), x + residual); without a residual (linear(norm(x)), x). `norm` is an RMSNorm.
    x may be a Prenormed (linear_add_norm chose `linear` as its consumer): residual is then x + residual already."""
    if isinstance(x, Prenormed):
        return linear.quant_method.apply_planes(linear, x.xw, x.xw, inv=x.inv), residual
    if _fusable(linear, x, FUSED_NORM_MAX_BYTES):
        from quanta.kernels.gemv_fused import gemv_add_rms_norm

        return gemv_add_rms_norm(x, residual, norm.weight, norm.eps, linear.weight, linear.bias)
    if residual is None:
        return linear(norm(x)), x
    sub = _planes_sub(linear, x)
    if sub:  # the one-row int4 asm GEMV reads the norm's output as x_planes, written by the same norm launch
        from quanta.kernels.rms_norm import fused_add_rms_norm_planes

        h, residual, planes = fused_add_rms_norm_planes(x, residual, norm.weight, norm.eps, sub)
        return linear.quant_method.apply_planes(linear, h, planes), residual
    group = _frag_group(linear, x)
    if group:  # the int4 mma GEMV reads the norm's output in fragment order, written by the same norm launch
        from quanta.kernels.rms_norm import fused_add_rms_norm_frag

        h, residual, xf = fused_add_rms_norm_frag(x, residual, norm.weight, norm.eps, group)
        return linear.quant_method.apply_frag(linear, h, xf), residual
    h, residual = norm(x, residual)
    return decode_linear(linear, h), residual


def norm_mlp(norm, mlp, x: torch.Tensor, residual: torch.Tensor | None, nxt=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mlp(norm(x + residual)), x + residual) for a SwiGLU `mlp` (gate_up_proj, down_proj, down(gate_up)). int4
    gate_up on the tensor-core GEMV (w_int_mma.py, QUANTA_INT_MMA_SILU_ROWS rows) computes SiLU(gate) * up in its
    epilogue; else one int4 row on the asm GEMV: the norm writes x planes, the asm GEMV's epilogue does (no
    silu_and_mul launch either way). x may be a Prenormed (linear_add_norm); on those int4 paths down_proj may
    itself end with the next decoder layer `nxt`'s residual add and split norm (then the result is a Prenormed)."""
    gate_up = mlp.gate_up_proj
    method = getattr(gate_up, "quant_method", None)
    if isinstance(x, Prenormed):
        act = (method.apply_silu(gate_up, x.xw, inv=x.inv) if x.sub == 0
               else method.apply_planes_silu(gate_up, x.xw, x.xw, inv=x.inv))
        return _down(mlp, act, residual, nxt)
    if (residual is not None and _USE_KERNELS and x.is_cuda and type(gate_up) in (Linear, MergedLinear)
            and hasattr(method, "mma_silu") and method.mma_silu(gate_up, x)):  # int4 on the tensor-core GEMV
        h, residual = norm(x, residual)
        return _down(mlp, method.apply_silu(gate_up, h), residual, nxt)
    sub = _planes_sub(gate_up, x) if residual is not None else 0
    if sub and hasattr(gate_up.quant_method, "apply_planes_silu"):
        from quanta.kernels.rms_norm import fused_add_rms_norm_planes

        h, new_residual, planes = fused_add_rms_norm_planes(x, residual, norm.weight, norm.eps, sub)
        act = gate_up.quant_method.apply_planes_silu(gate_up, h, planes)
        if act is not None:
            return _down(mlp, act, new_residual, nxt)
        return mlp.down(gate_up.quant_method.apply_planes(gate_up, h, planes)), new_residual
    gate_up_out, residual = norm_linear(norm, gate_up, x, residual)
    return mlp.down(gate_up_out), residual


def _down(mlp, act: torch.Tensor, residual: torch.Tensor, nxt) -> tuple:
    """(down_proj(act), residual), or with the next layer's input norm split into down_proj's GEMV (linear_add_norm)."""
    if nxt is None:
        return mlp.down_proj(act), residual
    return linear_add_norm(mlp.down_proj, act, residual, nxt.input_layernorm, nxt.self_attn.qkv_proj, silu=False,
                           fallback=mlp.down_proj)


def _consumer_sub(linear, like: torch.Tensor, silu: bool) -> int | None:
    """The xw layout `linear` takes as a split norm's consumer for one row like `like` (as the unfused path would
    pick its kernel): 0 plain (gate_up on the mma SiLU GEMV), a planes chunk (the asm GEMV), None (it cannot)."""
    method = getattr(linear, "quant_method", None)
    if not (_USE_KERNELS and like.is_cuda and like.numel() == like.shape[-1]
            and type(linear) in (Linear, MergedLinear) and hasattr(method, "planes_sub")):
        return None
    if silu and getattr(linear, "pre_quant_scale", None) is None and method.mma_silu(linear, like):
        return 0
    sub = method.planes_sub(linear, like)
    return sub if sub and (not silu or method.planes_silu_ok(linear)) else None


def linear_add_norm(linear, x: torch.Tensor, residual: torch.Tensor | None, norm, consumer, silu: bool,
                    fallback=None) -> tuple:
    """(Prenormed for `consumer`, x' + residual) where `linear`'s one-row GEMV can end with the residual add and
    the producer half of `norm` (kernels/split_norm.py; consumer: the linear after the norm, SiLU-and-mul'd for
    silu); else (fallback(x) (default decode_linear(linear, x)), residual) as before."""
    method = getattr(linear, "quant_method", None)
    if (SPLIT_NORM and residual is not None and type(norm) is RMSNorm and type(linear) in (Linear, MergedLinear)
            and hasattr(method, "split_norm_producer") and residual.numel() == linear.out_features):
        sub = _consumer_sub(consumer, residual, silu)
        if sub is not None and method.split_norm_producer(linear, x):
            h, xw, parts = method.apply_add_norm(linear, x, residual, norm.weight, sub)
            return Prenormed(xw, parts, norm.eps, sub), h
    return (fallback(x) if fallback is not None else decode_linear(linear, x)), residual


def _ask_method(linear, x: torch.Tensor, query: str) -> int:
    """linear.quant_method.<query>(linear, x) for a plain (un-wrapped) linear on CUDA kernels, else 0."""
    method = getattr(linear, "quant_method", None)
    if not (_USE_KERNELS and x.is_cuda and type(linear) in (Linear, MergedLinear) and hasattr(method, query)):
        return 0
    return getattr(method, query)(linear, x)


def _frag_group(linear, x: torch.Tensor) -> int:
    """The group of x_frag the linear's int4 mma GEMV reads for x (QUANTA_INT_MMA_XF_ROWS), or 0."""
    return _ask_method(linear, x, "frag_group")


def _planes_sub(linear, x: torch.Tensor) -> int:
    return _ask_method(linear, x, "planes_sub")


def decode_linear(linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x); a small plain projection at batch 1 may run on the skinny GEMV (GEMV_LINEAR_MAX_BYTES)."""
    max_bytes = GEMV_LINEAR_MAX_BYTES
    if max_bytes < 0:  # unset: on with PDL
        from quanta.kernels.pdl import pdl_enabled

        max_bytes = GEMV_LINEAR_PDL_BYTES if x.is_cuda and pdl_enabled(x.device) else 0
    if max_bytes and _fusable(linear, x, max_bytes):
        from quanta.kernels.gemv import gemv

        return gemv(x, linear.weight, linear.bias)
    return linear(x)


def silu_mul_linear(gate_up: torch.Tensor, linear) -> torch.Tensor:
    """linear(SiLU(gate) * up) for gate_up = gate | up."""
    if _fusable(linear, gate_up, FUSED_SILU_MAX_BYTES):
        from quanta.kernels.gemv_fused import gemv_silu_mul

        return gemv_silu_mul(gate_up, linear.weight, linear.bias)
    group = _frag_group(linear, gate_up[..., : gate_up.shape[-1] // 2])
    if group:  # the int4 mma GEMV reads the product in fragment order, written by the same launch
        from quanta.kernels.activation import silu_and_mul as silu_and_mul_kernel

        act, xf = silu_and_mul_kernel(gate_up, group)
        return linear.quant_method.apply_frag(linear, act, xf)
    return linear(silu_and_mul(gate_up))


def lm_head_linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden @ weight^T for the logits; one half-precision row on CUDA may take the skinny GEMV (GEMV_LMHEAD)."""
    if (
        GEMV_LMHEAD
        and _USE_KERNELS
        and hidden.is_cuda
        and hidden.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == hidden.dtype
        and hidden.numel() == hidden.shape[-1]
    ):
        from quanta.kernels.gemv import GemvConfig, gemv

        return gemv(hidden, weight, None, GemvConfig(block_n=2, block_k=1024))
    return F.linear(hidden, weight)
