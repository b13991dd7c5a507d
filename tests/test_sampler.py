"""Sampler: distributions, seeds, every processing field, logprobs; CPU, small vocab."""

from __future__ import annotations

import pytest
import torch

from quanta.sampling.sampler import Sampler, make_generator
from quanta.sampling.topk_topp import current_top_p
from quanta.sampling.types import SamplingRow
from quanta.sampling_params import SamplingParams

VOCAB = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 0.8])  # distinct values, no ties
NEG_INF = float("-inf")


def make_row(params=None, prompt=(), output=(), eos=(VOCAB - 1,), **kw) -> SamplingRow:
    params = params if params is not None else SamplingParams()
    return SamplingRow(
        request_id=kw.pop("request_id", 0),
        params=params,
        prompt_token_ids=list(prompt),
        output_token_ids=list(output),
        eos_token_ids=list(eos),
        **kw,
    )


def batch_logits(num_rows: int, logits: torch.Tensor = LOGITS) -> torch.Tensor:
    return logits.unsqueeze(0).expand(num_rows, -1).contiguous()


def reference_probs(logits, temperature=None, top_k=None, top_p=None, min_p=None):
    """Plain per-token reference: temperature, top-k, top-p, min-p, renormalize."""
    x = logits / (temperature or 1.0)
    order = sorted(range(len(x)), key=lambda i: -float(x[i]))
    keep = set(order[: top_k or len(x)])
    probs = torch.softmax(x, 0)
    if top_p is not None:
        kept = [i for i in order if i in keep]
        mass = sum(float(probs[i]) for i in kept)
        cum, head = 0.0, set()
        for i in kept:
            head.add(i)
            cum += float(probs[i]) / mass
            if cum >= top_p:
                break
        keep = head
    if min_p is not None:
        top = max(float(probs[i]) for i in keep)
        keep = {i for i in keep if float(probs[i]) >= min_p * top}
    out = torch.zeros(len(x))
    for i in keep:
        out[i] = probs[i]
    return out / out.sum()


def empirical(tokens: torch.Tensor) -> torch.Tensor:
    return torch.bincount(tokens, minlength=VOCAB).float() / tokens.numel()


def processed_logprobs(params: SamplingParams, logits=LOGITS, **row_kw) -> torch.Tensor:
    """The row's full 'processed' logprob vector, read back through the logprobs outputs."""
    params.logprobs, params.logprobs_mode = VOCAB, "processed"
    out = Sampler()(logits.unsqueeze(0).clone(), [make_row(params, **row_kw)])
    full = torch.full((VOCAB,), NEG_INF)
    full[out.topk_ids[0]] = out.topk_logprobs[0]
    return full


# ---- distributions ----

KNOBS = [
    dict(temperature=0.7),
    dict(temperature=1.0, top_k=3),
    dict(top_p=0.8),
    dict(min_p=0.3),
    dict(temperature=1.3, top_k=5, top_p=0.9, min_p=0.05),
    dict(temperature=0.5, top_p=0.6),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=[str(k) for k in KNOBS])
def test_frequencies_match_filtered_softmax(knobs):
    torch.manual_seed(0)
    num_rows = 50_000
    rows = [make_row(SamplingParams(**knobs))] * num_rows
    out = Sampler()(batch_logits(num_rows), rows)
    expected = reference_probs(LOGITS, **knobs)
    freqs = empirical(out.token_ids)
    assert (freqs - expected).abs().max() < 0.01
    assert torch.all(freqs[expected == 0] == 0)  # cut tokens are never drawn


def test_seeded_rows_follow_the_distribution():
    knobs = dict(temperature=0.9, top_k=6)
    rows = [make_row(SamplingParams(seed=s, **knobs), generator=make_generator(s, "cpu")) for s in range(20_000)]
    out = Sampler()(batch_logits(len(rows)), rows)
    assert (empirical(out.token_ids) - reference_probs(LOGITS, **knobs)).abs().max() < 0.015


def test_mixed_knobs_in_one_batch():
    torch.manual_seed(1)
    per = 30_000
    knobs_a, knobs_b = dict(top_k=2), dict(top_p=0.5, temperature=2.0)
    rows = [make_row(SamplingParams(**knobs_a))] * per + [make_row(SamplingParams(**knobs_b))] * per
    rows += [make_row(SamplingParams())] * 10  # greedy rows mixed in
    out = Sampler()(batch_logits(len(rows)), rows)
    assert (empirical(out.token_ids[:per]) - reference_probs(LOGITS, **knobs_a)).abs().max() < 0.01
    assert (empirical(out.token_ids[per : 2 * per]) - reference_probs(LOGITS, **knobs_b)).abs().max() < 0.01
    assert torch.all(out.token_ids[2 * per :] == 0)


# ---- seeds ----


def _seeded_run(seed: int, others: int, position: int, steps: int = 6) -> list[int]:
    """Tokens of one seeded row over several steps, with `others` unseeded/seeded rows around it."""
    torch.manual_seed(1000 + others)
    params = SamplingParams(seed=seed, temperature=1.2, top_p=0.95)
    row = make_row(params, generator=make_generator(seed, "cpu"))
    tokens = []
    for step in range(steps):
        neighbours = [
            make_row(
                SamplingParams(temperature=1.0, seed=j) if j % 2 else SamplingParams(top_k=4),
                generator=make_generator(j, "cpu") if j % 2 else None,
            )
            for j in range(others)
        ]
        rows = neighbours[:position] + [row] + neighbours[position:]
        logits = torch.randn(len(rows), VOCAB, generator=torch.Generator().manual_seed(step))
        logits[min(position, others)] = LOGITS * 0.3  # the seeded row's logits are fixed
        out = Sampler()(logits, rows)
        token = int(out.token_ids[min(position, others)])
        row.output_token_ids.append(token)
        tokens.append(token)
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    alone = _seeded_run(seed=42, others=0, position=0)
    assert _seeded_run(seed=42, others=5, position=2) == alone
    assert _seeded_run(seed=42, others=17, position=17) == alone
    other_seeds = {tuple(_seeded_run(seed=s, others=3, position=1)) for s in range(5)}
    assert len(other_seeds) > 1  # the seed matters


def test_make_generator():
    assert make_generator(None, "cpu") is None
    a = make_generator(7, "cpu")
    b = make_generator(7, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    c = make_generator(7, "cpu", seq_index=1)
    assert not torch.equal(torch.rand(4, generator=c), torch.rand(4, generator=make_generator(7, "cpu")))
    make_generator(-1, "cpu")  # negative seeds are accepted (wrap modulo 2**64)


# ---- greedy ----


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(temperature=0.0, top_p=0.5), SamplingParams(top_k=1, temperature=5.0)],
)
def test_greedy_rows_take_argmax(params):
    torch.manual_seed(0)
    logits = torch.randn(64, VOCAB)
    out = Sampler()(logits, [make_row(params)] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.sampled_ranks is None and out.topk_ids is None
    assert torch.allclose(out.sampled_logprobs, logits.log_softmax(-1).max(-1).values)


def test_sampler_leaves_input_logits_untouched():
    logits = batch_logits(3)
    before = logits.clone()
    params = SamplingParams(temperature=0.5, top_k=2, repetition_penalty=2.0, bad_token_ids=[0])
    Sampler()(logits, [make_row(params, prompt=[1, 2])] * 3)
    assert torch.equal(logits, before)


# ---- penalties ----


def test_repetition_penalty():
    logits = torch.tensor([2.0, -1.0, 1.0, 0.5, -2.0, 0.0, 0.3, 0.1])
    lp = processed_logprobs(SamplingParams(repetition_penalty=2.0), logits, prompt=[0, 1], output=[5, 0])
    expected = logits.clone()
    expected[0], expected[1] = 1.0, -2.0  # positive: / 2, negative: * 2; 5 is 0.0 either way
    assert torch.allclose(lp, expected.log_softmax(0), atol=1e-6)


def test_presence_and_frequency_penalties_count_output_only():
    lp = processed_logprobs(
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25),
        prompt=[3, 3, 4],
        output=[1, 1, 2],
    )
    expected = LOGITS.clone()
    expected[1] -= 0.5 + 0.25 * 2
    expected[2] -= 0.5 + 0.25
    assert torch.allclose(lp, expected.log_softmax(0), atol=1e-6)


def test_prompt_ignore_length():
    logits = torch.tensor([2.0, 1.0, 1.5, 0.5, 0.2, 0.0, 0.3, 0.1])
    # Repetition: the first 2 prompt tokens (0, 1) are ignored; 2 (prompt) and 3 (output) count.
    lp = processed_logprobs(
        SamplingParams(repetition_penalty=2.0, prompt_ignore_length=2),
        logits,
        prompt=[0, 1, 2],
        output=[3],
    )
    expected = logits.clone()
    expected[2], expected[3] = 0.75, 0.25
    assert torch.allclose(lp, expected.log_softmax(0), atol=1e-6)
    # Presence/frequency: with prompt_ignore_length set, the prompt after the head counts too.
    lp = processed_logprobs(
        SamplingParams(presence_penalty=1.0, frequency_penalty=0.5, prompt_ignore_length=1),
        logits,
        prompt=[0, 4, 4],
        output=[4, 5],
    )
    expected = logits.clone()
    expected[4] -= 1.0 + 0.5 * 3
    expected[5] -= 1.0 + 0.5
    assert torch.allclose(lp, expected.log_softmax(0), atol=1e-6)
    # ...and without it, only the output counts (token 0 unpenalized in both cases).
    lp = processed_logprobs(SamplingParams(presence_penalty=1.0), logits, prompt=[0, 4, 4], output=[5])
    expected = logits.clone()
    expected[5] -= 1.0
    assert torch.allclose(lp, expected.log_softmax(0), atol=1e-6)


# ---- bans ----


def test_bad_words_multi_and_single_token():
    bad = [[4], [1, 2], [3, 6, 0]]
    lp = processed_logprobs(SamplingParams(), prompt=[5, 1], bad_words_ids=bad)
    assert torch.isneginf(lp[[2, 4]]).all() and torch.isfinite(lp[[0, 1, 3, 5, 6, 7]]).all()
    lp = processed_logprobs(SamplingParams(), prompt=[5, 3], output=[6], bad_words_ids=bad)
    assert torch.isneginf(lp[[0, 4]]).all() and torch.isfinite(lp[[1, 2, 3, 5, 6, 7]]).all()
    # The greedy pick moves off the banned argmax.
    out = Sampler()(LOGITS.unsqueeze(0), [make_row(prompt=[3, 6], bad_words_ids=bad)])
    assert int(out.token_ids[0]) == 1


def test_bad_token_ids():
    lp = processed_logprobs(SamplingParams(bad_token_ids=[0, 7]))
    assert torch.isneginf(lp[[0, 7]]).all() and torch.isfinite(lp[1:7]).all()


@pytest.mark.parametrize(
    ("size", "prompt", "output", "banned"),
    [
        (2, [1, 2, 3, 1], [], {2}),
        (2, [1, 2], [3, 1, 4, 1], {2, 4}),
        (3, [1, 2, 3], [1, 2], {3}),
        (3, [1, 2, 3], [2, 1], set()),
        (1, [5], [6, 5], {5, 6}),
    ],
)
def test_no_repeat_ngram_size(size, prompt, output, banned):
    lp = processed_logprobs(SamplingParams(no_repeat_ngram_size=size), prompt=prompt, output=output)
    assert {i for i in range(VOCAB) if torch.isneginf(lp[i])} == banned


def test_no_repeat_ngram_cache_follows_the_sequence():
    row = make_row(SamplingParams(no_repeat_ngram_size=2), prompt=[1, 2])
    sampler = Sampler()
    seen_bans = []
    for token in [3, 1, 5, 3]:
        out = sampler(LOGITS.unsqueeze(0), [row])
        seen_bans.append(int(out.token_ids[0]))
        row.output_token_ids.append(token)
    # seq [1,2,3,1,5,3] -> tail (3,) was followed by 1 -> 1 banned
    lp_row = make_row(
        SamplingParams(no_repeat_ngram_size=2, logprobs=VOCAB, logprobs_mode="processed"),
        prompt=[1, 2],
        output=[3, 1, 5, 3],
    )
    lp_row.state = row.state  # reuse the incrementally built table
    out = sampler(LOGITS.unsqueeze(0), [lp_row])
    full = torch.full((VOCAB,), NEG_INF)
    full[out.topk_ids[0]] = out.topk_logprobs[0]
    assert {i for i in range(VOCAB) if torch.isneginf(full[i])} == {1}
    row.output_token_ids[:] = [7, 7]  # another history (e.g. a beam): the cache must rebuild
    assert (
        processed_logprobs(SamplingParams(no_repeat_ngram_size=2), prompt=[1, 2], output=[7, 7], state=row.state)[7]
        == NEG_INF
    )


def test_min_tokens_bans_eos_and_stop_ids():
    params = SamplingParams(min_tokens=3)
    lp = processed_logprobs(params, output=[1], eos=[0], stop_token_ids=[5])
    assert torch.isneginf(lp[[0, 5]]).all() and torch.isfinite(lp[[1, 2, 3, 4, 6, 7]]).all()
    lp = processed_logprobs(SamplingParams(min_tokens=3), output=[1, 2, 3], eos=[0], stop_token_ids=[5])
    assert torch.isfinite(lp).all()
    # ignore_eos: the engine never stops at EOS, so EOS is not banned (stop ids still are).
    lp = processed_logprobs(SamplingParams(min_tokens=3, ignore_eos=True), output=[1], eos=[0], stop_token_ids=[5])
    assert torch.isfinite(lp[0]) and torch.isneginf(lp[5])


# ---- bias and processors ----


def test_embedding_bias():
    bias = torch.zeros(VOCAB)
    bias[6] = 10.0
    out = Sampler()(LOGITS.unsqueeze(0), [make_row(SamplingParams(embedding_bias=bias))])
    assert int(out.token_ids[0]) == 6
    lp = processed_logprobs(SamplingParams(embedding_bias=bias))
    assert torch.allclose(lp, (LOGITS + bias).log_softmax(0), atol=1e-6)
    short = torch.tensor([0.0, 0.0, 5.0])  # a bias over the tokenizer's vocab only
    lp = processed_logprobs(SamplingParams(embedding_bias=short))
    assert torch.allclose(lp[2], (LOGITS + torch.nn.functional.pad(short, (0, 5))).log_softmax(0)[2])


def test_logits_processor_signature_and_in_place_edit():
    calls = []

    def force_five(req_id, logits, token_ids, stream_ptr, client_id):
        calls.append((req_id, tuple(logits.shape), token_ids, stream_ptr, client_id))
        logits[..., 5] = 100.0

    def ban_five_four_args(req_id, logits, token_ids, stream_ptr):
        logits[:, :, 5] = NEG_INF

    params = SamplingParams(logits_processor=force_five, temperature=1.0)
    row = make_row(params, prompt=[1, 2], output=[3], request_id=17)
    out = Sampler()(batch_logits(2), [make_row(SamplingParams()), row])
    assert out.token_ids.tolist() == [0, 5]
    assert calls == [(17, (1, 1, VOCAB), [[1, 2, 3]], None, None)]
    # A list runs in order: force 5, then the 4-argument one bans it again.
    params = SamplingParams(logits_processor=[force_five, ban_five_four_args])
    out = Sampler()(LOGITS.unsqueeze(0), [make_row(params)])
    assert int(out.token_ids[0]) == 0


# ---- top-p decay ----


def test_top_p_decay_state():
    params = SamplingParams(top_p=0.9, top_p_decay=0.5, top_p_min=0.2, top_p_reset_ids=[7])
    row = make_row(params)
    expected = [0.9, 0.45, 0.225, 0.2, 0.9, 0.45]  # the 4th generated token (7) resets
    for step, token in enumerate([1, 2, 3, 7, 1]):
        assert current_top_p(row) == pytest.approx(expected[step])
        row.output_token_ids.append(token)
    assert current_top_p(row) == pytest.approx(expected[5])
    fresh = make_row(params, output=row.output_token_ids)  # from scratch gives the same
    assert current_top_p(fresh) == pytest.approx(expected[5])
    assert current_top_p(make_row(SamplingParams(top_p=0.7), output=[1, 2])) == 0.7


def test_top_p_decay_changes_sampling():
    torch.manual_seed(0)
    params = SamplingParams(top_p=0.9, top_p_decay=0.1, top_p_min=0.05, top_p_reset_ids=7)
    num_rows = 2000
    decayed = [make_row(params, output=[1, 2]) for _ in range(num_rows)]
    reset = [make_row(params, output=[1, 7]) for _ in range(num_rows)]
    out = Sampler()(batch_logits(2 * num_rows), decayed + reset)
    assert torch.all(out.token_ids[:num_rows] == 0)  # top_p 0.05: only the top token survives
    assert len(set(out.token_ids[num_rows:].tolist())) > 3  # reset to 0.9: diverse
