"""The RMSNorm that writes x_planes for the one-row int4 asm GEMV (QUANTA_INT_GEMV_PLANES): same numbers as the
plain norm + GEMV, at the layer and in the engine (W4A16, CUDA graphs). The gate_up GEMV's SiLU epilogue
(QUANTA_INT_SILU_EPILOGUE, ACT_OUT): the same bits as GEMV + silu_and_mul, the same tokens in the engine."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs an sm_90 GPU"
)


@pytest.mark.parametrize("n,k,zp", [(1000, 4096, True), (6144, 4096, False), (3072, 2048, True)])
def test_norm_planes_gemv_equals_plain(n, k, zp):
    from quanta.kernels.rms_norm import fused_add_rms_norm, fused_add_rms_norm_planes
    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups
    from quanta.quantization.w_int_kernel import w_int_gemv

    g = torch.Generator().manual_seed(n)
    w = torch.randn(n, k, generator=g)
    s, z = group_qparams(w, 4, 128, zp, torch.bfloat16)
    packed = pack_int4(quantize_groups(w, s, z, 4, 128)).cuda()
    s, z = s.cuda(), z.cuda() if z is not None else None
    x, res = (torch.randn(1, k, generator=g).bfloat16().cuda() for _ in range(2))
    nw = (torch.rand(k, generator=g) + 0.5).bfloat16().cuda()
    h, r = fused_add_rms_norm(x, res, nw, 1e-5)
    h2, r2, planes = fused_add_rms_norm_planes(x, res, nw, 1e-5, 128)
    assert torch.equal(h, h2) and torch.equal(r, r2)
    assert torch.equal(planes.view(torch.int32)[0], w_int_gemv_asm.x_planes(h[0], 128))
    plain = w_int_gemv(h, packed, s, z, 4, 128, k, None, w_int_gemv_asm.config_for(n, k))
    got = w_int_gemv(h2, packed, s, z, 4, 128, k, None, w_int_gemv_asm.planes_config(), planes=planes.view(torch.int32))
    assert (got.float() - plain.float()).abs().max() <= 1e-2 * plain.float().abs().max()


def _w4(n, k, zp, seed):
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s, z = group_qparams(w, 4, 128, zp, torch.bfloat16)
    return pack_int4(quantize_groups(w, s, z, 4, 128)).cuda(), s.cuda(), z.cuda() if z is not None else None


@pytest.mark.parametrize("n,k,zp,bias", [(2048, 4096, True, False), (14336, 2048, False, True),
                                         (128, 1024, True, True)])
def test_silu_epilogue_equals_gemv_then_silu(n, k, zp, bias):
    from quanta.kernels.activation import silu_and_mul
    from quanta.quantization import w_int_gemv_asm
    from quanta.quantization.w_int_kernel import w_int_gemv

    packed, s, z = _w4(n, k, zp, n + k)
    h = torch.randn(1, k, device="cuda").bfloat16()
    b = torch.randn(n, device="cuda").bfloat16() if bias else None
    planes = w_int_gemv_asm.x_planes(h[0], 128)
    cfg = w_int_gemv_asm.planes_config()
    gate_up = w_int_gemv(h, packed, s, z, 4, 128, k, b, cfg, planes=planes)
    want = silu_and_mul(gate_up)
    got = w_int_gemv(h, packed, s, z, 4, 128, k, b, cfg, planes=planes, act=True)
    assert got.shape == (1, n // 2) and torch.equal(got, want)


def test_engine_planes_equal_tokens(tmp_path, monkeypatch):
    from quanta.llmapi import LLM, QuantConfig, SamplingParams
    from quanta.quantization import w_int_gemv_asm, w_int_mma

    monkeypatch.setattr(w_int_mma, "ROWS", (2, 16))  # one row on the asm GEMV (the mma one takes it by default)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
               max_position_embeddings=512, rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    path = tmp_path / "llama-1024.json"
    path.write_text(json.dumps(cfg))
    prompt = [1, 17, 42, 99, 7]
    tokens = []
    for on, epilogue in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(w_int_gemv_asm, "PLANES", on)
        monkeypatch.setattr(w_int_gemv_asm, "SILU_EPILOGUE", epilogue)
        with LLM(str(path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                 quant_config=QuantConfig(quant_algo="W4A16")) as llm:
            out = llm.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True))
            tokens.append(out.outputs[0].token_ids)
    assert tokens[0] == tokens[1] == tokens[2]
