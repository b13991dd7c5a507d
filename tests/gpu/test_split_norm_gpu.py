"""The residual add + RMSNorm split across two int4 GEMVs (kernels/split_norm.py, QUANTA_SPLIT_NORM): the producer
asm GEMV's h / xw / partials against split_norm_ref, the consumers (asm GEMV on x planes, its SiLU epilogue, the mma
SiLU GEMV) against norm + GEMV, and the engine with the split on and off."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs an sm_90 GPU"
)


def _w4(n, k, zp, seed):
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s, z = group_qparams(w, 4, 128, zp, torch.bfloat16)
    return pack_int4(quantize_groups(w, s, z, 4, 128)).cuda(), s.cuda(), z.cuda() if z is not None else None


def _close(got, want, rel=1e-2):
    # relative to the whole vector (SiLU(gate) * up spans ~1e-8 .. 1e4: its largest values carry two roundings)
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err <= rel, (err, got, want)


@pytest.mark.parametrize("n,k,zp,bias,sub", [(4096, 4096, True, False, 128), (4096, 14336, False, True, 0),
                                             (2048, 1024, True, False, 128), (1000, 2048, False, False, 0)])
def test_producer_equals_ref(n, k, zp, bias, sub):
    from quanta.kernels.split_norm import split_norm_ref
    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.w_int_kernel import w_int_gemv, w_int_linear_ref

    packed, s, z = _w4(n, k, zp, n + k)
    x = torch.randn(1, k, device="cuda").bfloat16()
    res = torch.randn(1, n, device="cuda").bfloat16()
    nw = (torch.rand(n, device="cuda") + 0.5).bfloat16()
    b = torch.randn(n, device="cuda").bfloat16() if bias else None
    cfg = w_int_gemv_asm.config_for(n, k)
    h, xw, parts = w_int_gemv(x, packed, s, z, 4, 128, k, b, cfg, norm_out=(res, nw, sub))
    y = w_int_gemv(x, packed, s, z, 4, 128, k, b, cfg)  # the same kernel's plain output: h is y + res
    assert torch.equal(h[0], (y.float() + res.float()).bfloat16()[0])
    h_ref, xw_ref, parts_ref = split_norm_ref(w_int_linear_ref(x, packed, s, z, 4, 128, k).float()[0], res[0], nw,
                                              cfg.block_n, b)
    _close(h[0], h_ref)
    want_xw = (nw.float() * h[0].float()).bfloat16()
    if sub:
        assert torch.equal(xw.view(torch.int32)[0], w_int_gemv_asm.x_planes(want_xw, sub))
    else:
        assert torch.equal(xw[0], want_xw)
    assert parts.numel() == -(-n // cfg.block_n)
    hf = h[0].float()
    torch.testing.assert_close(parts.sum(), (hf * hf).sum(), rtol=1e-5, atol=0)
    _close(parts, parts_ref, 2e-2)


def _split(h, nw, eps, n_parts=512):
    """xw and partials of h as a producer of n_parts programs would store them."""
    hf = h.float()[0]
    parts = torch.nn.functional.pad(hf * hf, (0, -hf.numel() % n_parts)).view(n_parts, -1).sum(1)
    return (nw.float() * hf).bfloat16()[None], parts.contiguous()


@pytest.mark.parametrize("n,k,zp,act", [(6144, 4096, True, False), (3072, 2048, False, False),
                                        (28672, 4096, True, True), (4096, 1024, False, True)])
def test_planes_consumer_equals_norm_then_gemv(n, k, zp, act):
    from quanta.kernels.activation import silu_and_mul
    from quanta.kernels.rms_norm import rms_norm
    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.w_int_kernel import w_int_gemv

    packed, s, z = _w4(n, k, zp, n * 3 + k)
    h = (3 * torch.randn(1, k, device="cuda")).bfloat16()
    nw = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    xw, parts = _split(h, nw, 1e-5)
    cfg = w_int_gemv_asm.planes_config()
    ref_x = rms_norm(h, nw, 1e-5)
    want = w_int_gemv(ref_x, packed, s, z, 4, 128, k, None, cfg, planes=w_int_gemv_asm.x_planes(ref_x[0], 128))
    if act:
        want = silu_and_mul(want)
    planes = w_int_gemv_asm.x_planes(xw[0], 128)
    got = w_int_gemv(xw, packed, s, z, 4, 128, k, None, cfg, planes=planes, act=act, inv=(parts, 1e-5))
    _close(got, want)


@pytest.mark.parametrize("n,k,zp,bias", [(28672, 4096, True, False), (4096, 2048, False, True)])
def test_mma_silu_consumer_equals_norm_then_gemv(n, k, zp, bias):
    from quanta.kernels.rms_norm import rms_norm
    from quanta.quantization import w_int_mma

    packed, s, z = _w4(n, k, zp, n + 7 * k)
    words = w_int_mma.mma_pack(packed, 128)
    h = (3 * torch.randn(1, k, device="cuda")).bfloat16()
    nw = (torch.rand(k, device="cuda") + 0.5).bfloat16()
    b = torch.randn(n, device="cuda").bfloat16() if bias else None
    xw, parts = _split(h, nw, 1e-6, 300)
    cfg = w_int_mma.silu_config(1)
    want = w_int_mma.w_int_mma_linear(rms_norm(h, nw, 1e-6), words, s, z, 128, b, cfg, act=True)
    got = w_int_mma.w_int_mma_linear(xw, words, s, z, 128, b, cfg, act=True, inv=(parts, 1e-6))
    _close(got, want)


@pytest.mark.parametrize("mma", [True, False])
def test_engine_split_norm_same_distributions(tmp_path, monkeypatch, mma):
    """A W4A16 engine at batch 1 (CUDA graphs) with the add + norms split across the GEMVs gives the same next-token
    distributions as with the norm launches (top-8 logprobs while the greedy tokens agree); gate_up on the mma SiLU
    GEMV (plain xw) or the asm SiLU epilogue (x planes)."""
    from dist_compare import compare_steps, count_inits, tiny_llama

    from quanta.layers import fast_ops
    from quanta.llmapi import LLM, QuantConfig, SamplingParams
    from quanta.quantization import w_int_mma

    path = tiny_llama(tmp_path)
    params = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=8)
    monkeypatch.setattr(w_int_mma, "ROWS", (2, 16))  # one row's qkv on the asm GEMV: a consumer of x planes
    if not mma:
        monkeypatch.setattr(w_int_mma, "SILU_ROWS", (0, -1))
    calls = count_inits(monkeypatch, fast_ops.Prenormed)
    runs = []
    for on in (True, False):
        monkeypatch.setattr(fast_ops, "SPLIT_NORM", on)
        with LLM(path, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                 quant_config=QuantConfig(quant_algo="W4A16")) as llm:
            runs.append(llm.generate([1, 17, 42, 99, 7], params).outputs[0])
        if on:
            assert calls, "the split norm never ran"
    steps, worst = compare_steps(*runs)
    assert steps >= 5 and worst < 0.05, (steps, worst)
