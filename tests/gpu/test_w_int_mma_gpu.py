"""The tensor-core int4 GEMV on mma words (quantization/w_int_mma.py) against its twin: 1 - 16 rows, zero points
or not, bias, groups 64 / 128, bf16 and fp16, every config kind (tiles, warps, prefetch of words /
x; x in fragment order)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0), reason="needs an sm_90 GPU"
)


def _case(n, k, group, zp, seed, dtype=torch.bfloat16):
    from quanta.quantization.int_quant import group_qparams, pack_int4, quantize_groups
    from quanta.quantization.w_int_mma import mma_pack

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    s, z = group_qparams(w, 4, group, zp, dtype)
    packed = pack_int4(quantize_groups(w, s, z, 4, group))
    return mma_pack(packed, group).cuda(), s.cuda(), z.cuda() if z is not None else None


@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("cfg", ["t1_w4", "t2_w4", "t4_w2", "t2_w8_np", "t1_w8", "t1_w8_px", "t2_w4_np_px",
                                 "t1_w8_ps", "t1_w8_px_ps", "t2_w2_np_ps", "t1_w4_px_ps",
                                 "t1_w8_px_ps_p2", "t2_w16_px_ps", "t2_w2_ps_p2", "t1_w4_px_ps_l2", "t2_w2_np_ps_l2",
                                 "t1_w4_px_ps_r128", "t1_w8_px_ps_r128", "t1_w4_px_ps_r96", "t1_w8_ps_r96",
                                 "t1_w4_ps_r96", "t2_w8_px_ps", "t2_w8_ps_p2_r128", "t1_w8_px_ps_p2_r96",
                                 "t1_w8_px_ps_p2_r80", "t1_w16_px_ps_p2_r64", "t2_w16_px_ps_p2_r128",
                                 "t1_w8_px_ps_r96", "t1_w16_px_ps_r64", "t1_w8_px_ps_r72", "t1_w16_ps_r64",
                                 "t1_w32_px_ps_r64", "t1_w16_px_ps_r56", "t2_w8_ps_r96", "t1_w16_ps_p2_r64"])
@pytest.mark.parametrize("n,k,group,zp", [(96, 1024, 128, True), (6144, 4096, 128, False), (512, 768, 64, True)])
def test_mma_gemv_equals_ref(m, cfg, n, k, group, zp):
    from quanta.quantization.w_int_mma import MmaConfig, w_int_mma_linear, w_int_mma_linear_ref

    words, s, z = _case(n, k, group, zp, n + k + m)
    x = torch.randn(m, k, device="cuda").bfloat16()
    got = w_int_mma_linear(x, words, s, z, group, None, MmaConfig.parse(cfg))
    ref = w_int_mma_linear_ref(x.float(), words, s.float(), z, group)
    assert got.shape == (m, n) and got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("cfg", ["t2_w2", "t2_w4_np", "t2_w8", "t2_w2_np_px", "t2_w2_ps", "t2_w2_l2", "t2_w2_ps_r128",
                                 "t2_w2_ps_p2_r128", "t2_w4_ps_r128", "t2_w2_np_ps",
                                 "t2_w2_px_ps_p2_r128", "t2_w4_px_ps_r80", "t2_w2_ps_p2_r96", "t2_w4_px_ps_r72"])
@pytest.mark.parametrize("n,k,zp,bias", [(2048, 1024, True, False), (512, 768, False, True)])
def test_mma_silu_epilogue_equals_ref(m, cfg, n, k, zp, bias):
    import torch.nn.functional as F

    from quanta.quantization.w_int_mma import MmaConfig, w_int_mma_linear, w_int_mma_linear_ref

    group = 128 if k % 128 == 0 else 64
    words, s, z = _case(n, k, group, zp, n + k + m)
    x = torch.randn(m, k, device="cuda").bfloat16()
    b = torch.randn(n, device="cuda").bfloat16() if bias else None
    got = w_int_mma_linear(x, words, s, z, group, b, MmaConfig.parse(cfg), act=True)
    gate_up = w_int_mma_linear_ref(x.float(), words, s.float(), z, group, b.float() if bias else None)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    assert got.shape == (m, n // 2)
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_gemv_bias_3d_and_fp16(dtype):
    from quanta.quantization.w_int_mma import w_int_mma_linear, w_int_mma_linear_ref

    words, s, z = _case(256, 512, 128, True, 7, dtype)
    x = torch.randn(2, 3, 512, device="cuda").to(dtype)
    b = torch.randn(256, device="cuda").to(dtype)
    got = w_int_mma_linear(x, words, s, z, 128, b)
    ref = w_int_mma_linear_ref(x.float(), words, s.float(), z, 128, b.float())
    assert got.shape == (2, 3, 256)
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


@pytest.mark.parametrize("m", [3, 9, 16])
@pytest.mark.parametrize("cfg", ["t1_w8_px_ps", "t1_w4_px_ps", "t2_w2_np_ps_r128", "t2_w8_px_ps", "t4_w8_ps"])
@pytest.mark.parametrize("n,k,group,zp,act", [(512, 1024, 128, True, False), (256, 768, 64, False, False),
                                              (512, 1024, 128, True, True)])
def test_mma_gemv_x_frag_equals_ref(m, cfg, n, k, group, zp, act):
    """x in fragment order (w_int_mma.x_frag, config-independent XF loads) gives what plain x gives."""
    import torch.nn.functional as F

    from quanta.quantization.w_int_mma import MmaConfig, w_int_mma_linear, w_int_mma_linear_ref, x_frag

    words, s, z = _case(n, k, group, zp, n + k + m)
    x = torch.randn(m, k, device="cuda").bfloat16()
    got = w_int_mma_linear(x, words, s, z, group, None, MmaConfig.parse(cfg), act, xf=x_frag(x, group))
    ref = w_int_mma_linear_ref(x.float(), words, s.float(), z, group)
    if act:
        ref = F.silu(ref[:, : n // 2]) * ref[:, n // 2 :]
    assert got.shape == (m, n // 2 if act else n)
    assert (got.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def _engine_runs(tmp_path, monkeypatch, settings: list[dict]) -> list:
    """The next-token outputs of a small W4A16 engine (CUDA graphs, PDL as configured) under each of `settings`
    (w_int_mma attributes to patch): 4 sequences together (prefill and decode of up to 16 rows) and one alone;
    with the number of layers that got mma words."""
    import json

    from quanta.llmapi import LLM, QuantConfig, SamplingParams
    from quanta.quantization import w_int_mma

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
               max_position_embeddings=512, rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    path = tmp_path / "llama-1024.json"
    path.write_text(json.dumps(cfg))
    prompts = [[1, 17, 42, 99, 7], [1, 5, 6], [1, 300, 301, 302, 303, 304], [1, 2, 3, 4]]
    params = SamplingParams(max_tokens=4, ignore_eos=True, logprobs=8)
    runs = []
    for setting in settings:
        for name, value in setting.items():
            monkeypatch.setattr(w_int_mma, name, value)
        with LLM(str(path), load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
                 quant_config=QuantConfig(quant_algo="W4A16")) as llm:
            outs = llm.generate(prompts, params) + [llm.generate(prompts[0], params)]
            attached = sum(hasattr(mod, "weight_mma") for mod in llm.engine.runner.model.modules())
            runs.append(([o.outputs[0] for o in outs], attached))
    return runs


def _same_distributions(got, want) -> None:
    """Top-8 logprobs of each step agree while the greedy tokens do (the kernels round differently, and the
    near-ties of dummy weights may flip a token)."""
    from dist_compare import compare_steps

    worst, steps = 0.0, 0
    for g, w in zip(got, want):
        n, err = compare_steps(g, w)
        steps, worst = steps + n, max(worst, err)
    assert steps >= 5 and worst < 0.05, (steps, worst)


def test_engine_mma_same_distributions(tmp_path, monkeypatch):
    """The 1-16 row linears and the gate_up SiLU epilogue on the mma GEMV (the defaults) give the same next-token
    distributions as the byte / swap-AB / asm GEMVs (x planes at one row) + silu_and_mul."""
    (on, n_on), (off, n_off) = _engine_runs(tmp_path, monkeypatch, [dict(ROWS=(1, 16), SILU_ROWS=(1, 16)),
                                                                    dict(ROWS=(0, -1), SILU_ROWS=(0, -1))])
    assert (n_on, n_off) == (8, 0)  # qkv, o, gate_up, down x 2 layers
    _same_distributions(on, off)


def test_engine_x_frag_same_distributions(tmp_path, monkeypatch):
    """qkv / gate_up reading the RMSNorm's output and down_proj silu_and_mul's in fragment order
    (QUANTA_INT_MMA_XF_ROWS) give the same next-token distributions as plain x on the same mma GEMVs."""
    base = dict(ROWS=(2, 16), SILU_ROWS=(0, -1))
    (on, _), (off, _) = _engine_runs(tmp_path, monkeypatch, [dict(base, XF_ROWS=(1, 16)), dict(base, XF_ROWS=(0, -1))])
    _same_distributions(on, off)
