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
