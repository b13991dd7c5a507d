"""Programmatic dependent launch (kernels/pdl.py) on a Hopper GPU: the PDL kernels give the bits of the plain ones,
eagerly and in long dependent chains replayed from CUDA graphs (a missing wait would race), and the engine's
greedy tokens do not change with PDL on."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
pytest.importorskip("triton")

from quanta.kernels import pdl  # noqa: E402
from quanta.kernels.gemv import gemv  # noqa: E402
from quanta.kernels.gemv_fused import gemv_add_rms_norm, gemv_silu_mul  # noqa: E402
from quanta.kernels.rms_norm import fused_add_rms_norm  # noqa: E402
from tests.conftest import make_tiny_model  # noqa: E402

hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs sm_90+"
)


@pytest.fixture
def pdl_on():
    pdl.set_pdl(True)
    yield
    pdl.set_pdl(None)


def _layer(x, res, w_qkv, w_o, w_gu, w_down, nw):
    """One batch-1 decoder layer's chain of PDL kernels (attention replaced by a slice)."""
    qkv, res = gemv_add_rms_norm(x, res, nw, 1e-5, w_qkv)
    h = gemv(qkv[:, : w_o.shape[1]].contiguous(), w_o)
    h, res = fused_add_rms_norm(h, res, nw, 1e-5)
    gu = gemv(h, w_gu)
    return gemv_silu_mul(gu, w_down), res


def _weights(hidden=512, inter=1024, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.05).bfloat16()  # noqa: E731
    nw = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=g)).bfloat16()
    return mk(3 * hidden, hidden), mk(hidden, hidden), mk(2 * inter, hidden), mk(hidden, inter), nw


def _chain(x, ws, layers):
    res = None
    for _ in range(layers):
        x, res = _layer(x, res, *ws)
        x = x / x.float().abs().amax().clamp(min=1e-3).to(x.dtype)  # keep the values bounded over many layers
    return x, res


@hopper
def test_pdl_kernels_match_plain() -> None:
    ws = _weights()
    x = torch.randn(1, 512, device="cuda").bfloat16()
    plain = _chain(x, ws, 4)
    pdl.set_pdl(True)
    try:
        assert pdl.pdl_enabled(x.device)
        fast = _chain(x, ws, 4)
    finally:
        pdl.set_pdl(None)
    torch.cuda.synchronize()
    assert torch.equal(plain[0], fast[0]) and torch.equal(plain[1], fast[1])


@hopper
def test_pdl_chain_in_cuda_graph(pdl_on) -> None:
    """64 layers of dependent PDL kernels captured once, replayed many times with new inputs: every replay equals
    the plain eager chain (a kernel reading its input before the previous kernel finished would not)."""
    ws = _weights(seed=1)
    static_x = torch.randn(1, 512, device="cuda").bfloat16()
    _chain(static_x, ws, 2)  # compile + allocate split-K counters outside the capture
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        _chain(static_x, ws, 64)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, res = _chain(static_x, ws, 64)
    expected = []
    inputs = [torch.randn(1, 512, device="cuda").bfloat16() for _ in range(6)]
    pdl.set_pdl(False)
    for x in inputs:
        expected.append(_chain(x, ws, 64))
    for x, (e_out, e_res) in zip(inputs, expected):
        for _ in range(20):
            static_x.copy_(x)
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, e_out) and torch.equal(res, e_res)


def _same_with_and_without_pdl(make_llm, prompt, params) -> None:
    """The engine from make_llm() generates the same tokens and logits with PDL off and on."""
    outs = {}
    for on in (False, True):
        pdl.set_pdl(on)
        try:
            with make_llm() as llm:
                out = llm.generate(prompt, params).outputs[0]
        finally:
            pdl.set_pdl(None)
        outs[on] = (out.token_ids, out.generation_logits.float())
    assert outs[False][0] == outs[True][0]
    assert torch.equal(outs[False][1], outs[True][1])


@hopper
def test_engine_tokens_with_pdl(tmp_path, monkeypatch) -> None:
    """bf16 batch-1 decode (CUDA graphs) gives the same greedy tokens and logits with PDL on as off, with o_proj
    on the GEMV as well."""
    from quanta import LLM, SamplingParams
    from quanta.layers import fast_ops

    monkeypatch.setattr(fast_ops, "GEMV_LINEAR_MAX_BYTES", 16 << 20)
    path = make_tiny_model(tmp_path / "llama", "llama")
    prompt = [1, 5, 9, 33, 7, 100, 42]
    params = SamplingParams(max_tokens=16, ignore_eos=True, return_generation_logits=True)
    _same_with_and_without_pdl(lambda: LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16"), prompt, params)


@hopper
@pytest.mark.parametrize("l2", [False, True])
def test_asm_gemv_preload_matches_plain(pdl_on, monkeypatch, l2) -> None:
    """The one-row int4 asm GEMV with PDL (the first K step's words loaded before the wait; l2: all its words asked
    of L2 too, QUANTA_INT_L2_PREFETCH): the plain kernel's bits, for each config kind (plain, "_nx", x planes with
    the SiLU epilogue)."""
    from quanta.quantization import w_int_gemv_asm

    monkeypatch.setattr(w_int_gemv_asm, "L2_PREFETCH", l2)
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups
    from quanta.quantization.w_int_kernel import w_int_gemv

    g = torch.Generator().manual_seed(3)
    for n, k, cfg, act in ((1024, 4096, w_int_gemv_asm.config_for(1024, 4096), False),
                           (512, 8192, w_int_gemv_asm.config_for(512, 8192), False),
                           (2048, 2048, w_int_gemv_asm.planes_config(), True)):
        w = torch.randn(n, k, generator=g)
        s, z = group_qparams(w, 4, 128, True, torch.bfloat16)
        packed, s, z = pack_int4(quantize_groups(w, s, z, 4, 128)).cuda(), s.cuda(), z.cuda()
        h = torch.randn(1, k, device="cuda").bfloat16()
        planes = w_int_gemv_asm.x_planes(h[0], 128) if cfg.x_planes else None
        got = w_int_gemv(h, packed, s, z, 4, 128, k, None, cfg, planes=planes, act=act)
        pdl.set_pdl(False)
        want = w_int_gemv(h, packed, s, z, 4, 128, k, None, cfg, planes=planes, act=act)
        pdl.set_pdl(True)
        assert torch.equal(got, want), (n, k, cfg)


@hopper
def test_engine_w4_tokens_with_pdl(tmp_path) -> None:
    """W4A16 batch-1 decode (asm GEMVs with x planes and the SiLU epilogue, the one-launch decode attention that
    reads its lengths, block table and first KV tile before the wait; CUDA graphs; a 300-token prompt, so the
    attention splits): the same greedy tokens and logits with PDL on as off."""
    import json

    from quanta.llmapi import LLM, QuantConfig, SamplingParams

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
               max_position_embeddings=1024, rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    path = tmp_path / "llama-1024.json"
    path.write_text(json.dumps(cfg))
    prompt = [3 + (7 * i) % 500 for i in range(300)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, return_generation_logits=True)
    _same_with_and_without_pdl(lambda: LLM(str(path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                                           quant_config=QuantConfig(quant_algo="W4A16")), prompt, params)


@hopper
@pytest.mark.parametrize("rows", [5, 16])
def test_swap_ab_gemv_and_silu_preload_match_plain(rows) -> None:
    """The 5-16 row int GEMV (swap-AB, w_int_gemv_t.py) with PDL (the first K step's bytes loaded before the wait)
    and the PDL silu_and_mul: the plain kernels' bits."""
    from quanta.kernels.activation import silu_and_mul
    from quanta.kernels.gemv import gemv_config
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups
    from quanta.quantization.w_int_kernel import w_int_gemv

    g = torch.Generator().manual_seed(rows)
    outs = {}
    for n, k in ((4096, 2048), (1024, 4096)):
        w = torch.randn(n, k, generator=g)
        s, z = group_qparams(w, 4, 128, True, torch.bfloat16)
        packed, s, z = pack_int4(quantize_groups(w, s, z, 4, 128)).cuda(), s.cuda(), z.cuda()
        h = torch.randn(rows, k, device="cuda").bfloat16()
        cfg = gemv_config("w4", rows, n, k)
        for on in (False, True):
            pdl.set_pdl(on)
            try:
                y = w_int_gemv(h, packed, s, z, 4, 128, k, None, cfg)
                outs[(n, on)] = (y, silu_and_mul(y))
            finally:
                pdl.set_pdl(None)
        assert cfg.use_dot_t or rows < 16
        assert all(torch.equal(a, b) for a, b in zip(outs[(n, False)], outs[(n, True)])), (n, k, cfg)
