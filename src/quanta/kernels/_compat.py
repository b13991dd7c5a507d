"""Optional triton import: kernel files must import on a CPU-only install so their `*_ref` twins work."""

from __future__ import annotations

from types import SimpleNamespace

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only install: kernels are defined but can never be launched
    HAS_TRITON = False

    def _jit(fn=None, **_kwargs):
        return fn if fn is not None else (lambda f: f)

    triton = SimpleNamespace(jit=_jit)  # type: ignore[assignment]
    tl = SimpleNamespace(constexpr=None)  # type: ignore[assignment]


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("this kernel needs triton; use the *_ref twin or the 'torch_ref' backend")


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


__all__ = ["HAS_TRITON", "next_pow2", "require_triton", "tl", "triton"]
