"""Greedy tokens identical to transformers' generate and logits within 1e-4 (float32, CPU)."""

from __future__ import annotations

import pytest
import torch

from quanta import LLM, SamplingParams

from .conftest import TINY_FAMILIES

PROMPT_LENS = [1, 3, 5, 8, 13, 21, 34, 40]


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, vocab, (n - 1,), generator=g).tolist() for n in PROMPT_LENS]


def _hf_greedy(model, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                         eos_token_id=2, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _check_model(path, max_new: int = 12):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    prompts = _prompts(hf.config.vocab_size)
    with LLM(str(path), skip_tokenizer_init=True, max_batch_size=64) as llm:
        params = SamplingParams(max_tokens=max_new, end_id=2, return_context_logits=True,
                                return_generation_logits=True)
        outs = llm.generate(prompts, params, use_tqdm=False)  # all 8 run together
    for prompt, out in zip(prompts, outs):
        ref = _hf_greedy(hf, prompt, max_new)
        assert out.outputs[0].token_ids == ref, f"prompt len {len(prompt)}"
        with torch.no_grad():
            full = torch.tensor([prompt + out.outputs[0].token_ids])
            ref_logits = hf(full).logits[0].float()
        n = len(prompt)
        torch.testing.assert_close(out.context_logits, ref_logits[:n], atol=1e-4, rtol=1e-4)
        gen = out.outputs[0].generation_logits  # logits that produced each output token
        torch.testing.assert_close(gen, ref_logits[n - 1 : n - 1 + gen.shape[0]], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_family_matches_hf(family, tiny_model_factory):
    _check_model(tiny_model_factory(family))


def test_stories260k_matches_hf(stories_path):
    _check_model(stories_path, max_new=24)


def test_stories260k_text(stories_llm):
    out = stories_llm.generate("Once upon a time", SamplingParams(max_tokens=20))
    assert out.outputs[0].text.startswith(", there was a little girl named Lily")


def test_batch_invariance(stories_llm):
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(3, 512, (int(n),), generator=g).tolist()
               for n in torch.randint(1, 60, (32,), generator=g)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    batch = stories_llm.generate(prompts, params, use_tqdm=False)
    for p, b in zip(prompts, batch):
        alone = stories_llm.generate(p, params)
        assert alone.outputs[0].token_ids == b.outputs[0].token_ids


def test_quanta_tiny_matches_hf():
    """The embedded model: same greedy tokens and logits as transformers (loaded in float32 on the CPU)."""
    from quanta.assets import ASSETS, DEFAULT_MODEL

    _check_model(ASSETS / DEFAULT_MODEL, max_new=16)


def test_quanta_tiny_story():
    from quanta.assets import ASSETS, DEFAULT_MODEL

    with LLM(str(ASSETS / DEFAULT_MODEL), max_batch_size=8) as llm:
        text = llm.generate("Once upon a time", SamplingParams(max_tokens=24)).outputs[0].text
    assert text.startswith(", there was a little girl named Lily")
