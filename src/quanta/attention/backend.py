"""The attention backend protocol and a small name -> backend registry with lazy imports."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    import torch

    from quanta.attention.metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Write k, v into the caches at meta.slot_mapping, then attend over the paged cache."""
        ...


# NOTE: modules are imported only when their backend is asked for, so 'torch_ref' works without triton.
_BACKEND_MODULES: dict[str, str] = {
    "torch_ref": "quanta.attention.torch_ref",
    "triton": "quanta.attention.triton_backend",
}
_REGISTRY: dict[str, type] = {}

_T = TypeVar("_T", bound=type)


def register_backend(name: str) -> Callable[[_T], _T]:
    """Class decorator: make a backend class reachable through get_backend(name)."""

    def wrap(cls: _T) -> _T:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def available_backends() -> list[str]:
    return sorted(set(_BACKEND_MODULES) | set(_REGISTRY))


def get_backend(name: str) -> AttentionBackend:
    """A fresh instance of the backend registered under `name` ('torch_ref' or 'triton')."""
    if name not in _REGISTRY:
        module = _BACKEND_MODULES.get(name)
        if module is None:
            raise ValueError(f"unknown attention backend {name!r}; known: {available_backends()}")
        importlib.import_module(module)
    return _REGISTRY[name]()
