"""Zeroed int32 counter buffers for kernels whose last-arriving program finishes the work (split-K GEMV
epilogue, split decode attention merge): one buffer per (user, device), zeroed once when allocated and left
at 0 by every launch, so no memset runs per launch and CUDA-graph replays find them ready."""

from __future__ import annotations

import torch

_COUNTERS: dict[tuple[str, str, int | None], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []  # grown-out buffers stay alive: captured graphs may still point at them


def zeroed_counters(user: str, device: torch.device, n: int) -> torch.Tensor | None:
    """>= n zeroed int32 counters for `user` on `device`; None during CUDA-graph capture when the buffer would
    have to grow (the caller then runs without splitting; the eager warm-up before capture allocates it)."""
    key = (user, device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[key] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return buf
