"""kernels/gemv.py gemv_residual_norm (the skinny GEMV ending with the residual add and, in its last program, the
RMSNorm: QUANTA_GEMV_ADD_NORM) vs its twin (GEMV, then fused_add_rms_norm) through Triton's interpreter (CPU).

TRITON_INTERPRET must be set before triton is imported, so the kernel checks run in one child process."""

from __future__ import annotations

import json
import os

import pytest
import torch

# (name, M, N, K, bias, dtype, config): N past one norm chunk (1024) and not a multiple of block_n
CASES = [
    ("m1_f32", 1, 37, 300, False, "float32", "bn4_bk128_sk1"),
    ("m1_bias_f32", 1, 21, 256, True, "float32", "bn8_bk64_sk3"),  # split-K asked: the tail runs unsplit
    ("m1_two_chunks_f32", 1, 1500, 96, False, "float32", "bn16_bk64_sk1"),
    ("m3_f32", 3, 19, 200, True, "float32", "bn4_bk64_sk1"),
    ("m1_default_f16", 1, 48, 512, False, "float16", None),
]


def _inputs(m, n, k, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype)
    nw = (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, r, nw, b


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def _run_all() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from quanta.kernels.gemv import GemvConfig, gemv_residual_norm, gemv_residual_norm_ref

    results = {}
    for i, (name, m, n, k, bias, dtype, cfg) in enumerate(CASES):
        x, w, r, nw, b = _inputs(m, n, k, bias, getattr(torch, dtype), i)
        config = GemvConfig.parse(cfg) if cfg else None
        try:
            for rep in range(2):  # the second launch finds the counter back at 0
                xw, h = gemv_residual_norm(x, w, r, nw, 1e-5, b, config)
                xw_ref, h_ref = gemv_residual_norm_ref(x, w, r, nw, 1e-5, b, config)
                results[f"{name}_{rep}"] = _rel(xw, xw_ref)
                results[f"{name}_{rep}_h"] = _rel(h, h_ref)
        except Exception as e:  # reported per check by the parent
            results[f"{name}_0"] = f"{type(e).__name__}: {e}"
    return results


NAMES = [f"{c[0]}_{rep}{h}" for c in CASES for rep in (0, 1) for h in ("", "_h")]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpret import run_interpreted  # (this file also runs as the child script)

    return run_interpreted(__file__)


@pytest.mark.parametrize("name", NAMES)
def test_gemv_residual_norm_matches_ref(interpreted: dict, name: str) -> None:
    err = interpreted.get(name, "missing")
    assert isinstance(err, float), err
    assert err < (4e-3 if "f16" in name else 1e-4), f"{name}: {err:.2e}"


def test_dispatch_cpu_unchanged(monkeypatch) -> None:
    """On the CPU path (no kernels) linear_add_norm keeps the plain linear even with QUANTA_GEMV_ADD_NORM on."""
    from quanta.layers import fast_ops
    from quanta.layers.linear import Linear
    from quanta.layers.norm import RMSNorm

    monkeypatch.setattr(fast_ops, "GEMV_ADD_NORM", True)
    g = torch.Generator().manual_seed(0)
    o, gate_up, norm = Linear(32, 64), Linear(64, 96), RMSNorm(64, 1e-6)
    o.weight.data.copy_(torch.randn(64, 32, generator=g))
    x, r = torch.randn(1, 32, generator=g), torch.randn(1, 64, generator=g)
    y, res = fast_ops.linear_add_norm(o, x, r, norm, gate_up, silu=True)
    assert not isinstance(y, fast_ops.Normed) and torch.equal(y, o(x)) and res is r


if __name__ == "__main__":
    print(json.dumps(_run_all()))
