"""Rotary position embedding, neox / Hugging Face `rotate_half` style.

With half = rotary_dim // 2 (rotary_dim = 2 * cos_cache.shape[1] <= head_dim; dims past rotary_dim are left
as they are): out[:half] = x1 * cos - x2 * sin, out[half:rotary_dim] = x2 * cos + x1 * sin, where
x1 = x[:half], x2 = x[half:rotary_dim]. Computed in float32, rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from quanta.kernels._compat import next_pow2, require_triton, tl, triton


# fmt: off
@triton.jit
def _rotate_heads(
    x_ptr, stride_h, num_heads, cos, sin, offs_d, d_mask,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    mask = (offs_h[:, None] < num_heads) & d_mask[None, :]
    ptr1 = x_ptr + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = x1 * cos[None, :] - x2 * sin[None, :]
    o2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptr1, o1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, o2.to(x_ptr.dtype.element_ty), mask=mask)
# fmt: on


# fmt: off
@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos, stride_sin,
    num_heads, num_kv_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, num_heads, cos, sin, offs_d, d_mask, HALF, BLOCK_HQ)
    _rotate_heads(k_ptr + tok * stride_kt, stride_kh, num_kv_heads, cos, sin, offs_d, d_mask, HALF, BLOCK_HK)
# fmt: on


def apply_rotary_emb(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int
    cos_cache: torch.Tensor,  # [max_position, rotary_dim // 2] float32
    sin_cache: torch.Tensor,  # [max_position, rotary_dim // 2] float32
    inplace: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k (in place by default; views such as slices of a fused qkv are fine)."""
    require_triton()
    if not inplace:
        q, k = q.clone(), k.clone()
    num_tokens, num_heads, head_dim = q.shape
    half = cos_cache.shape[-1]
    assert 2 * half <= head_dim and q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos_cache.stride(-1) == 1 and sin_cache.stride(-1) == 1
    if num_tokens > 0:
        # fmt: off
        _rotary_kernel[(num_tokens,)](
            q, k, positions, cos_cache, sin_cache,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0), sin_cache.stride(0),
            num_heads, k.shape[1],
            HALF=half,
            HALF_PAD=next_pow2(half),
            BLOCK_HQ=next_pow2(num_heads),
            BLOCK_HK=next_pow2(k.shape[1]),
            num_warps=4,
        )
        # fmt: on
    return q, k


# fmt: off
@triton.jit
def _rotary_cache_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, slot_ptr, k_cache_ptr, v_cache_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos, stride_sin,
    stride_kcb, stride_kco, stride_kch, stride_vcb, stride_vco, stride_vch,
    num_heads, num_kv_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Rotate q in place; write rotated k and v straight into the paged cache (slot < 0: padding, no write)."""
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + tok).to(tl.int64)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_sin + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + tok * stride_qt, stride_qh, num_heads, cos, sin, offs_d, d_mask, HALF, BLOCK_HQ)
    slot = tl.load(slot_ptr + tok).to(tl.int64)
    if slot >= 0:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_HK)
        mask = (offs_h[:, None] < num_kv_heads) & d_mask[None, :]
        k1p = k_ptr + tok * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
        k1 = tl.load(k1p, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k1p + HALF, mask=mask, other=0.0).to(tl.float32)
        kc = k_cache_ptr + blk * stride_kcb + off * stride_kco + offs_h[:, None] * stride_kch + offs_d[None, :]
        tl.store(kc, (k1 * cos[None, :] - k2 * sin[None, :]).to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(kc + HALF, (k2 * cos[None, :] + k1 * sin[None, :]).to(k_cache_ptr.dtype.element_ty), mask=mask)
        vp = v_ptr + tok * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
        vc = v_cache_ptr + blk * stride_vcb + off * stride_vco + offs_h[:, None] * stride_vch + offs_d[None, :]
        tl.store(vc, tl.load(vp, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(vc + HALF, tl.load(vp + HALF, mask=mask).to(v_cache_ptr.dtype.element_ty), mask=mask)
# fmt: on


def rotary_kv_cache_write(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_cache, sin_cache) -> None:
    """apply_rotary_emb on q (in place) and k, then kv_cache_write of k and v, in one kernel (full rotary only:
    2 * cos_cache.shape[1] == head_dim). Twin: apply_rotary_emb_ref + kv_cache_write_ref."""
    require_triton()
    num_tokens, num_heads, head_dim = q.shape
    half = cos_cache.shape[-1]
    assert 2 * half == head_dim and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    if num_tokens == 0:
        return
    block_size = k_cache.shape[1]
    # fmt: off
    _rotary_cache_kernel[(num_tokens,)](
        q, k, v, positions, cos_cache, sin_cache, slot_mapping, k_cache, v_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_cache.stride(0), sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_heads, k.shape[1],
        HALF=half, HALF_PAD=next_pow2(half), BLOCK_HQ=next_pow2(num_heads), BLOCK_HK=next_pow2(k.shape[1]),
        BLOCK_SIZE=block_size, num_warps=4,
    )
    # fmt: on


def _rotate_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = cos.shape[-1]
    xf = x.float()
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    cos, sin = cos[:, None, :], sin[:, None, :]  # [num_tokens, 1, half]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1).to(x.dtype)


def apply_rotary_emb_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_cache: torch.Tensor,
    sin_cache: torch.Tensor,
    inplace: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos_cache[positions].float()  # [num_tokens, half]
    sin = sin_cache[positions].float()
    q_out, k_out = _rotate_ref(q, cos, sin), _rotate_ref(k, cos, sin)
    if inplace:
        q.copy_(q_out)
        k.copy_(k_out)
        return q, k
    return q_out, k_out
