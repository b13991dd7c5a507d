"""The fused-prologue GEMVs (kernels/gemv_fused.py) vs their twins through Triton's interpreter (CPU), and the
model-side dispatch (fast_ops.norm_linear / silu_mul_linear) on the CPU path.

TRITON_INTERPRET must be set before triton is imported, so the kernel checks run in one child process."""

from __future__ import annotations

import json
import os

import pytest
import torch

# (name, prologue, M, N, K, residual, bias, dtype, config)
CASES = [
    ("norm_m1_res_f32", "norm", 1, 37, 300, True, False, "float32", "bn4_bk128_sk1"),
    ("norm_m1_nores_bias_f32", "norm", 1, 21, 256, False, True, "float32", "bn8_bk64_sk1"),
    ("norm_m3_res_split3_f32", "norm", 3, 19, 200, True, False, "float32", "bn4_bk64_sk3"),
    ("norm_m2_res_autosplit_f32", "norm", 2, 33, 1000, True, True, "float32", "bn8_bk128_sk0"),
    ("norm_m8_res_dot_split2_f16", "norm", 8, 40, 160, True, False, "float16", "bn16_bk32_sk2_dot"),
    ("norm_m1_default_f16", "norm", 1, 48, 512, True, False, "float16", None),
    ("silu_m1_f32", "silu", 1, 37, 300, False, False, "float32", "bn4_bk128_sk1"),
    ("silu_m3_split3_bias_f32", "silu", 3, 19, 200, False, True, "float32", "bn4_bk64_sk3"),
    ("silu_m8_dot_split2_f16", "silu", 8, 40, 160, False, False, "float16", "bn16_bk32_sk2_dot"),
    ("silu_m1_default_f16", "silu", 1, 24, 768, False, False, "float16", None),
    # "_nx": the next K step's loads issued before this step's math
    ("norm_m1_res_next_f32", "norm", 1, 37, 300, True, False, "float32", "bn4_bk64_sk1_nx"),
    ("norm_m3_res_split3_next_f32", "norm", 3, 19, 200, True, True, "float32", "bn4_bk32_sk3_nx"),
    ("silu_m1_split2_next_f32", "silu", 1, 37, 300, False, True, "float32", "bn4_bk64_sk2_nx"),
    ("silu_m8_dot_next_f16", "silu", 8, 40, 160, False, False, "float16", "bn16_bk32_sk1_dot_nx"),
]


def _inputs(m, n, k, prologue, residual, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, 2 * k if prologue == "silu" else k, generator=g).to(dtype)
    r = torch.randn(m, k, generator=g).to(dtype) if residual else None
    nw = (1 + 0.1 * torch.randn(k, generator=g)).to(dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, r, nw, w, b


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def _run_all() -> dict:
    assert os.environ.get("TRITON_INTERPRET") == "1"
    from quanta.kernels.gemv import GemvConfig
    from quanta.kernels.gemv_fused import gemv_add_rms_norm, gemv_add_rms_norm_ref, gemv_silu_mul, gemv_silu_mul_ref

    results = {}
    for i, (name, pro, m, n, k, res, bias, dtype, cfg) in enumerate(CASES):
        x, r, nw, w, b = _inputs(m, n, k, pro, res, bias, getattr(torch, dtype), i)
        config = GemvConfig.parse(cfg) if cfg else None
        try:
            if pro == "norm":
                y, new_res = gemv_add_rms_norm(x, r, nw, 1e-5, w, b, config)
                y_ref, res_ref = gemv_add_rms_norm_ref(x, r, nw, 1e-5, w, b)
                results[name] = _rel(y, y_ref)
                results[name + "_residual"] = float(not torch.equal(new_res, res_ref))
            else:
                results[name] = _rel(gemv_silu_mul(x, w, b, config), gemv_silu_mul_ref(x, w, b))
        except Exception as e:  # reported per check by the parent
            results[name] = f"{type(e).__name__}: {e}"
    # a second launch with split-K must find its counters back at 0
    x, r, nw, w, b = _inputs(2, 33, 1000, "norm", True, False, torch.float32, 99)
    cfg = GemvConfig.parse("bn8_bk128_sk4")
    first = gemv_add_rms_norm(x, r, nw, 1e-5, w, b, cfg)[0]
    results["norm_relaunch_same"] = float(not torch.equal(first, gemv_add_rms_norm(x, r, nw, 1e-5, w, b, cfg)[0]))
    return results


NAMES = [c[0] for c in CASES] + [c[0] + "_residual" for c in CASES if c[1] == "norm"] + ["norm_relaunch_same"]


@pytest.fixture(scope="module")
def interpreted() -> dict:
    from .interpret import run_interpreted  # (this file also runs as the child script)

    return run_interpreted(__file__)


@pytest.mark.parametrize("name", NAMES)
def test_fused_gemv_matches_ref(interpreted: dict, name: str) -> None:
    err = interpreted.get(name, "missing")
    assert isinstance(err, float), err
    assert err < (3e-3 if "f16" in name else 1e-4), f"{name}: {err:.2e}"


def test_fast_ops_dispatch_cpu_is_unfused() -> None:
    """On the CPU path norm_linear / silu_mul_linear equal norm-then-linear exactly (no kernels)."""
    from quanta.layers import fast_ops
    from quanta.layers.linear import Linear
    from quanta.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    norm, lin, down = RMSNorm(64, 1e-6), Linear(64, 32), Linear(48, 16)
    for p, t in (
        (norm.weight, torch.randn(64, generator=g)),
        (lin.weight, torch.randn(32, 64, generator=g)),
        (down.weight, torch.randn(16, 48, generator=g)),
    ):
        p.data.copy_(t)
    x, r = torch.randn(3, 64, generator=g), torch.randn(3, 64, generator=g)
    y, res = fast_ops.norm_linear(norm, lin, x, r)
    h, res_ref = norm(x, r)
    assert torch.equal(y, lin(h)) and torch.equal(res, res_ref)
    y0, res0 = fast_ops.norm_linear(norm, lin, x, None)
    assert torch.equal(y0, lin(norm(x))) and res0 is x
    gu = torch.randn(3, 96, generator=g)
    assert torch.equal(fast_ops.silu_mul_linear(gu, down), down(fast_ops.silu_and_mul(gu)))


if __name__ == "__main__":
    print(json.dumps(_run_all()))
