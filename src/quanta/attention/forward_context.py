"""Per-step attention metadata reaches the layers through one scoped context, so model files keep
`forward(input_ids, positions)` signatures."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quanta.attention.backend import AttentionBackend
    from quanta.attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    meta: AttentionMetadata
    backend: AttentionBackend


_CONTEXT: ForwardContext | None = None


def get_forward_context() -> ForwardContext:
    if _CONTEXT is None:
        raise RuntimeError("attention called outside of a model runner step (no forward context set)")
    return _CONTEXT


@contextmanager
def forward_context(meta: AttentionMetadata, backend: AttentionBackend):
    global _CONTEXT
    prev, _CONTEXT = _CONTEXT, ForwardContext(meta, backend)
    try:
        yield
    finally:
        _CONTEXT = prev
