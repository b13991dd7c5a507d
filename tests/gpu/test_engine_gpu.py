"""The whole engine on a GPU: float32 greedy == transformers; bf16 logits within bf16 tolerance;
CUDA graphs == eager."""

from __future__ import annotations

import pytest
import torch

from quanta import LLM, SamplingParams
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _prompts(n: int, vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [
        [1] + torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(1, 80, (n,), generator=g)
    ]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_float32_greedy_matches_hf(family, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / family, family)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda().eval()
    prompts = _prompts(8, hf.config.vocab_size)
    with LLM(str(path), skip_tokenizer_init=True, dtype="float32") as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=16, end_id=2), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ids = torch.tensor([p], device="cuda")
        ref = hf.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, eos_token_id=2, pad_token_id=0
        )[0, len(p) :].tolist()
        assert o.outputs[0].token_ids == ref


def test_bf16_logits_close(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_tiny_model(tmp_path / "llama", "llama")
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda().eval()
    prompt = _prompts(1, hf.config.vocab_size)[0]
    with LLM(str(path), skip_tokenizer_init=True, dtype="bfloat16") as llm:
        out = llm.generate(prompt, SamplingParams(max_tokens=1, return_context_logits=True))
    with torch.no_grad():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0].float().cpu()
    err = (out.context_logits - ref).norm() / ref.norm()
    assert err < 3e-2, err


def test_cuda_graph_equals_eager(tmp_path):
    path = make_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts(24, 512)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    results = []
    for eager in (True, False):
        with LLM(str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=eager) as llm:
            results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
    assert results[0] == results[1]


def test_overlap_scheduler_equals_sync(tmp_path):
    """Overlap scheduling (on by default on CUDA) == the synchronous loop: stop tokens, mixed lengths."""
    path = make_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts(24, 512)
    params = [SamplingParams(max_tokens=1 + (i * 5) % 29, stop_token_ids=[7, 11]) for i in range(len(prompts))]
    results = []
    for disable in (True, False):
        with LLM(str(path), skip_tokenizer_init=True, dtype="float32", disable_overlap_scheduler=disable) as llm:
            assert llm.engine.config.overlap_scheduler is not disable
            results.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                            for o in llm.generate(prompts, params, use_tqdm=False)])
    assert results[0] == results[1]


@pytest.mark.parametrize("overlap", [True, False])
def test_packed_inputs_equal(monkeypatch, tmp_path, overlap):
    """QUANTA_PACKED_INPUTS (two uploads a step, the block table only when it changed; CUDA graphs read the
    packed layout) == one buffer per input: mixed lengths, stop tokens, graph and eager steps."""
    path = make_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts(24, 512)
    params = [SamplingParams(max_tokens=1 + (i * 5) % 41, stop_token_ids=[7, 11]) for i in range(len(prompts))]
    results = []
    for packed in ("0", "1"):
        monkeypatch.setenv("QUANTA_PACKED_INPUTS", packed)
        with LLM(str(path), skip_tokenizer_init=True, dtype="float32", disable_overlap_scheduler=not overlap) as llm:
            assert llm.engine.runner.buffers.packed == (packed == "1")
            results.append([(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                            for o in llm.generate(prompts, params, use_tqdm=False)])
    assert results[0] == results[1]


@pytest.mark.parametrize("packed", ["0", "1"])
def test_graph_token_handoff_equal(monkeypatch, tmp_path, packed):
    """QUANTA_GRAPH_TOKENS (the graph's greedy kernels write the tokens to pinned host slots and the next input
    ids; worker/cuda_graph.py GraphTokens) == the copies it replaces == eager: one long sequence (the in-place
    steady state), then mixed lengths and stop tokens (rows that shift, graph and eager steps)."""
    monkeypatch.setenv("QUANTA_PACKED_INPUTS", packed)
    path = make_tiny_model(tmp_path / "llama", "llama")
    prompts = _prompts(24, 512)
    runs = [([prompts[0]], [SamplingParams(max_tokens=80, ignore_eos=True)]),
            (prompts, [SamplingParams(max_tokens=1 + (i * 5) % 41, stop_token_ids=[7, 11]) for i in range(24)])]
    results = []
    for on, eager in (("0", False), ("1", False), ("1", True)):
        monkeypatch.setenv("QUANTA_GRAPH_TOKENS", on)
        with LLM(str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=eager) as llm:
            graphs = llm.engine.runner.graphs
            assert (graphs is None) == eager and (eager or (graphs.tokens is not None) == (on == "1"))
            results.append([[(o.outputs[0].token_ids, o.outputs[0].finish_reason)
                             for o in llm.generate(p, sp, use_tqdm=False)] for p, sp in runs])
            if not eager and on == "1":
                assert graphs.tokens.replays > 80 and int(graphs.tokens.count[0]) == graphs.tokens.replays
    assert results[0] == results[1] == results[2]
