"""Weight-only int linears at many rows (prefill, large decode batches): dequantize the weight once, then cuBLAS.

The int tl.dot GEMM (w_int_kernel._w_int_gemm_kernel) measured ~8x slower than the bf16 engine on an H100 at 64
requests of 128 / 128 (benchmarks/results/h100_s4_bench_quant.json: 934 vs 7,268 output tok/s) and 4x in batch-1
prefill (TTFT 65 vs 15.5 ms). At M >= DEQUANT_MIN_ROWS a linear instead runs one Triton kernel that writes the
dequantized weight [N, K] in x.dtype (reads 0.5 / 1 byte a weight, writes 2) and F.linear on it: the weight costs
~2.5 bytes a weight of memory traffic more than a bf16 linear, and the matmul runs at cuBLAS speed. The buffer is
transient (the caching allocator's, or the CUDA graph pool's).

Numerics equal `dequantize_groups` (int_quant.py): (q - z) is exact, times the scale rounded once to x.dtype.
Env QUANTA_INT_DEQUANT_MIN_ROWS (default 64; 0 = never) sets the row count from which it is used.
"""

from __future__ import annotations

import torch

from quanta import envs
from quanta.kernels._compat import require_triton, tl, triton

DEQUANT_MIN_ROWS = envs.get("QUANTA_INT_DEQUANT_MIN_ROWS")


# fmt: off
@triton.jit
def _w_int_dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K,
    stride_wn, stride_sn, stride_zn, stride_on,
    GROUP: tl.constexpr, BITS: tl.constexpr, HAS_ZERO: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (pid_n, pid_k): out[rows, ks] = (q - z) * s for a [BLOCK_N, BLOCK_K] tile (int4: the byte of k is
    k // 2, its low nibble for even k)."""
    offs_n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if BITS == 4:
        byte = tl.load(w_ptr + offs_n[:, None] * stride_wn + (offs_k // 2)[None, :], mask=mask, other=0)
        q = (byte.to(tl.int32) >> ((offs_k % 2) * 4)[None, :]) & 0xF
    else:
        q = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    g = (offs_k // GROUP)[None, :]
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g, mask=mask, other=0.0)
    s = s.to(out_ptr.dtype.element_ty).to(tl.float32)  # the scale in the output dtype, as the twin rounds it
    if HAS_ZERO:
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g, mask=mask, other=0).to(tl.float32)
    else:
        z = tl.full((BLOCK_N, BLOCK_K), 2 ** (BITS - 1), tl.float32)
    w = (q.to(tl.float32) - z) * s
    tl.store(out_ptr + offs_n[:, None] * stride_on + offs_k[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on


def w_int_dequant(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                  group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, K_pad * bits / 8] packed (+ scales / zeros [N, G]) -> W [N, in_features] in `dtype` (Triton)."""
    require_triton()
    n, k = packed.shape[0], in_features
    out = torch.empty(n, k, dtype=dtype, device=packed.device)
    if n == 0 or k == 0:
        return out
    block_n, block_k = 16, 256
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    # fmt: off
    _w_int_dequant_kernel[grid](
        packed, scale, zero if zero is not None else scale, out, n, k,
        packed.stride(0), scale.stride(0), zero.stride(0) if zero is not None else 0, out.stride(0),
        GROUP=group_size, BITS=bits, HAS_ZERO=zero is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    # fmt: on
    return out
