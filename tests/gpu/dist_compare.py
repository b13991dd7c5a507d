"""Comparing two engines' next-token distributions (GPU tests of kernels that round differently)."""

from __future__ import annotations


def compare_steps(got, want) -> tuple[int, float]:
    """(steps compared, largest logprob difference) of two completions' top-k logprobs, step by step while their
    greedy tokens agree (near-ties of dummy weights may flip a token); each step shares >= 6 of its top tokens."""
    worst, steps = 0.0, 0
    for tok_a, tok_b, lp_a, lp_b in zip(got.token_ids, want.token_ids, got.logprobs, want.logprobs):
        common = set(lp_a) & set(lp_b)
        assert len(common) >= 6
        worst = max(worst, max(abs(lp_a[t].logprob - lp_b[t].logprob) for t in common))
        steps += 1
        if tok_a != tok_b:
            break
    return steps, worst


def count_inits(monkeypatch, cls) -> list:
    """A list that grows by one each time `cls` is built (its __init__ wrapped for the test): did a path run?"""
    calls = []
    real = cls.__init__

    def counting(self, *a, **kw):
        calls.append(1)
        real(self, *a, **kw)

    monkeypatch.setattr(cls, "__init__", counting)
    return calls


def tiny_llama(tmp_path) -> str:
    """A 3-layer Llama config (hidden 1024, bf16) written to tmp_path, for dummy-weight engines."""
    import json

    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=4, vocab_size=512,
               max_position_embeddings=512, rms_norm_eps=1e-5, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
    path = tmp_path / "llama-1024.json"
    path.write_text(json.dumps(cfg))
    return str(path)
