"""Folded multi-LoRA for decode-sized batches: the shrink rides inside the base GEMM, ONE kernel expands.

A folded `LoRALinear` (lora/layers.py) keeps its base weight and every slot's A in one buffer
`w_full = [N + S * NS * R, K]` (S slots, NS shards, rank R): rows [0, N) are the base weight, then slot s,
shard i, rank r at row `N + s * NS * R + i * R + r`. ONE GEMM `y_full = x @ w_full^T` gives each token its
base output AND its shrink `x @ A^T` for every slot (at decode sizes the GEMM is weight-bandwidth bound:
the extra rows cost their bytes, ~5% at the 1B bench shape, instead of a launch). This kernel then writes

    out[t, c] = y_full[t, c] (+ bias[c]) + sum_r y_full[t, N + slot[t] * NS * R + shard(c) * R + r] * B[slot[t], c, r]

to a fresh contiguous `out [T, N]` (tokens with slot -1 are copied). B already holds the scaling.

Each program owns a column block inside ONE shard (a shard's last block is masked at its end, so any
shard size works) and ALL tokens (T <= KERNEL_MAX_ROWS), and contracts over (slot, rank) pairs:
`U [T, S*R] @ B[:, cols]^T` with U[t, (s, r)] = the token's rank value if s is its slot, else 0 (a masked
load: each token's lanes read only its own slot's R values). MAX_K_STEP pairs per step, so at the bench
shape (8 slots x rank 16) it is ONE MMA step with every load in flight at once. Every B tile is read once
per layer call, not once per token; slots without tokens (`counts`) are masked off, so cost no bytes.
fp32 accumulation.

Graph-safe: the grid depends on host shapes only; slots and counts come from the LoRAContext's persistent
device buffers. `lora_folded_ref` is the PyTorch twin (no host sync, no F.one_hot; the CPU path).
"""

from __future__ import annotations

import torch

from quanta import envs
from quanta.kernels._compat import next_pow2, require_triton, tl, triton

# Tokens per forward up to which a folded layer runs the folded path (one GEMM on w_full + lora_folded);
# above it (prefill chunks) the base GEMM on the weight view + shrink / expand reading the A view.
# NOTE: every token pays for every slot's A rows in the GEMM, and the program tile holds all tokens (at
# most KERNEL_MAX_ROWS). QUANTA_LORA_FOLD_MAX_ROWS=0 turns the folded path off (A/B benchmarks; the layers
# stay folded in memory and their prefill path is unchanged).
KERNEL_MAX_ROWS = 64
_FOLD_ROWS_ENV = envs.get("QUANTA_LORA_FOLD_MAX_ROWS")  # -1: KERNEL_MAX_ROWS
FOLD_MAX_ROWS = KERNEL_MAX_ROWS if _FOLD_ROWS_ENV < 0 else min(KERNEL_MAX_ROWS, _FOLD_ROWS_ENV)


MAX_K_STEP = 128  # (slot, rank) pairs per contraction step: 8 slots of rank 16 in one step


def fold_block_n(n: int) -> int:
    """Columns per program: about 128 programs over N (about a wave on an H100 / H200), 32 or 64 columns
    (a [64, 128] B tile plus a [64 tokens, 128] rank tile stay in registers at 4 warps)."""
    return min(64, max(32, next_pow2(-(-n // 128))))


# fmt: off
@triton.jit
def _lora_folded_kernel(
    yf_ptr, b_ptr, bias_ptr, out_ptr, slots_ptr, counts_ptr,
    T, N, R, NUM_SLOTS, SPLIT1, SPLIT2, stride_yf, stride_bs, stride_bn, stride_out,
    NS_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    SLOTS_PER_STEP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (column blocks,). Shards: [0, SPLIT1), [SPLIT1, SPLIT2), [SPLIT2, N) (SPLIT1 = SPLIT2 = N for one
    # shard); each shard has cdiv(size, BLOCK_N) blocks, the last one masked at the shard's end.
    pid = tl.program_id(0)
    t0 = tl.cdiv(SPLIT1, BLOCK_N)
    t1 = tl.cdiv(SPLIT2 - SPLIT1, BLOCK_N)
    s1 = (pid >= t0).to(tl.int32)
    s2 = (pid >= t0 + t1).to(tl.int32)
    shard = s1 + s2
    col_end = SPLIT1 + s1 * (SPLIT2 - SPLIT1) + s2 * (N - SPLIT2)
    col0 = s1 * SPLIT1 + s2 * (SPLIT2 - SPLIT1) + (pid - s1 * t0 - s2 * t1) * BLOCK_N

    offs_m = tl.arange(0, BLOCK_M)
    mask_m = offs_m < T
    tok_slot = tl.load(slots_ptr + offs_m, mask=mask_m, other=-1)  # -1 (and padding): matches no slot
    offs_n = col0 + tl.arange(0, BLOCK_N)
    mask_n = offs_n < col_end
    # the contraction runs over (slot, rank) pairs, SLOTS_PER_STEP slots of BLOCK_R ranks per step (one
    # step at the bench shape: all loads issued at once): k -> slot k // BLOCK_R, rank k % BLOCK_R
    offs_k = tl.arange(0, SLOTS_PER_STEP * BLOCK_R)
    k_slot = offs_k // BLOCK_R
    k_r = offs_k % BLOCK_R
    y_rows = yf_ptr + offs_m.to(tl.int64)[:, None] * stride_yf
    u_base = y_rows + N + shard * R + k_r[None, :]  # this shard's rank columns, slot 0
    b_base = b_ptr + offs_n[:, None] * stride_bn + k_r[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, NUM_SLOTS, SLOTS_PER_STEP):
        ks = s0 + k_slot
        valid = (k_r < R) & (ks < NUM_SLOTS)
        valid = valid & (tl.load(counts_ptr + ks, mask=valid, other=0) > 0)  # slots without tokens: no bytes
        mine = (tok_slot[:, None] == ks[None, :]) & valid[None, :]  # [M, K]: the token's own slot only
        u = tl.load(u_base + (ks * NS_R)[None, :], mask=mine, other=0.0)
        bt = tl.load(b_base + ks.to(tl.int64)[None, :] * stride_bs, mask=mask_n[:, None] & valid[None, :],
                     other=0.0)  # [N, K]
        if IEEE:  # float32 weights: no TF32 rounding
            acc += tl.dot(u.to(bt.dtype), tl.trans(bt), input_precision="ieee")
        else:
            acc += tl.dot(u.to(bt.dtype), tl.trans(bt))
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_rows + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
    tl.store(out_ptrs, (y + acc).to(out_ptr.dtype.element_ty), mask=mask)
# fmt: on


def _check(y_full: torch.Tensor, b: torch.Tensor, n: int, splits: tuple[int, ...]) -> tuple[int, int, int]:
    num_slots, o, r = b.shape
    ns = len(splits) + 1
    assert o == n and len(splits) <= 2, (o, n, splits)
    assert y_full.dim() == 2 and y_full.shape[1] == n + num_slots * ns * r, (tuple(y_full.shape), n, num_slots, ns, r)
    return num_slots, ns, r


def lora_folded(
    y_full: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    counts: torch.Tensor,
    n: int,
    splits: tuple[int, ...] = (),
    bias: torch.Tensor | None = None,
    block_n: int | None = None,
) -> torch.Tensor:
    """out [T, n] = y_full[:, :n] (+ bias) + per token its slot's rank columns of y_full @ b[slot]^T.

    y_full: [T, n + S * NS * R] (x @ w_full^T); b: [S, n, R] (scaling folded in); slots: [>= T] int32 device
    buffer (-1 = no adapter; only the first T read); counts: [S] tokens per slot (slots with none are
    skipped); `splits`: output offsets where shards 1, 2 begin. T <= KERNEL_MAX_ROWS."""
    require_triton()
    num_slots, ns, r = _check(y_full, b, n, splits)
    num_tokens = y_full.shape[0]
    assert num_tokens <= KERNEL_MAX_ROWS, num_tokens
    assert y_full.stride(1) == 1 and b.stride(2) == 1 and slots.dtype == torch.int32
    out = torch.empty(num_tokens, n, dtype=y_full.dtype, device=y_full.device)
    if num_tokens == 0 or n == 0:
        return out
    bn = block_n or fold_block_n(n)
    bounds = list(zip((0, *splits), (*splits, n)))
    s1, s2 = (*splits, n, n)[:2]
    br = max(16, next_pow2(r))
    per_step = max(1, min(next_pow2(num_slots), MAX_K_STEP // br))
    grid = (sum(triton.cdiv(c1 - c0, bn) for c0, c1 in bounds),)
    _lora_folded_kernel[grid](
        y_full,
        b,
        bias if bias is not None else y_full,
        out,
        slots,
        counts,
        num_tokens,
        n,
        r,
        num_slots,
        s1,
        s2,
        y_full.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        NS_R=ns * r,
        BLOCK_M=max(16, next_pow2(num_tokens)),
        BLOCK_N=bn,
        BLOCK_R=br,
        SLOTS_PER_STEP=per_step,
        HAS_BIAS=bias is not None,
        IEEE=y_full.dtype == torch.float32,
        num_warps=4,
    )
    return out


def lora_folded_ref(
    y_full: torch.Tensor,
    b: torch.Tensor,
    slots: torch.Tensor,
    n: int,
    splits: tuple[int, ...] = (),
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Twin of lora_folded (any T): each token's rank vectors for every slot, zeroed outside its own slot
    (a comparison, not F.one_hot: no host sync, CUDA-graph safe), contracted with every slot's B. fp32."""
    num_slots, ns, r = _check(y_full, b, n, splits)
    num_tokens = y_full.shape[0]
    mine = (slots[:num_tokens].long().unsqueeze(1) == torch.arange(num_slots, device=y_full.device)).unsqueeze(2)
    ext = y_full[:, n:].reshape(num_tokens, num_slots, ns, r).float()  # [T, S, NS, R]
    out = y_full[:, :n].to(torch.float32, copy=True)
    if bias is not None:
        out += bias.float()
    zero = torch.zeros((), dtype=torch.float32, device=y_full.device)
    for shard, (c0, c1) in enumerate(zip((0, *splits), (*splits, n))):
        spread = torch.where(mine, ext[:, :, shard], zero)  # [T, S, R]: the token's own slot only
        out[:, c0:c1] += torch.einsum("tsr,sor->to", spread, b[:, c0:c1].float())
    return out.to(y_full.dtype)
