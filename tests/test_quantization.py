"""Quantization: methods, folding, calibration data, LLM(quant_config=...), save/load, pre-quantized AWQ /
GPTQ checkpoints, KV-cache quantization, CLI, and the clear errors. CPU reference paths throughout.
(Perplexity quality: test_quantization_quality.py; kernels: test_quantization_kernels.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quanta import LLM, SamplingParams
from quanta.config import CalibConfig, KvCacheConfig, QuantAlgo, QuantConfig
from quanta.quantization import quantize_model
from quanta.quantization.calib import model_logits

from .conftest import SHARED

C4 = SHARED / "corpora" / "c4_en_head1000.jsonl"
PROMPT = "Once upon a time"


def calib(batches: int = 4, seq_len: int = 128) -> CalibConfig:
    if not C4.is_file():
        pytest.skip(f"../shared corpora absent ({C4})")
    return CalibConfig(calib_dataset=str(C4), calib_batches=batches, calib_max_seq_length=seq_len)


def _model(path):
    from quanta.quantization.eval import load_model

    return load_model(path)


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


IDS = torch.randint(3, 500, (2, 48), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- primitives and layers
def test_int4_pack_and_group_roundtrip():
    from quanta.quantization.int_quant import (
        dequantize_groups,
        group_qparams,
        pack_int4,
        quantize_groups,
        unpack_int4,
    )

    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    w = torch.randn(6, 172)
    for zp in (False, True):
        s, z = group_qparams(w, 4, 32, zp, torch.float32)
        assert s.shape == (6, 6)  # 172 = 5 * 32 + 12: the last group is short
        back = dequantize_groups(quantize_groups(w, s, z, 4, 32), s, z, 4, 32, 172, torch.float32)
        assert back.shape == w.shape
        err = (back - w).abs().view(-1)
        assert err.max() <= s.max() * (0.51 if zp else 1.01)


def test_every_linear_quantized_lm_head_and_embeddings_not(stories_path):
    m = _model(stories_path)
    quantize_model(m, QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=32))
    down = m.model.layers[0].mlp.down_proj
    assert down.weight_packed.shape == (64, 96) and down.weight_scale.shape == (64, 6)  # 172 -> 6 groups
    assert "weight" not in down._parameters
    assert m.lm_head.weight.dtype == torch.float32 and m.model.embed_tokens.weight.dtype == torch.float32
    names = [n for n, _ in m.named_parameters()]
    assert sum(n.endswith("weight_packed") for n in names) == 4 * 5


def test_exclude_modules_patterns(stories_path):
    m = _model(stories_path)
    qc = QuantConfig(quant_algo=QuantAlgo.W8A16, exclude_modules=["*down_proj", "model.layers.0.self_attn.k_proj"])
    quantize_model(m, qc)
    assert m.model.layers[0].self_attn.qkv_proj.quant_method is None  # merged: excluded as a whole
    assert m.model.layers[1].self_attn.qkv_proj.quant_method is not None
    assert all(layer.mlp.down_proj.quant_method is None for layer in m.model.layers)
    assert m.model.layers[0].mlp.gate_up_proj.weight_packed.dtype == torch.uint8


def test_scale_folding_is_exact(tiny_model_factory):
    """x/s into the producer (norms, v rows with GQA, up rows) and W*s into the consumer: same function."""
    from quanta.quantization.structure import apply_scale, scale_groups

    path = tiny_model_factory("qwen2")  # GQA 4/2 heads, qkv bias
    m = _model(path)
    ref = model_logits(m, IDS)
    g = torch.Generator().manual_seed(1)
    for layer in m.model.layers:
        for group in scale_groups(layer):
            s = group.tie(torch.rand(group.linears[0].in_features, generator=g) * 4 + 0.25)
            apply_scale(group, group.linears, s, {}, use_pre_quant_scale=False)
    assert torch.allclose(model_logits(m, IDS), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("algo", ["W4A16", "W8A16", "W4A16_AWQ", "W4A16_GPTQ", "W8A16_GPTQ", "W8A8_SQ_PER_CHANNEL",
                                  "W8A8_SQ_PER_TENSOR_PLUGIN", "FP8", "FP8_PER_CHANNEL_PER_TOKEN", "W4A8_AWQ"])
def test_each_algorithm_stays_close_to_float(stories_path, algo):
    m, tok = _model(stories_path), _tokenizer(stories_path)
    text = (SHARED / "corpora" / "tinystories_valid_head.txt").read_text()[:4000]
    ids = torch.tensor(tok.encode(text)[:256]).view(2, 128)
    ref = model_logits(m, ids).log_softmax(-1)
    quantize_model(m, QuantConfig(quant_algo=algo, group_size=32), calib(), tok, show_progress=False)
    out = model_logits(m, ids).log_softmax(-1)
    kl = (ref.exp() * (ref - out)).sum(-1).mean().item()  # KL(float || quantized) per token
    assert 0 <= kl < (0.2 if "W4" in algo else 0.05 if "PER_TENSOR" in algo else 0.02), kl


def test_awq_pre_quant_scale_keeps_norms(stories_path):
    m, tok = _model(stories_path), _tokenizer(stories_path)
    norm = m.model.layers[0].input_layernorm.weight.clone()
    quantize_model(m, QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ, group_size=32, pre_quant_scale=True), calib(),
                   tok, show_progress=False)
    assert torch.equal(m.model.layers[0].input_layernorm.weight, norm)
    assert m.model.layers[0].self_attn.qkv_proj.pre_quant_scale.shape == (64,)


# ---------------------------------------------------------------- calibration data
def test_calibration_sources(stories_path, tmp_path):
    from quanta.quantization.calib import calibration_tokens

    tok = _tokenizer(stories_path)
    cfg = calib(batches=3, seq_len=64)
    cfg.calib_batch_size = 2
    assert calibration_tokens(cfg, tok, 512).shape == (6, 64)  # batches x batch_size sequences
    txt = tmp_path / "data.txt"
    txt.write_text("Once upon a time there was a cat.\n\nThe cat sat on a mat. " * 40)
    assert calibration_tokens(CalibConfig(calib_dataset=str(txt), calib_batches=2, calib_max_seq_length=32),
                              tok, 512).shape == (2, 32)
    rnd = calibration_tokens(CalibConfig(calib_dataset="random", calib_batches=2, calib_max_seq_length=16), None, 99)
    assert rnd.shape == (2, 16) and int(rnd.max()) < 99


def test_default_hub_dataset_offline_error_names_a_local_file(stories_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # as when the package is absent (or the Hub is)
    with pytest.raises(ValueError, match=r"cnn_dailymail.*local text or jsonl file"):
        LLM(str(stories_path), quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ))


# ---------------------------------------------------------------- errors naming what is needed
def test_unrunnable_algorithms_raise_clear_errors(stories_path, monkeypatch):
    from quanta.quantization.base import require_fp8

    with pytest.raises(ValueError, match="Blackwell"):
        LLM(str(stories_path), quant_config=QuantConfig(quant_algo=QuantAlgo.NVFP4))
    with pytest.raises(ValueError, match="kv_cache_quant_algo"):
        LLM(str(stories_path), quant_config=QuantConfig(quant_algo=QuantAlgo.INT8))
    with pytest.raises(ValueError, match="group_size"):
        LLM(str(stories_path), quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16, group_size=20))
    with pytest.raises(ValueError, match="torch_ref"):
        LLM(str(stories_path), quant_config=QuantConfig(kv_cache_quant_algo=QuantAlgo.INT8), calib_config=calib(),
            attn_backend="triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100")
    with pytest.raises(ValueError, match=r"Ada.*Hopper.*sm_80"):
        require_fp8(torch.device("cuda"), "FP8")


# ---------------------------------------------------------------- LLM, save, load
@pytest.fixture(scope="module")
def awq_llm(stories_path):
    llm = LLM(str(stories_path), quant_config=QuantConfig(quant_algo=QuantAlgo.W4A16_AWQ, group_size=32,
                                                          kv_cache_quant_algo=QuantAlgo.INT8),
              calib_config=calib())
    yield llm
    llm.shutdown()


def _greedy(llm, n: int = 24):
    out = llm.generate(PROMPT, SamplingParams(max_tokens=n, logprobs=2), use_tqdm=False).outputs[0]
    return out.token_ids, out.cumulative_logprob, out.text


def test_llm_quantizes_at_load_and_generates(awq_llm, stories_llm):
    ids, _, text = _greedy(awq_llm)
    ref_ids, _, ref_text = _greedy(stories_llm)
    assert text.startswith(", there was a little") and ids[:8] == ref_ids[:8]
    net = awq_llm.engine.runner.model
    assert net.model.layers[0].self_attn.attn.k_cache.dtype == torch.int8


def test_save_then_load_skips_calibration_same_outputs(awq_llm, tmp_path, monkeypatch):
    awq_llm.save(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "quanta" and cfg["quant_algo"] == "W4A16_AWQ" and cfg["kv_cache_quant_algo"] == "INT8"
    assert (tmp_path / "q" / "tokenizer.json").is_file()

    def no_calibration(*a, **k):
        raise AssertionError("loading a saved quantized model must not calibrate")

    monkeypatch.setattr("quanta.quantization.pipeline.calibrate_and_quantize", no_calibration)
    with LLM(str(tmp_path / "q")) as again:
        assert _greedy(again) == _greedy(awq_llm)
        with pytest.raises(ValueError, match="already quantized"):
            LLM(str(tmp_path / "q"), quant_config=QuantConfig(quant_algo=QuantAlgo.W8A16))


@pytest.mark.parametrize("qc", [
    QuantConfig(quant_algo=QuantAlgo.W8A8_SQ_PER_CHANNEL),
    QuantConfig(quant_algo=QuantAlgo.FP8),
    QuantConfig(quant_algo=QuantAlgo.W4A16_GPTQ, group_size=32, has_zero_point=True),
    QuantConfig(quant_algo=QuantAlgo.W4A8_AWQ, group_size=32, pre_quant_scale=True),
    QuantConfig(kv_cache_quant_algo=QuantAlgo.FP8),  # float weights, quantized KV cache
], ids=["sq", "fp8", "gptq_zp", "w4a8_awq_pre_quant_scale", "kv_fp8_only"])
def test_save_load_roundtrip_other_layouts(stories_path, tmp_path, qc):
    with LLM(str(stories_path), quant_config=qc, calib_config=calib()) as llm:
        first = _greedy(llm, 12)
        llm.save(tmp_path / "q")
    with LLM(str(tmp_path / "q")) as again:
        assert _greedy(again, 12) == first


def test_kv_cache_fp8_and_kvcacheconfig_dtype(stories_path, stories_llm):
    ref_ids = _greedy(stories_llm, 16)[0]
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(dtype="fp8"), calib_config=calib()) as llm:
        attn = llm.engine.runner.model.model.layers[0].self_attn.attn
        assert attn.k_cache.dtype == torch.float8_e4m3fn and float(attn.k_scale) > 0
        assert _greedy(llm, 16)[0][:8] == ref_ids[:8]


def test_quantize_cli(stories_path, tmp_path):
    from quanta.cli import main

    out = tmp_path / "cli"
    assert main(["quantize", str(stories_path), "--algo", "W8A16", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_algo"] == "W8A16"
    with LLM(str(out)) as llm:
        assert _greedy(llm, 8)[2].startswith(", there was")


# ---------------------------------------------------------------- pre-quantized Hugging Face checkpoints
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _asym_quant(w: torch.Tensor, bits: int, g: int):
    """AutoAWQ / AutoGPTQ style asymmetric group quantization of w [out, in] -> q [out, in], s, z [out, G]."""
    wg = w.view(w.shape[0], -1, g)
    mx, mn = wg.amax(-1), wg.amin(-1)
    s = (mx - mn).clamp(min=1e-5) / (2**bits - 1)
    z = torch.round(-mn / s).clamp(0, 2**bits - 1)
    q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 2**bits - 1).view_as(w)
    return q.to(torch.int64), s.half(), z.to(torch.int64)


def _pack_along(t: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """int64 values -> int32 words packing 32 // bits of them along `dim` (in `order`)."""
    per = 32 // bits
    t = t.movedim(dim, -1)
    t = t.reshape(*t.shape[:-1], -1, per)
    order = order or list(range(per))
    word = torch.zeros(t.shape[:-1], dtype=torch.int64)
    for i in range(per):
        word |= t[..., order[i]] << (bits * i)
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)  # two's complement
    return word.movedim(-1, dim)


def _write_packed_checkpoint(src: Path, dst: Path, fmt: str, bits: int, g: int, act_order: bool = False):
    """Quantize a float checkpoint into the AutoAWQ-gemm / AutoGPTQ layout; also write the float checkpoint
    of the dequantized weights (what the packed one must compute). Returns (packed dir, dequantized dir)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(src / "model.safetensors"))
    packed, deq = {}, {}
    for name, w in state.items():
        if not any(f".{p}.weight" in name for p in PROJ):
            packed[name] = deq[name] = w
            continue
        base = name[: -len(".weight")]
        out, inn = w.shape
        if act_order:  # a column -> group assignment, shared by the projections reading one input (as
            # desc_act checkpoints have: the order comes from that input's Hessian)
            key = base.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            gen = torch.Generator().manual_seed(sum(map(ord, key)))
            g_idx = torch.randperm(inn, generator=gen) // g
            order = torch.argsort(g_idx, stable=True)
            q_sorted, s, z = _asym_quant(w[:, order].contiguous(), bits, g)
            q = torch.empty_like(q_sorted)
            q[:, order] = q_sorted
        else:
            g_idx = torch.arange(inn) // g
            q, s, z = _asym_quant(w, bits, g)
        deq[name] = ((q - z[:, g_idx]) * s.float()[:, g_idx]).float()
        if fmt == "awq":
            packed[base + ".qweight"] = _pack_along(q.t(), 4, 1, AWQ_ORDER)
            packed[base + ".qzeros"] = _pack_along(z.t(), 4, 1, AWQ_ORDER)
        else:
            packed[base + ".qweight"] = _pack_along(q.t(), bits, 0)
            packed[base + ".qzeros"] = _pack_along(z.t() - 1, bits, 1)  # AutoGPTQ stores zeros - 1
            packed[base + ".g_idx"] = g_idx.to(torch.int32)
        packed[base + ".scales"] = s.t().contiguous()
    cfg = json.loads((src / "config.json").read_text())
    outs = []
    for kind, tensors in (("packed", packed), ("deq", deq)):
        d = dst / kind
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"))
        c = dict(cfg)
        if kind == "packed":
            c["quantization_config"] = (
                {"quant_method": "awq", "bits": 4, "group_size": g, "zero_point": True, "version": "gemm"}
                if fmt == "awq" else
                {"quant_method": "gptq", "bits": bits, "group_size": g, "desc_act": act_order, "sym": False})
        (d / "config.json").write_text(json.dumps(c))
        outs.append(d)
    return outs


@pytest.mark.parametrize("fmt,bits,act_order", [("awq", 4, False), ("gptq", 4, False), ("gptq", 8, False),
                                                ("gptq", 4, True)])
def test_prequantized_hf_checkpoints_load_as_they_are(tiny_model_factory, tmp_path, fmt, bits, act_order):
    src = tiny_model_factory("llama_untied")
    packed, deq = _write_packed_checkpoint(src, tmp_path, fmt, bits, 32, act_order)
    m_packed, m_deq = _model(packed), _model(deq)
    qkv = m_packed.model.layers[0].self_attn.qkv_proj
    assert qkv.weight_packed.dtype == torch.uint8 and "qweight" not in qkv._parameters
    assert torch.allclose(model_logits(m_packed, IDS), model_logits(m_deq, IDS), atol=1e-4, rtol=1e-4)
    if fmt == "awq":  # and through the whole engine, then saved in quanta's layout
        with LLM(str(packed), skip_tokenizer_init=True) as llm, LLM(str(deq), skip_tokenizer_init=True) as ref:
            p = SamplingParams(max_tokens=8)
            assert llm.generate([5, 6, 7], p).outputs[0].token_ids == ref.generate([5, 6, 7], p).outputs[0].token_ids
            llm.save(tmp_path / "resaved")
        assert torch.allclose(model_logits(_model(tmp_path / "resaved"), IDS), model_logits(m_deq, IDS), atol=1e-4)
