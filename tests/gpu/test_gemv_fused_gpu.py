"""Fused-prologue GEMVs on CUDA (Llama shapes) vs their twins, and the engine's decode with them on vs off."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from quanta.kernels.gemv import GemvConfig  # noqa: E402
from quanta.kernels.gemv_fused import (  # noqa: E402
    gemv_add_rms_norm,
    gemv_add_rms_norm_ref,
    gemv_silu_mul,
    gemv_silu_mul_ref,
)
from tests.conftest import make_tiny_model  # noqa: E402


def _rel(a, b) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("n,k", [(3072, 2048), (16384, 2048), (6144, 4096), (100, 96)])
@pytest.mark.parametrize("residual", [True, False])
def test_norm_gemv(m, n, k, residual) -> None:
    g = torch.Generator(device="cuda").manual_seed(m * n)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    r = torch.randn(m, k, device="cuda", generator=g).bfloat16() if residual else None
    nw = (1 + 0.1 * torch.randn(k, device="cuda", generator=g)).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    y, res = gemv_add_rms_norm(x, r, nw, 1e-5, w, b)
    y_ref, res_ref = gemv_add_rms_norm_ref(x, r, nw, 1e-5, w, b)
    assert _rel(y, y_ref) < 2e-2
    assert torch.equal(res, res_ref)


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("n,k", [(2048, 8192), (4096, 14336), (64, 200)])
def test_silu_gemv(m, n, k) -> None:
    g = torch.Generator(device="cuda").manual_seed(m + n)
    gu = torch.randn(m, 2 * k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).bfloat16()
    assert _rel(gemv_silu_mul(gu, w), gemv_silu_mul_ref(gu, w)) < 2e-2


@pytest.mark.parametrize("cfg", ["bn4_bk1024_sk1_w4_s1_nx_r128", "bn4_bk2048_sk1_w4_s1_r128"])
def test_register_capped_gemvs(cfg) -> None:
    """A register cap ("_rN", Triton's maxnreg) on the fused and plain 16-bit GEMVs: the uncapped config's bits."""
    from dataclasses import replace

    from quanta.kernels.gemv import gemv

    g = torch.Generator(device="cuda").manual_seed(7)
    capped = GemvConfig.parse(cfg)
    plain = replace(capped, max_regs=0)
    gu = torch.randn(1, 2 * 8192, device="cuda", generator=g).bfloat16()
    w = (torch.randn(2048, 8192, device="cuda", generator=g) * 0.05).bfloat16()
    assert torch.equal(gemv_silu_mul(gu, w, config=capped), gemv_silu_mul(gu, w, config=plain))
    x = torch.randn(1, 8192, device="cuda", generator=g).bfloat16()
    assert torch.equal(gemv(x, w, config=capped), gemv(x, w, config=plain))


def test_fused_gemv_in_cuda_graph() -> None:
    """Split-K counters and the residual store replay correctly inside a captured graph."""
    x = torch.randn(1, 2048, device="cuda").bfloat16()
    r = torch.randn(1, 2048, device="cuda").bfloat16()
    nw = torch.ones(2048, device="cuda").bfloat16()
    w = (torch.randn(3072, 2048, device="cuda") * 0.05).bfloat16()
    cfg = GemvConfig.parse("bn16_bk256_sk4_w4_s3")
    gemv_add_rms_norm(x, r, nw, 1e-5, w, None, cfg)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, res = gemv_add_rms_norm(x, r, nw, 1e-5, w, None, cfg)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        y_ref, res_ref = gemv_add_rms_norm_ref(x, r, nw, 1e-5, w)
        assert _rel(y, y_ref) < 2e-2 and torch.equal(res, res_ref)


def test_engine_fused_vs_unfused_bf16(tmp_path, monkeypatch) -> None:
    """Batch-1 bf16 decode with the fused GEMVs gives the unfused engine's generation logits (bf16 tolerance)."""
    from quanta import LLM, SamplingParams
    from quanta.layers import fast_ops

    path = make_tiny_model(tmp_path / "llama", "llama")
    prompt = [1, 5, 9, 33, 7, 100, 42]
    params = SamplingParams(max_tokens=8, ignore_eos=True, return_generation_logits=True)
    logits = {}
    for rows in (0, 4):
        monkeypatch.setattr(fast_ops, "FUSED_GEMV_MAX_ROWS", rows)
        with LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16") as llm:
            out = llm.generate(prompt, params)
        logits[rows] = (out.outputs[0].token_ids, out.outputs[0].generation_logits.float())
    (ids0, l0), (ids4, l4) = logits[0], logits[4]
    same = next((i for i, (a, b) in enumerate(zip(ids0, ids4)) if a != b), len(ids0))
    n = min(same + 1, len(l0), len(l4))  # logits of identical contexts only
    assert same >= 2, (ids0, ids4)
    assert ((l0[:n] - l4[:n]).norm() / l0[:n].norm()) < 3e-2


def test_engine_lm_head_gemv_bf16(tmp_path, monkeypatch) -> None:
    """Batch-1 bf16 decode with the lm_head on the skinny GEMV (QUANTA_GEMV_LMHEAD) gives cuBLAS's tokens and
    logits within bf16 tolerance."""
    from quanta import LLM, SamplingParams
    from quanta.layers import fast_ops

    path = make_tiny_model(tmp_path / "llama", "llama")
    prompt = [1, 5, 9, 33, 7, 100, 42]
    params = SamplingParams(max_tokens=8, ignore_eos=True, return_generation_logits=True)
    logits = {}
    for on in (False, True):
        monkeypatch.setattr(fast_ops, "GEMV_LMHEAD", on)
        with LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16") as llm:
            out = llm.generate(prompt, params)
        logits[on] = (out.outputs[0].token_ids, out.outputs[0].generation_logits.float())
    (ids0, l0), (ids1, l1) = logits[False], logits[True]
    same = next((i for i, (a, b) in enumerate(zip(ids0, ids1)) if a != b), len(ids0))
    n = min(same + 1, len(l0), len(l1))
    assert same >= 2, (ids0, ids1)
    assert ((l0[:n] - l1[:n]).norm() / l0[:n].norm()) < 3e-2
