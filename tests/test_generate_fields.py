"""Every SamplingParams field, end to end through `LLM.generate` on stories260K: each test would fail if
its field were ignored.

Sampling filters are checked against the generation logits the engine returns: every sampled token must
lie inside the filtered set, and the same request without the filter must leave it (so the check bites).
"""

from __future__ import annotations

import pytest
import torch

from quanta import SamplingParams

ONCE = "Once upon a time"  # greedy: ", there was a little girl named Lily. She loved to play ..."
DOG = "The dog"  # greedy falls into a loop: repeated n-grams for the penalties to act on
TOM = "Tom saw a cat. Tom saw a cat. Tom saw a"  # greedy wants to repeat prompt tokens


@pytest.fixture(scope="module")
def gen(stories_llm):
    def run(prompt=ONCE, **kw):
        return stories_llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)

    return run


@pytest.fixture(scope="module")
def greedy(gen):
    """Greedy token ids of ONCE (24 tokens)."""
    return gen(ONCE, max_tokens=24).outputs[0].token_ids


def first(out):
    return out.outputs[0]


def ranks(token_ids, logits, temperature=1.0):
    """1-based rank of each token in its step's logits."""
    return [int((row > row[t]).sum()) + 1 for t, row in zip(token_ids, logits)]


def probs_of(token_ids, logits, temperature):
    """(prob of the token, max prob, mass of strictly more likely tokens) per step, at `temperature`."""
    out = []
    for t, row in zip(token_ids, logits):
        p = torch.softmax(row.double() / temperature, dim=-1)
        out.append((float(p[t]), float(p.max()), float(p[p > p[t]].sum())))
    return out


# --- lengths and ends -------------------------------------------------------------------------------


def test_max_tokens_and_finish_reason_length(gen, greedy):
    o = first(gen(max_tokens=5))
    assert o.token_ids == greedy[:5]
    assert o.finish_reason == "length" and o.stop_reason is None
    assert len(first(gen()).token_ids) == 32  # the default


def test_end_id_stops_with_finish_reason_stop(gen, greedy):
    end = greedy[3]
    o = first(gen(max_tokens=12, end_id=end))
    assert o.token_ids == greedy[:4]
    assert o.finish_reason == "stop" and o.stop_reason is None


def test_end_id_minus_1_means_no_end_token(gen, greedy):
    o = first(gen(max_tokens=12, end_id=-1, logits_processor=_force_eos_first))
    assert o.token_ids[0] == 2 and len(o.token_ids) == 12 and o.finish_reason == "length"
    o = first(gen(max_tokens=12, logits_processor=_force_eos_first))  # the tokenizer's EOS (2) stops
    assert o.token_ids == [2] and o.finish_reason == "stop"


def _force_eos_first(req_id, logits, token_ids, stream_ptr, client_id):
    if len(token_ids[0]) == 5:  # the first step after the 5-token prompt
        logits[:] = float("-inf")
        logits[..., 2] = 0.0


def test_pad_id_is_accepted(gen, greedy):
    o = first(gen(max_tokens=12, end_id=greedy[3], pad_id=0))
    assert o.token_ids == greedy[:4] and o.finish_reason == "stop"


def test_ignore_eos(gen, greedy):
    o = first(gen(max_tokens=12, end_id=greedy[3], ignore_eos=True))
    assert o.token_ids == greedy[:12]
    assert o.finish_reason == "length"


def test_min_tokens_bans_the_end_id_until_reached(gen, greedy):
    end = greedy[3]
    o = first(gen(max_tokens=12, end_id=end, min_tokens=6))
    assert len(o.token_ids) >= 6
    assert end not in o.token_ids[:5]
    assert o.token_ids[:3] == greedy[:3]


# --- greedy vs sampling -----------------------------------------------------------------------------


def test_temperature_samples_and_seed_reproduces(gen, greedy):
    outs = [first(gen(max_tokens=16, temperature=1.5, seed=s)).token_ids for s in range(4)]
    assert any(o != greedy[:16] for o in outs)
    assert len({tuple(o) for o in outs}) > 1  # different seeds, different samples
    assert first(gen(max_tokens=16, temperature=1.5, seed=2)).token_ids == outs[2]
    assert first(gen(max_tokens=16, temperature=0.0, seed=2)).token_ids == greedy[:16]  # 0 = greedy


def _sampled_with_logits(gen, **kw):
    o = first(gen(DOG, max_tokens=24, return_generation_logits=True, **kw))
    return o.token_ids, o.generation_logits


def test_top_k_keeps_sampled_tokens_in_the_top_k(gen):
    toks, logits = _sampled_with_logits(gen, temperature=2.0, seed=0)
    assert max(ranks(toks, logits)) > 3  # without top_k, tokens outside the top 3 come up
    toks, logits = _sampled_with_logits(gen, temperature=2.0, seed=0, top_k=3)
    assert max(ranks(toks, logits)) <= 3
    assert _sampled_with_logits(gen, temperature=2.0, seed=0, top_k=3)[0] == toks  # same seed


def test_top_p_keeps_sampled_tokens_in_the_nucleus(gen):
    toks, logits = _sampled_with_logits(gen, temperature=2.0, seed=0)
    assert max(before for _, _, before in probs_of(toks, logits, 2.0)) >= 0.5
    toks, logits = _sampled_with_logits(gen, temperature=2.0, seed=0, top_p=0.5)
    assert all(before < 0.5 for _, _, before in probs_of(toks, logits, 2.0))
    assert _sampled_with_logits(gen, temperature=2.0, seed=0, top_p=0.5)[0] == toks


def test_min_p_cuts_unlikely_tokens(gen):
    toks, logits = _sampled_with_logits(gen, temperature=2.0, seed=0)
    assert min(p / pmax for p, pmax, _ in probs_of(toks, logits, 2.0)) < 0.2
    toks, logits = _sampled_with_logits(gen, temperature=2.0, seed=0, min_p=0.2)
    assert all(p >= 0.2 * pmax * (1 - 1e-6) for p, pmax, _ in probs_of(toks, logits, 2.0))
    assert _sampled_with_logits(gen, temperature=2.0, seed=0, min_p=0.2)[0] == toks


def test_top_k_1_is_greedy(gen, greedy):
    assert first(gen(max_tokens=16, top_k=1, temperature=2.0, seed=3)).token_ids == greedy[:16]


def test_seed_is_batch_independent(stories_llm):
    seeded = SamplingParams(max_tokens=10, temperature=1.0, seed=42)
    alone = stories_llm.generate("The cat", seeded, use_tqdm=False).outputs[0].token_ids
    others = ["Once upon a time", "A", "The big red ball", "Lily", "Tom and", "x y z", "One day", "The sun"]
    params = [SamplingParams(max_tokens=10, temperature=1.0) for _ in others] + [seeded]
    outs = stories_llm.generate(others + ["The cat"], params, use_tqdm=False)
    assert outs[-1].outputs[0].token_ids == alone


def test_top_p_decay(gen):
    base = dict(temperature=2.0, seed=1, top_p=0.9)
    toks, logits = _sampled_with_logits(gen, **base)
    assert max(ranks(toks[8:], logits[8:])) > 1  # plain top_p=0.9 samples off the argmax late on
    toks, logits = _sampled_with_logits(gen, **base, top_p_decay=0.5, top_p_min=0.01)
    # top_p after k tokens: max(0.9 * 0.5**k, 0.01); from the 8th token on it keeps only the argmax
    tops = [max(0.9 * 0.5**k, 0.01) for k in range(len(toks))]
    assert all(before < tp for (_, _, before), tp in zip(probs_of(toks, logits, 2.0), tops))
    assert max(ranks(toks[8:], logits[8:])) == 1
    plain = _sampled_with_logits(gen, **base)[0]
    # top_p_min = top_p: no room to decay; every id a reset id: back to top_p after each token
    assert _sampled_with_logits(gen, **base, top_p_decay=0.5, top_p_min=0.9)[0] == plain
    assert _sampled_with_logits(gen, **base, top_p_decay=0.5, top_p_reset_ids=list(range(512)))[0] == plain


# --- penalties and bans -----------------------------------------------------------------------------


def _has_repeated_ngram(ids, n):
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("field", ["repetition_penalty", "presence_penalty", "frequency_penalty"])
def test_penalties_break_the_greedy_loop(gen, field):
    loop = first(gen(DOG, max_tokens=24)).token_ids
    assert _has_repeated_ngram(loop, 4)
    value = 1.5 if field == "repetition_penalty" else 2.0
    out = first(gen(DOG, max_tokens=24, **{field: value})).token_ids
    assert out != loop
    assert out[:16] == loop[:16]  # the same until the loop would start


def test_prompt_ignore_length(gen):
    base = first(gen(TOM, max_tokens=8)).token_ids
    n = len(gen(TOM, max_tokens=1).prompt_token_ids)
    # repetition counts the prompt: penalized unless the whole prompt is ignored
    assert first(gen(TOM, max_tokens=8, repetition_penalty=3.0)).token_ids != base
    assert first(gen(TOM, max_tokens=8, repetition_penalty=3.0, prompt_ignore_length=n)).token_ids == base
    # presence counts generated tokens only, unless prompt_ignore_length says which prompt part counts
    assert first(gen(TOM, max_tokens=8, presence_penalty=2.0)).token_ids == base
    assert first(gen(TOM, max_tokens=8, presence_penalty=2.0, prompt_ignore_length=0)).token_ids != base


def test_no_repeat_ngram_size(gen):
    loop = first(gen(DOG, max_tokens=24)).token_ids
    assert _has_repeated_ngram(loop, 2)
    out = gen(DOG, max_tokens=24, no_repeat_ngram_size=2)
    assert not _has_repeated_ngram(out.prompt_token_ids + first(out).token_ids, 2)


def test_bad_words(gen, stories_llm):
    assert "girl" in first(gen(max_tokens=24)).text
    o = first(gen(max_tokens=24, bad=["girl"]))
    assert "girl" not in o.text
    assert o.text.startswith(", there was a little ")


def test_bad_token_ids(gen, greedy):
    banned = greedy[3]
    o = first(gen(max_tokens=24, bad_token_ids=[banned]))
    assert banned not in o.token_ids
    assert o.token_ids[:3] == greedy[:3]


def test_embedding_bias(gen):
    bias = torch.zeros(512)
    bias[300] = 100.0
    assert first(gen(max_tokens=5, embedding_bias=bias)).token_ids == [300] * 5


def test_logits_processor_edits_in_place_with_trtllm_arguments(gen):
    calls = []

    def force_77(req_id, logits, token_ids, stream_ptr, client_id):
        calls.append((req_id, tuple(logits.shape), list(token_ids[0]), stream_ptr, client_id))
        logits[:] = float("-inf")
        logits[..., 77] = 0.0

    out = gen(max_tokens=3, logits_processor=force_77)
    assert first(out).token_ids == [77, 77, 77]
    prompt = out.prompt_token_ids
    assert [c[2] for c in calls] == [prompt, prompt + [77], prompt + [77, 77]]
    assert all(c[0] == out.request_id and c[1] == (1, 1, 512) and c[3] is None for c in calls)

    # a list of callables runs in order
    def ban_77(req_id, logits, token_ids, stream_ptr, client_id):
        logits[..., 77] = float("-inf")

    assert 77 not in first(gen(max_tokens=3, logits_processor=[force_77, ban_77])).token_ids


# --- stops ------------------------------------------------------------------------------------------


def test_stop_string_is_cut_and_reported(gen, greedy):
    o = first(gen(max_tokens=30, stop="girl"))
    assert o.text == ", there was a little "
    assert o.finish_reason == "stop" and o.stop_reason == "girl"
    assert len(o.token_ids) < 30
    o = first(gen(max_tokens=30, stop=["named", "little"]))  # the earliest match wins
    assert o.text == ", there was a " and o.stop_reason == "little"


def test_include_stop_str_in_output(gen):
    o = first(gen(max_tokens=30, stop="girl", include_stop_str_in_output=True))
    assert o.text == ", there was a little girl"
    assert o.finish_reason == "stop" and o.stop_reason == "girl"


def test_stop_string_works_without_detokenize(gen):
    ref = first(gen(max_tokens=30, stop="girl"))
    o = first(gen(max_tokens=30, stop="girl", detokenize=False))
    assert o.text == "" and o.token_ids == ref.token_ids and o.stop_reason == "girl"


def test_stop_token_ids(gen, greedy):
    o = first(gen(max_tokens=30, stop_token_ids=[greedy[3]]))
    assert o.token_ids == greedy[:4]
    assert o.finish_reason == "stop" and o.stop_reason == greedy[3]
    assert o.text == ", there was"  # the stop token's text is left out ...
    o = first(gen(max_tokens=30, stop_token_ids=[greedy[3]], include_stop_str_in_output=True))
    assert o.text == ", there was a"  # ... unless asked for


def test_min_tokens_holds_back_stop_strings(gen):
    assert first(gen(max_tokens=30, stop=",")).text == ""  # the very first token holds a ','
    o = first(gen(max_tokens=30, stop=",", min_tokens=5))
    # the first ',' came before min_tokens: the next one stops the request (and the text is whole)
    assert o.text == ", there was a little girl named Lily. She loved to play outside in the park. One day"
    assert o.finish_reason == "stop" and o.stop_reason == ","


# --- several outputs --------------------------------------------------------------------------------


def test_n_outputs(gen):
    out = gen(max_tokens=8, n=3, temperature=2.0, seed=5)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert all(len(c.token_ids) == 8 for c in out.outputs)


def test_best_of_returns_the_top_n_by_cumulative_logprob(gen):
    every = gen(max_tokens=8, n=5, temperature=2.0, seed=5, logprobs=0).outputs
    top = sorted(every, key=lambda c: c.cumulative_logprob, reverse=True)[:2]
    best = gen(max_tokens=8, n=2, best_of=5, temperature=2.0, seed=5, logprobs=0).outputs
    assert [c.token_ids for c in best] == [c.token_ids for c in top]
    assert [c.index for c in best] == [0, 1]
    assert best[0].cumulative_logprob >= best[1].cumulative_logprob
    assert best[0].cumulative_logprob == pytest.approx(top[0].cumulative_logprob, abs=1e-4)


def test_best_of_under_streaming_yields_the_same_top_n(stories_llm, gen):
    sp = SamplingParams(max_tokens=8, n=2, best_of=4, temperature=2.0, seed=5)
    states = [
        [(c.index, c.text_diff, c.token_ids_diff) for c in s.outputs]
        for s in stories_llm.generate_async(ONCE, sp, streaming=True)
    ]
    final = stories_llm.generate(ONCE, sp, use_tqdm=False).outputs
    assert len(states[-1]) == 2
    for i, c in enumerate(final):
        assert "".join(d[1] for s in states for d in s if d[0] == i) == c.text
        assert [t for s in states for d in s if d[0] == i for t in d[2]] == c.token_ids


# --- logprobs and logits ----------------------------------------------------------------------------


def test_logprobs_top_k_plus_sampled_with_ranks(gen):
    o = first(gen(DOG, max_tokens=6, logprobs=2, temperature=2.0, seed=0, return_generation_logits=True))
    assert len(o.logprobs) == 6
    total = 0.0
    for tok, entry, row in zip(o.token_ids, o.logprobs, o.generation_logits):
        ref = torch.log_softmax(row.double(), dim=-1)  # 'raw': before temperature
        assert next(iter(entry)) == tok  # the sampled token first
        top2 = ref.topk(2).indices.tolist()
        assert set(entry) == set(top2) | {tok}
        for t, lp in entry.items():
            assert lp.logprob == pytest.approx(float(ref[t]), abs=1e-4)
            assert lp.rank == int((ref > ref[t]).sum()) + 1
        total += entry[tok].logprob
    assert o.cumulative_logprob == pytest.approx(total, abs=1e-4)
    assert first(gen(max_tokens=3)).logprobs == [] and first(gen(max_tokens=3)).cumulative_logprob is None
    only = first(gen(max_tokens=3, logprobs=0)).logprobs  # 0: the sampled token only
    assert [len(e) for e in only] == [1, 1, 1]


def test_prompt_logprobs(gen):
    out = gen(max_tokens=2, prompt_logprobs=1, return_context_logits=True)
    lps = first(out).prompt_logprobs
    ids = out.prompt_token_ids
    assert len(lps) == len(ids) and lps[0] is None
    ref = torch.log_softmax(out.context_logits.double(), dim=-1)
    for pos in range(1, len(ids)):
        entry = lps[pos]
        assert ids[pos] in entry
        assert entry[ids[pos]].logprob == pytest.approx(float(ref[pos - 1, ids[pos]]), abs=1e-4)
        assert ref[pos - 1].argmax().item() in entry  # + the top 1
    assert first(gen(max_tokens=2)).prompt_logprobs == []


def test_logprobs_mode_raw_vs_processed(gen):
    kw = dict(max_tokens=4, logprobs=0, temperature=0.5, seed=1, return_generation_logits=True)
    raw = first(gen(DOG, **kw))
    proc = first(gen(DOG, logprobs_mode="processed", **kw))
    assert raw.token_ids == proc.token_ids
    for tok, r, p, row in zip(raw.token_ids, raw.logprobs, proc.logprobs, raw.generation_logits):
        assert r[tok].logprob == pytest.approx(float(torch.log_softmax(row.double(), -1)[tok]), abs=1e-4)
        assert p[tok].logprob == pytest.approx(float(torch.log_softmax(row.double() / 0.5, -1)[tok]), abs=1e-4)
    assert raw.cumulative_logprob != pytest.approx(proc.cumulative_logprob, abs=1e-3)


def test_context_and_generation_logits(gen, greedy):
    out = gen(max_tokens=5, return_context_logits=True, return_generation_logits=True)
    o = first(out)
    assert out.context_logits.shape == (len(out.prompt_token_ids), 512)
    assert o.generation_logits.shape == (5, 512)
    assert o.generation_logits.argmax(-1).tolist() == greedy[:5]  # greedy: the logits' argmax
    # the last prompt position predicts the first output token
    assert torch.allclose(out.context_logits[-1], o.generation_logits[0], atol=1e-4)
    plain = gen(max_tokens=2)
    assert plain.context_logits is None and first(plain).generation_logits is None


# --- input and output shaping -----------------------------------------------------------------------


def test_exclude_input_from_output_false_returns_prompt_and_output(gen, greedy):
    out = gen(max_tokens=6, exclude_input_from_output=False)
    o = first(out)
    assert o.token_ids == out.prompt_token_ids + greedy[:6]
    assert o.text == ONCE + first(gen(max_tokens=6)).text
    o = first(gen(max_tokens=30, stop="time", exclude_input_from_output=False))
    assert o.finish_reason == "length"  # a stop string inside the prompt does not count


def test_detokenize_false(gen, greedy):
    o = first(gen(max_tokens=6, detokenize=False))
    assert o.text == "" and o.token_ids == greedy[:6]


def test_add_special_tokens_false_drops_bos(gen, stories_llm):
    bos = stories_llm.tokenizer.bos_token_id
    assert gen(max_tokens=1).prompt_token_ids[0] == bos
    ids = gen(max_tokens=1, add_special_tokens=False).prompt_token_ids
    assert bos not in ids
    assert ids == gen(max_tokens=1).prompt_token_ids[1:]


def test_skip_special_tokens(gen, stories_llm):
    forced = [300, 1, 2, 301]  # a word piece, <s>, </s>, a word piece

    def force(req_id, logits, token_ids, *rest):
        n = len(token_ids[0]) - len(stories_llm.tokenizer.encode(ONCE))
        logits[:] = float("-inf")
        logits[..., forced[n]] = 0.0

    kw = dict(max_tokens=4, logits_processor=force, ignore_eos=True)
    shown = first(gen(**kw, skip_special_tokens=False))
    hidden = first(gen(**kw))
    assert shown.token_ids == hidden.token_ids == forced
    assert "<s>" in shown.text and "</s>" in shown.text
    assert "<s>" not in hidden.text and "</s>" not in hidden.text


def test_truncate_prompt_tokens_keeps_the_last_n(gen, stories_llm):
    full = gen(max_tokens=1).prompt_token_ids
    out = gen(max_tokens=6, truncate_prompt_tokens=2)
    assert out.prompt_token_ids == full[-2:]
    same = stories_llm.generate(full[-2:], SamplingParams(max_tokens=6), use_tqdm=False)
    assert first(out).token_ids == first(same).token_ids


def test_finish_reason_stop_vs_length(gen, greedy):
    assert first(gen(max_tokens=4)).finish_reason == "length"
    assert first(gen(max_tokens=30, stop="Lily")).finish_reason == "stop"
    assert first(gen(max_tokens=30, stop_token_ids=[greedy[5]])).finish_reason == "stop"


def test_request_output_fields(gen):
    out = gen(max_tokens=3)
    assert out.finished and out.prompt == ONCE
    o = first(out)
    assert o.index == 0 and o.length == 3 and o.text
