"""Decode GEMV kernels (bf16 and W4A16 / W8A16) vs their references on CUDA, Llama shapes (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
pytest.importorskip("triton")

from quanta.kernels.gemv import (  # noqa: E402
    GemvConfig,
    candidate_configs,
    fast_linear,
    gemv,
    gemv_ref,
    set_linear_choice,
    tune_linear_shapes,
)
from quanta.quantization.w_int_kernel import w_int_gemv, w_int_linear, w_int_linear_ref  # noqa: E402

# (N, K): Llama-3.2-1B and Llama-3.1-8B qkv / o / gate_up / down / lm_head
SHAPES = [(2048, 2048), (3072, 2048), (16384, 2048), (2048, 8192), (6144, 4096), (28672, 4096), (4096, 14336),
          (128256, 2048), (1000, 3000)]
MS = [1, 2, 3, 8, 16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


def _x_w(m, n, k, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).to(dtype)
    return x, w


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_bf16(shape, m) -> None:
    n, k = shape
    x, w = _x_w(m, n, k)
    b = torch.randn(n, device="cuda").bfloat16()
    ref = gemv_ref(x.float(), w.float(), b.float())
    assert rel_err(gemv(x, w, b), ref) < 1e-2


@pytest.mark.parametrize("m", [1, 4, 16])
def test_gemv_candidates_and_splits(m) -> None:
    """Every candidate config, plus forced split-K (many splits, ragged K) on one shape."""
    n, k = 3072, 2048 + 96
    x, w = _x_w(m, n, k, seed=1)
    ref = gemv_ref(x.float(), w.float())
    cfgs = candidate_configs("w16", m, n, k) + [GemvConfig(4, 256, 7), GemvConfig(8, 128, 16, 8, 4),
                                                GemvConfig(32, 256, 5, use_dot=True)]
    for cfg in cfgs:
        assert rel_err(gemv(x, w, None, cfg), ref) < 1e-2, str(cfg)
    for dtype in (torch.float16, torch.float32):
        assert rel_err(gemv(x.to(dtype), w.to(dtype), None, GemvConfig(4, 256, 3)), ref) < 1e-2


def _int_case(m, n, k, bits, group, zp, dtype=torch.bfloat16, seed=0):
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups

    x, w = _x_w(m, n, k, dtype, seed)
    s, z = group_qparams(w.float(), bits, group, zp, dtype)
    q = quantize_groups(w.float(), s, z, bits, group)
    return x, (pack_int4(q) if bits == 4 else q).contiguous(), s, z


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("shape", SHAPES[:7], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bits,group,zp", [(4, 128, False), (4, 32, True), (8, 0, False)], ids=["w4g128", "w4g32zp", "w8pc"])
def test_w_int_gemv(shape, m, bits, group, zp) -> None:
    n, k = shape
    group = group or k  # 0 = per channel (W8A16)
    x, p, s, z = _int_case(m, n, k, bits, group, zp)
    b = torch.randn(n, device="cuda").bfloat16()
    ref = w_int_linear_ref(x.float(), p, s.float(), z, bits, group, k, b.float())
    assert rel_err(w_int_linear(x, p, s, z, bits, group, k, b), ref) < 1e-2


@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits,group,zp", [(4, 64, True), (8, 128, True), (4, 128, False)])
def test_w_int_gemv_candidates(m, bits, group, zp) -> None:
    n, k = 2048 + 40, 4096
    x, p, s, z = _int_case(m, n, k, bits, group, zp, seed=2)
    ref = w_int_linear_ref(x.float(), p, s.float(), z, bits, group, k)
    cfgs = candidate_configs(f"w{bits}", m, n, k) + [GemvConfig(4, 512, 7), GemvConfig(32, 256, 9, use_dot=True)]
    for cfg in cfgs:
        assert rel_err(w_int_gemv(x, p, s, z, bits, group, k, None, cfg), ref) < 1e-2, str(cfg)


def test_fast_linear_tune_and_cuda_graph() -> None:
    """tune_linear_shapes picks per shape; fast_linear replays inside a CUDA graph (split-K counters included)."""
    shapes = [(2048, 2048), (2048, 8192)]
    report = tune_linear_shapes(shapes, ms=(1, 4), reps=5)
    assert len(report) == 4
    x, w = _x_w(1, 2048, 8192, seed=3)
    set_linear_choice(1, 2048, 8192, torch.bfloat16, GemvConfig(4, 512, 8))  # force split-K through fast_linear
    x2, w2 = _x_w(4, 2048, 2048, seed=4)
    set_linear_choice(4, 2048, 2048, torch.bfloat16, GemvConfig(32, 256, 4, use_dot=True))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fast_linear(x, w), fast_linear(x2, w2)  # compile outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, y2 = fast_linear(x, w), fast_linear(x2, w2)
    for seed in (5, 6, 7):
        x.copy_(_x_w(1, 2048, 8192, seed=seed)[0])
        x2.copy_(_x_w(4, 2048, 2048, seed=seed)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, gemv_ref(x.float(), w.float())) < 1e-2
        assert rel_err(y2, gemv_ref(x2.float(), w2.float())) < 1e-2
    set_linear_choice(1, 2048, 8192, torch.bfloat16, None)
    set_linear_choice(4, 2048, 2048, torch.bfloat16, None)


# swap-AB int GEMV (y^T = W x^T, w_int_gemv_t.py): "_dott" dots q - z, "_dotto" OFFSET + q; bk <= group puts the
# scale after the dot, bk > group (bk256 with g128 / g32) before it; sk3 / bk32 force split-K and small steps
DOT_T_CONFIGS = ["bn64_bk128_sk0_w4_dott", "bn128_bk128_sk0_w4_dott", "bn256_bk128_sk0_w8_dott",
                 "bn64_bk256_sk0_w4_dott", "bn64_bk128_sk0_w4_dotto", "bn128_bk128_sk0_w4_dotto",
                 "bn256_bk128_sk0_w8_dotto", "bn64_bk64_sk3_w4_dott", "bn32_bk32_sk0_w4_dotto"]


@pytest.mark.parametrize("m", [1, 3, 8, 16])
@pytest.mark.parametrize("shape", [(6144, 4096), (28672, 4096), (4096, 14336), (2048 + 40, 2048)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("bits,group,zp", [(4, 128, False), (4, 128, True), (4, 32, True), (8, 0, False),
                                           (8, 128, True)], ids=["w4g128", "w4g128zp", "w4g32zp", "w8pc", "w8g128zp"])
def test_w_int_gemv_dot_t(shape, m, bits, group, zp) -> None:
    n, k = shape
    group = group or k
    x, p, s, z = _int_case(m, n, k, bits, group, zp, seed=3)
    b = torch.randn(n, device="cuda").bfloat16()
    ref = w_int_linear_ref(x.float(), p, s.float(), z, bits, group, k, b.float())
    for cfg in DOT_T_CONFIGS:
        out = w_int_gemv(x, p, s, z, bits, group, k, b, GemvConfig.parse(cfg))
        assert rel_err(out, ref) < 1e-2, cfg


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("bits,group,zp", [(4, 128, True), (8, 64, True)])
def test_w_int_gemv_dot_t_fp16(m, bits, group, zp) -> None:
    """fp16 activations: `_dotto` builds 1024 + q (int4 and int8) from the fp16 bits."""
    n, k = 4096 + 24, 4096
    x, p, s, z = _int_case(m, n, k, bits, group, zp, dtype=torch.float16, seed=4)
    ref = w_int_linear_ref(x.float(), p, s.float(), z, bits, group, k)
    for cfg in DOT_T_CONFIGS:
        assert rel_err(w_int_gemv(x, p, s, z, bits, group, k, None, GemvConfig.parse(cfg)), ref) < 1e-2, cfg
