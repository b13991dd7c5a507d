"""LoRA adapters: outputs equal the peft library's, mixed batches, cache eviction, prefix isolation, bad adapters.

Adapters are made here with peft (random A and B of several ranks, saved with save_pretrained); references
are PeftModel on transformers, greedy, float32, CPU. The Triton kernels (fused, shrink + expand) are checked
against their PyTorch twin under TRITON_INTERPRET=1 in tests/test_kernels_interpret.py (LORA_CASES).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

HERE = Path(__file__).resolve().parent
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, rank, target modules, extra peft LoraConfig kwargs): several ranks, subsets, rsLoRA, alpha_pattern
ADAPTERS = [
    ("all_r4", 4, ALL, {}),
    ("qv_r16_rslora", 16, ["q_proj", "v_proj"], {"use_rslora": True}),
    ("mix_r8_pattern", 8, ["k_proj", "o_proj", "up_proj", "down_proj"], {"alpha_pattern": {"down_proj": 4}}),
    ("mlp_r2", 2, ["gate_proj", "up_proj"], {"lora_alpha": 7}),
]


# ---------------------------------------------------------------- helpers
def make_adapter(base: Path, folder: Path, rank: int, targets: list[str], seed: int, std: float = 0.25,
                 **kw) -> Path:
    """A PEFT adapter of `base` with random A and B (peft's B starts at zero), saved as PEFT saves it."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    kw.setdefault("lora_alpha", 2 * rank)
    model = get_peft_model(hf, PeftLoraConfig(r=rank, target_modules=targets, lora_dropout=0.0, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    model.save_pretrained(str(folder))
    return folder


class PeftRef:
    """Greedy tokens and logits of PeftModel(base, adapter) (adapter None: the base model)."""

    def __init__(self, base: Path, adapter: Path | None, device: str = "cpu"):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        self.model = (PeftModel.from_pretrained(hf, str(adapter)) if adapter is not None else hf).to(device).eval()
        self.device = device

    @torch.no_grad()
    def greedy(self, prompt: list[int], max_new: int) -> tuple[list[int], torch.Tensor]:
        ids = torch.tensor([prompt], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                  do_sample=False, eos_token_id=2, pad_token_id=0)
        tokens = out[0, len(prompt):].tolist()
        logits = self.model(input_ids=out).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)].float().cpu()
        return tokens, logits


def prompts(n: int, vocab: int = 512, seed: int = 0, lens=(1, 4, 9, 23, 40, 6, 15, 31)) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (lens[i % len(lens)] - 1,), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_factory) -> Path:
    return tiny_model_factory("llama")


@pytest.fixture(scope="module")
def tiny_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_adapters")
    return {name: make_adapter(tiny_llama, root / name, r, t, seed=i, **kw)
            for i, (name, r, t, kw) in enumerate(ADAPTERS)}


def _llm(path, **kw):
    from quanta import LLM

    kw.setdefault("max_batch_size", 32)
    return LLM(str(path), skip_tokenizer_init=True, **kw)


def _params(max_new: int = 10, logits: bool = False):
    from quanta import SamplingParams

    return SamplingParams(max_tokens=max_new, end_id=2, return_generation_logits=logits)


# ---------------------------------------------------------------- against peft
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_matches_peft_tiny(family, tiny_model_factory, tmp_path):
    """Each adapter (ranks 2..16, subsets of the 7 projections, rsLoRA, alpha_pattern) and the base model,
    all in ONE batch: tokens equal PeftModel's greedy tokens, logits within 1e-4."""
    from quanta.llmapi import LoraConfig, LoRARequest

    base = tiny_model_factory(family)
    paths = [make_adapter(base, tmp_path / name, r, t, seed=10 + i, **kw) for i, (name, r, t, kw) in enumerate(ADAPTERS)]
    reqs = [LoRARequest(f"a{i}", i + 1, str(p)) for i, p in enumerate(paths)] + [None]
    ps = prompts(len(reqs) * 2, seed=3)
    lora_list = reqs * 2
    with _llm(base, lora_config=LoraConfig(max_lora_rank=16, max_loras=len(paths))) as llm:
        outs = llm.generate(ps, _params(8, logits=True), lora_request=lora_list, use_tqdm=False)
    refs = {None: PeftRef(base, None)}
    for p in paths:
        refs[str(p)] = PeftRef(base, p)
    differs = 0
    for prompt, lr, out in zip(ps, lora_list, outs):
        tokens, logits = refs[lr.lora_path if lr else None].greedy(prompt, 8)
        got = out.outputs[0]
        assert got.token_ids == tokens, f"{family} adapter {lr and lr.lora_name} prompt len {len(prompt)}"
        torch.testing.assert_close(got.generation_logits, logits, atol=1e-4, rtol=1e-4)
        if lr is not None:
            base_tokens, _ = refs[None].greedy(prompt, 8)
            differs += base_tokens != tokens
    assert differs >= len(paths), "the adapters should change the outputs"


def test_matches_peft_stories260k(stories_path, tmp_path):
    from quanta import LLM, SamplingParams
    from quanta.llmapi import LoraConfig, LoRARequest

    a = make_adapter(stories_path, tmp_path / "a", 8, ALL, seed=1, std=0.1)
    b = make_adapter(stories_path, tmp_path / "b", 2, ["q_proj", "v_proj", "down_proj"], seed=2, std=0.3)
    ps = prompts(4, seed=5)
    params = SamplingParams(max_tokens=16, end_id=2, return_generation_logits=True)
    with LLM(str(stories_path), lora_config=LoraConfig(lora_dir=[str(a)], max_lora_rank=8, max_loras=2)) as llm:
        reqs = [LoRARequest("a", 1, str(a)), LoRARequest("b", 2, str(b))] * 2
        outs = llm.generate(ps, params, lora_request=reqs, use_tqdm=False)
        text = llm.generate("Once upon a time", SamplingParams(max_tokens=12), lora_request=reqs[0]).outputs[0]
    ref = {str(a): PeftRef(stories_path, a), str(b): PeftRef(stories_path, b)}
    for prompt, lr, out in zip(ps, reqs, outs):
        tokens, logits = ref[lr.lora_path].greedy(prompt, 16)
        assert out.outputs[0].token_ids == tokens
        torch.testing.assert_close(out.outputs[0].generation_logits, logits, atol=1e-4, rtol=1e-4)
    assert text.text and text.token_ids


# ---------------------------------------------------------------- mixing, caches, prefix isolation
def test_mixed_batch_equals_alone(stories_path, tmp_path):
    """3 adapters and the base model in one batch: each request gets the tokens it gets alone."""
    from quanta import SamplingParams
    from quanta.llmapi import LoraConfig, LoRARequest

    specs = [(2, ["q_proj", "k_proj"]), (8, ALL), (16, ["o_proj", "gate_proj", "down_proj"])]
    reqs = [LoRARequest(f"m{i}", 100 + i, str(make_adapter(stories_path, tmp_path / f"m{i}", r, t, seed=20 + i,
                                                           std=0.15)))
            for i, (r, t) in enumerate(specs)]
    order = [reqs[0], None, reqs[1], reqs[2], reqs[1], None, reqs[0], reqs[2], reqs[2], reqs[0]]
    ps = prompts(len(order), seed=7)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    with _llm(stories_path, lora_config=LoraConfig(max_lora_rank=16, max_loras=3)) as llm:
        batch = llm.generate(ps, params, lora_request=order, use_tqdm=False)
        alone = [llm.generate(p, params, lora_request=lr) for p, lr in zip(ps, order)]
        base_alone = [llm.generate(p, params) for p in ps]
        async_out = llm.generate_async(ps[2], params, lora_request=order[2]).result(timeout=60)
    for i, (b, a) in enumerate(zip(batch, alone)):
        assert b.outputs[0].token_ids == a.outputs[0].token_ids, f"request {i}"
    assert async_out.outputs[0].token_ids == alone[2].outputs[0].token_ids
    changed = sum(a.outputs[0].token_ids != b.outputs[0].token_ids for a, b, lr in zip(alone, base_alone, order) if lr)
    assert changed >= 4, "the adapters should change the outputs"


def test_eviction_more_adapters_than_slots(tiny_llama, tiny_adapters):
    """max_loras=2 device slots, max_cpu_loras=2 host adapters, 4 adapters in one generate call (twice):
    the scheduler admits at most 2 distinct adapters at a time, slots and host entries are evicted and
    reloaded, and every output still equals peft's."""
    from quanta.llmapi import LoraConfig, LoRARequest

    names = list(tiny_adapters)
    reqs = [LoRARequest(n, 7 + i, str(tiny_adapters[n])) for i, n in enumerate(names)]
    order = [reqs[i % 4] for i in range(8)] + [None]
    ps = prompts(len(order), seed=11)
    with _llm(tiny_llama, lora_config=LoraConfig(max_lora_rank=16, max_loras=2, max_cpu_loras=2)) as llm:
        manager = llm.engine.runner.lora
        first = llm.generate(ps, _params(8), lora_request=order, use_tqdm=False)
        assert len(manager.host_cached_ids) <= 2
        second = llm.generate(ps[::-1], _params(8), lora_request=order[::-1], use_tqdm=False)
        stats = dict(manager.stats)
        assert len(manager.device_slots) <= 2
    assert stats["device_evictions"] > 0 and stats["device_loads"] >= 4
    refs = {str(p): PeftRef(tiny_llama, p) for p in tiny_adapters.values()}
    refs[None] = PeftRef(tiny_llama, None)
    for prompt, lr, out in list(zip(ps, order, first)) + list(zip(ps[::-1], order[::-1], second)):
        tokens, _ = refs[lr.lora_path if lr else None].greedy(prompt, 8)
        assert out.outputs[0].token_ids == tokens


def test_slot_cache_never_evicts_adapters_in_use(tiny_llama, tiny_adapters):
    """Unit view of the device cache: LRU victims are only adapters no running sequence uses; the
    admission gate keeps distinct running adapters within max_loras."""
    from quanta.llmapi import LoraConfig, LoRARequest

    with _llm(tiny_llama, lora_config=LoraConfig(max_lora_rank=16, max_loras=2)) as llm:
        m = llm.engine.runner.lora
        ads = [m.resolve(LoRARequest(n, 50 + i, str(p))) for i, (n, p) in enumerate(tiny_adapters.items())]

        def seq(ad):
            return SimpleNamespace(request=SimpleNamespace(lora_adapter=ad))

        running = [seq(ads[0]), seq(None)]
        m.scheduler = SimpleNamespace(running=running)
        assert m.can_admit(seq(ads[1]), running) and m.can_admit(seq(None), running)
        running.append(seq(ads[1]))
        assert not m.can_admit(seq(ads[2]), running) and m.can_admit(seq(ads[0]), running)
        s0 = m._slot_for(ads[0], {ads[0].id})
        s1 = m._slot_for(ads[1], {ads[1].id})
        assert s0 != s1
        with pytest.raises(RuntimeError):  # both slots hold adapters of running sequences
            m._slot_for(ads[2], {ads[2].id})
        running.pop()  # ads[1]'s request finished: its slot is the one reused
        assert m._slot_for(ads[2], {ads[2].id}) == s1
        assert m.device_slots == {ads[0].id: s0, ads[2].id: s1}
        layer = next(iter(m.layers.values()))
        assert torch.count_nonzero(layer.lora_a[s1]) > 0
        m.scheduler = llm.engine.scheduler


def test_prefix_reuse_never_crosses_adapters(tiny_llama, tiny_adapters):
    from quanta.llmapi import KvCacheConfig, LoraConfig, LoRARequest

    a = LoRARequest("a", 1, str(tiny_adapters["all_r4"]))
    b = LoRARequest("b", 2, str(tiny_adapters["qv_r16_rslora"]))
    prompt = prompts(1, seed=13, lens=(70,))[0]
    with _llm(tiny_llama, lora_config=LoraConfig(max_lora_rank=16, max_loras=2),
              kv_cache_config=KvCacheConfig(tokens_per_block=16, enable_block_reuse=True, max_tokens=4096)) as llm:
        kv = llm.engine.kv
        if not hasattr(kv, "lookup"):
            pytest.skip("prefix caching is not in place")

        def run(lr):
            before = kv.stats.reused_tokens
            out = llm.generate(prompt, _params(6), lora_request=lr)
            return out.outputs[0].token_ids, kv.stats.reused_tokens - before

        base_tokens, _ = run(None)
        a_tokens, a_reused = run(a)
        b_tokens, b_reused = run(b)
        a2_tokens, a2_reused = run(a)
        base2_tokens, base2_reused = run(None)
    assert a_reused == 0 and b_reused == 0, "blocks computed without / under another adapter were reused"
    assert a2_reused > 0 and base2_reused > 0, "same adapter (or none): the prefix is reused"
    assert a2_tokens == a_tokens and base2_tokens == base_tokens
    for lr, got in ((a, a_tokens), (b, b_tokens)):
        assert got == PeftRef(tiny_llama, Path(lr.lora_path)).greedy(prompt, 6)[0]


# ---------------------------------------------------------------- bad adapters, configuration
def _copy_with(src: Path, dst: Path, tensors=None, config_update=None, drop=()) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors(load_file(str(src / "adapter_model.safetensors"))), str(dst / "adapter_model.safetensors"))
    if config_update:
        cfg = json.loads((src / "adapter_config.json").read_text())
        cfg.update(config_update)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    for name in drop:
        (dst / name).unlink()
    return dst


def test_bad_adapters_clear_errors_engine_keeps_serving(tiny_llama, tiny_adapters, tmp_path):
    from quanta.llmapi import LoraConfig, LoRARequest

    good_path = tiny_adapters["qv_r16_rslora"]
    src = make_adapter(tiny_llama, tmp_path / "src", 4, ALL[:-1], seed=5)  # no down_proj: fits this engine

    def rename(old, new):
        return lambda t: {k.replace(old, new): v for k, v in t.items()}

    def widen(t):
        return {k: (torch.randn(v.shape[0], 48) if "q_proj.lora_A" in k else v) for k, v in t.items()}

    big = make_adapter(tiny_llama, tmp_path / "big", 32, ["q_proj"], seed=3)
    cases = [
        ("/nonexistent/adapter", "does not exist"),
        (_copy_with(src, tmp_path / "nocfg", drop=["adapter_config.json"]), "adapter_config.json is missing"),
        (_copy_with(src, tmp_path / "nowts", drop=["adapter_model.safetensors"]), "adapter_model.safetensors is missing"),
        (big, "above max_lora_rank=16"),
        (_copy_with(src, tmp_path / "fc1", tensors=rename("mlp.up_proj", "mlp.fc1")), "applies LoRA only to"),
        (_copy_with(src, tmp_path / "deep", tensors=rename("layers.1.", "layers.7.")), "has 2 layers"),
        (_copy_with(src, tmp_path / "wide", tensors=widen), "do not fit the base model"),
        (_copy_with(src, tmp_path / "dora", config_update={"use_dora": True}), "DoRA"),
        (tiny_adapters["all_r4"], "does not apply LoRA to"),  # down_proj, which this engine leaves out
    ]
    p = prompts(1, seed=17)[0]
    # TensorRT-LLM module names: every projection but down_proj (mlp_4h_to_h)
    targets = ["attn_q", "attn_k", "attn_v", "attn_dense", "mlp_h_to_4h", "mlp_gate"]
    with _llm(tiny_llama, lora_config=LoraConfig(max_lora_rank=16, max_loras=2, lora_target_modules=targets)) as llm:
        good = LoRARequest("good", 1, str(good_path))
        expected = llm.generate(p, _params(), lora_request=good).outputs[0].token_ids
        for i, (path, message) in enumerate(cases):
            with pytest.raises(ValueError, match=message):
                llm.generate(p, _params(), lora_request=LoRARequest(f"bad{i}", 200 + i, str(path)))
        with pytest.raises(ValueError, match="already names the adapter"):
            llm.generate(p, _params(), lora_request=LoRARequest("other", 1, str(src)))
        with pytest.raises(ValueError, match="must be a LoRARequest"):
            llm.generate(p, _params(), lora_request="adapter")
        with pytest.raises(ValueError, match="does not exist"):  # one bad request in a batch: none run
            llm.generate([p, p], _params(), lora_request=[good, LoRARequest("x", 300, "/nope")])
        with pytest.raises(ValueError, match="lora_request values for"):
            llm.generate([p, p], _params(), lora_request=[good])
        after = llm.generate([p, p], _params(), lora_request=[good, None], use_tqdm=False)
    assert after[0].outputs[0].token_ids == expected
    assert expected == PeftRef(tiny_llama, good_path).greedy(p, 10)[0]
    assert after[1].outputs[0].token_ids == PeftRef(tiny_llama, None).greedy(p, 10)[0]


def test_lora_request_needs_lora_enabled(tiny_llama, tiny_adapters):
    from quanta.llmapi import LoRARequest

    with _llm(tiny_llama) as llm:
        with pytest.raises(ValueError, match="LoRA is not enabled"):
            llm.generate([1, 5], _params(), lora_request=LoRARequest("a", 1, str(tiny_adapters["all_r4"])))
        assert llm.generate([1, 5], _params()).outputs[0].token_ids


def test_config_and_api_surface(tiny_llama, tiny_adapters):
    from quanta.config import PeftCacheConfig
    from quanta.llmapi import LoraConfig, LoRARequest
    from quanta.lora_manager import LoraConfig as TrtPathLoraConfig

    assert TrtPathLoraConfig is LoraConfig
    import quanta.llmapi

    assert {"LoraConfig", "LoRARequest"} <= set(quanta.llmapi.__all__)
    for bad in (dict(max_lora_rank=0), dict(max_loras=0), dict(lora_ckpt_source="nemo"),
                dict(lora_target_modules=["attn_qq"]), dict(lora_dir=[3])):
        with pytest.raises(ValueError):
            LoraConfig(**bad)
    assert LoraConfig(lora_target_modules=["attn_qkv", "mlp_4h_to_h"]).hf_target_modules == [
        "q_proj", "k_proj", "v_proj", "down_proj"]
    r = LoRARequest("n", 3, "/x")
    assert (r.adapter_id, r.name, r.path, r.ckpt_source) == (3, "n", "/x", "hf")
    with pytest.raises(ValueError):
        LoRARequest("n", "3", "/x")
    # enable_lora + dict configs; lora_dir sets the target modules; peft_cache_config sizes the caches
    lora_dir = str(tiny_adapters["qv_r16_rslora"])
    peft = PeftCacheConfig(num_device_module_layer=2 * 3 * 2, num_host_module_layer=5 * 3 * 2)
    with _llm(tiny_llama, enable_lora=True, lora_config={"lora_dir": [lora_dir], "max_lora_rank": 16},
              peft_cache_config=peft) as llm:
        m = llm.engine.runner.lora
        assert sorted(m.layers) == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]
        assert (m.num_slots, m.max_cpu_loras) == (2, 5)
        out = llm.generate([1, 5, 9], _params(), lora_request=LoRARequest("q", 4, lora_dir))
        assert out.outputs[0].token_ids == PeftRef(tiny_llama, Path(lora_dir)).greedy([1, 5, 9], 10)[0]
    with pytest.raises(ValueError, match="lora_config must be a LoraConfig"):
        _llm(tiny_llama, lora_config=3)


# ---------------------------------------------------------------- the batched product
def _naive(y, x, a, b, slots, splits, rank):
    y = y.clone()
    bounds = list(zip((0, *splits), (*splits, y.shape[1])))
    for t in range(x.shape[0]):
        s = int(slots[t])
        if s < 0:
            continue
        for i, (c0, c1) in enumerate(bounds):
            y[t, c0:c1] += (x[t] @ a[s, i * rank : (i + 1) * rank].T) @ b[s, c0:c1].T
    return y


# (tokens, in, slots, rank, output splits, out): merged q|k|v and gate|up, plain, split-K (in 2100), shards
# not a multiple of 16; case 4 has no token with an adapter
PRODUCT_CASES = [(9, 64, 3, 8, (), 48), (37, 40, 4, 16, (32, 48), 64), (11, 2100, 3, 8, (16,), 40),
                 (5, 24, 2, 4, (24,), 48), (70, 64, 3, 8, (20, 36), 52), (6, 32, 2, 16, (), 32)]


def _product_case(i, case):
    from quanta.kernels.lora import make_lora_meta

    t, k, s, r, splits, o = case
    g = torch.Generator().manual_seed(i)
    x = torch.randn(t, k, generator=g)
    a = torch.randn(s, (len(splits) + 1) * r, k, generator=g)
    b = torch.randn(s, o, r, generator=g)
    slots = torch.randint(-1, s, (t,), generator=g, dtype=torch.int32)
    if i == 4:
        slots.fill_(-1)  # no token has an adapter
    y = torch.randn(t, o, generator=g)
    return x, a, b, y, slots, make_lora_meta(slots, s), splits, r


def test_twin_matches_naive():
    from quanta.kernels.lora_fused import lora_apply_ref

    for i, case in enumerate(PRODUCT_CASES):
        x, a, b, y, slots, meta, splits, r = _product_case(i, case)
        got = lora_apply_ref(y.clone(), x, a, b, meta, splits)
        torch.testing.assert_close(got, _naive(y, x, a, b, slots, splits, r), atol=1e-4, rtol=1e-4)
