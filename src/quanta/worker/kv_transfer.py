"""KV block moves the KV manager asks for, done by the model runner before a step's forward: swaps between
the device cache and the host tier (evicted reusable blocks), and block copies (copy-on-write).

Order matters and is fixed: swap-out, swap-in, copy (KVCacheManager.take_transfers says why).
"""

from __future__ import annotations

import torch

KVPair = tuple[torch.Tensor, torch.Tensor]  # k, v: [num_blocks, block_size, num_kv_heads, head_dim]


def allocate_host_cache(kv_caches: list[KVPair], num_blocks: int) -> list[KVPair]:
    """The host tier: one k/v pair per layer shaped like the device cache; pinned when the cache is on a GPU."""
    out = []
    for k, v in kv_caches:
        shape = (num_blocks, *k.shape[1:])
        pin = k.device.type == "cuda"
        # NOTE: on a CPU, empty() maps pages lazily: an unused host tier costs nothing.
        out.append((torch.empty(shape, dtype=k.dtype, pin_memory=pin), torch.empty(shape, dtype=v.dtype, pin_memory=pin)))
    return out


def transfer_blocks(kv_caches: list[KVPair], host_caches: list[KVPair], swap_out: list[tuple[int, int]],
                    swap_in: list[tuple[int, int]], copies: list[tuple[int, int]]) -> None:
    """swap_out: (device block, host slot); swap_in: (host slot, device block); copies: (src, dst) on device."""
    if not kv_caches:
        return
    device = kv_caches[0][0].device
    if swap_out:
        src = torch.tensor([b for b, _ in swap_out], device=device)
        dst = torch.tensor([s for _, s in swap_out])
        for (k, v), (hk, hv) in zip(kv_caches, host_caches):
            hk.index_copy_(0, dst, k.index_select(0, src).to("cpu"))
            hv.index_copy_(0, dst, v.index_select(0, src).to("cpu"))
    if swap_in:
        src = torch.tensor([s for s, _ in swap_in])
        dst = torch.tensor([b for _, b in swap_in], device=device)
        for (k, v), (hk, hv) in zip(kv_caches, host_caches):
            k.index_copy_(0, dst, hk.index_select(0, src).to(device, non_blocking=True))
            v.index_copy_(0, dst, hv.index_select(0, src).to(device, non_blocking=True))
    if copies:
        src = torch.tensor([s for s, _ in copies], device=device)
        dst = torch.tensor([d for _, d in copies], device=device)
        for k, v in kv_caches:
            k.index_copy_(0, dst, k.index_select(0, src))
            v.index_copy_(0, dst, v.index_select(0, src))
