"""How many KV-cache blocks fit: KvCacheConfig's fraction of free memory, capped by max_tokens."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger("quanta")


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def available_host_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def free_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    return available_host_bytes()


def num_kv_blocks(kv_config, device: torch.device, bytes_per_token: int, block_size: int,
                  max_useful_tokens: int) -> int:
    """Blocks for the cache. Call after the profiling forward so activations are accounted for."""
    budget = int(free_device_bytes(device) * kv_config.free_gpu_memory_fraction)
    if kv_config.max_gpu_total_bytes:
        budget = min(budget, kv_config.max_gpu_total_bytes)
    tokens = budget // bytes_per_token
    if kv_config.max_tokens is not None:
        tokens = min(tokens, kv_config.max_tokens)
    # NOTE: never more than every sequence at full length could use (keeps CPU tests light).
    tokens = min(tokens, max_useful_tokens)
    blocks = tokens // block_size
    if blocks < 1:
        raise RuntimeError(
            f"not enough memory for even one KV-cache block ({block_size} tokens x {bytes_per_token} B); "
            "lower max_num_tokens or raise KvCacheConfig.free_gpu_memory_fraction"
        )
    return blocks
