"""Beam search: equal to transformers' `generate(num_beams=k)`, KV blocks shared and freed, and beam requests
running in the same steps as everything else (CPU, float32).

Stories260K runs with end_id = "." (426), so sentences end beams all the time and the finished-hypothesis
bookkeeping (length_penalty, early_stopping) decides the outputs; tiny random models with an end id picked
among their frequent tokens.
"""

from __future__ import annotations

import pytest
import torch

from quanta import LLM, SamplingParams
from quanta.llmapi import KvCacheConfig

DOT = 426  # "." in the stories260K vocab
STORY_PROMPTS = ["Once upon a time", "Lily and Tom went to the park", "The cat", "One day, a big dog"]
HF_EARLY_STOPPING = {0: False, 1: True, 2: "never", None: False, "never": "never"}  # True == 1, False == 0


def _hf_beams(model, prompts: list[list[int]], k: int, n: int, max_new: int, eos: int, lp=None, es=None):
    """transformers' beam search over all prompts in one (left-padded) batch -> per prompt [(tokens, score)]."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = {} if lp is None else {"length_penalty": lp}
    out = model.generate(ids, attention_mask=mask, num_beams=k, num_return_sequences=n, max_new_tokens=max_new,
                         do_sample=False, eos_token_id=eos, pad_token_id=0, early_stopping=HF_EARLY_STOPPING[es],
                         return_dict_in_generate=True, output_scores=True, **kw)
    lengths = (out.beam_indices != -1).sum(dim=1).tolist()
    seqs = [out.sequences[i, width : width + lengths[i]].tolist() for i in range(len(lengths))]
    scores = out.sequences_scores.tolist()
    return [list(zip(seqs[i * n : (i + 1) * n], scores[i * n : (i + 1) * n])) for i in range(len(prompts))]


def _check_same(outs, ref, lp):
    lp = 1.0 if lp is None else lp
    for o, r in zip(outs, ref):
        assert [c.token_ids for c in o.outputs] == [t for t, _ in r]
        for c, (_, score) in zip(o.outputs, r):
            assert c.cumulative_logprob / len(c.token_ids) ** lp == pytest.approx(score, abs=1e-4)


@pytest.fixture(scope="module")
def hf_stories(stories_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(stories_path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def beam_llm(stories_path):
    llm = LLM(str(stories_path), max_beam_width=8)
    yield llm
    llm.shutdown()


# k, n, length_penalty, early_stopping (TensorRT-LLM ints and HF spellings), max_tokens
STORY_CASES = [
    (2, 2, None, None, 24),  # the defaults: HF's length_penalty=1.0, early_stopping=False
    (4, 3, 1.0, 1, 24),  # 1 -> True
    (4, 4, 2.0, 2, 24),  # other ints -> "never"
    (8, 2, 0.0, 0, 20),
    (8, 8, -0.5, "never", 20),
    (8, 4, 1.5, True, 16),
]


@pytest.mark.parametrize(("k", "n", "lp", "es", "max_new"), STORY_CASES)
def test_stories260k_matches_hf(beam_llm, hf_stories, k, n, lp, es, max_new):
    tok = beam_llm.tokenizer
    prompts = [tok.encode(p) for p in STORY_PROMPTS]
    ref = _hf_beams(hf_stories, prompts, k, n, max_new, DOT, lp, es)
    params = SamplingParams(beam_width=k, n=n, max_tokens=max_new, end_id=DOT, length_penalty=lp, early_stopping=es)
    outs = beam_llm.generate(prompts, params, use_tqdm=False)  # all prompts in the same steps
    _check_same(outs, ref, lp)
    assert any(c.finish_reason == "stop" for o in outs for c in o.outputs)  # EOS hypotheses took part
    for o in outs:
        assert len(o.outputs) == n and [c.index for c in o.outputs] == list(range(n))
        assert o.outputs[0].text == tok.decode(o.outputs[0].token_ids, skip_special_tokens=True)


@pytest.mark.parametrize(("family", "k"), [("llama", 2), ("qwen2", 4), ("mistral", 8)])
def test_tiny_models_match_hf(tiny_model_factory, family, k):
    from transformers import AutoModelForCausalLM

    path = tiny_model_factory(family)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(k)
    prompts = [[1] + torch.randint(3, 512, (m,), generator=g).tolist() for m in (2, 6, 11, 17)]
    greedy = hf.generate(torch.tensor([prompts[0]]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    eos = torch.bincount(greedy[0, len(prompts[0]) :]).argmax().item()  # a frequent token ends beams
    ref = _hf_beams(hf, prompts, k, k, 16, eos, 1.0, False)
    with LLM(str(path), skip_tokenizer_init=True, max_beam_width=k) as llm:
        outs = llm.generate(prompts, SamplingParams(use_beam_search=True, n=k, max_tokens=16, end_id=eos),
                            use_tqdm=False)
    _check_same(outs, ref, 1.0)


def test_width_below_max_and_errors(beam_llm, stories_path):
    tok = beam_llm.tokenizer
    prompt = tok.encode(STORY_PROMPTS[0])
    out = beam_llm.generate(prompt, SamplingParams(beam_width=3, n=2, max_tokens=10), use_tqdm=False)
    assert len(out.outputs) == 2
    with pytest.raises(ValueError, match=r"beam_width: beam width 9 > max_beam_width=8"):
        beam_llm.generate(prompt, SamplingParams(beam_width=9), use_tqdm=False)
    with pytest.raises(ValueError, match=r"beam_width_array: beam width 9 > max_beam_width=8"):
        beam_llm.generate(prompt, SamplingParams(beam_width_array=[2, 9]), use_tqdm=False)
    with LLM(str(stories_path), max_beam_width=4, kv_cache_config=KvCacheConfig(max_tokens=256)) as small:
        with pytest.raises(ValueError, match=r"with 4 beams needs"):
            small.generate(prompt, SamplingParams(beam_width=4, max_tokens=100), use_tqdm=False)


# --- KV blocks ------------------------------------------------------------------------------------------


def test_kv_blocks_shared_then_freed(stories_path):
    """While a 4-beam request runs its full prompt blocks are held once (ref count = live beams); the last,
    partial prompt block is copied for each beam; pruned beams free at once; at the end usage is back."""
    bs, k = 4, 4
    llm = LLM(str(stories_path), max_beam_width=k,
              kv_cache_config=KvCacheConfig(tokens_per_block=bs, max_tokens=4096, enable_block_reuse=False))
    llm.shutdown()  # the engine is driven by hand below, synchronously
    engine, kv = llm.engine, llm.engine.kv
    base_used = kv.num_used_blocks
    prompt = llm.tokenizer.encode("Once upon a time there was a little girl named Lily")  # 13 tokens
    full = len(prompt) // bs
    req = llm._input.make_request(1000, None, prompt, SamplingParams(beam_width=k, max_tokens=12, end_id=-1))
    engine.add_request(req)
    prompt_blocks, seen_widths, done = None, [], False
    for _ in range(40):
        deltas = engine.step()
        if any(d.finished for d in deltas):
            done = True
            break
        live = [s for s in req.seqs if not s.is_finished]
        seen_widths.append(len(live))
        if prompt_blocks is None:
            prompt_blocks = live[0].block_ids[:full]
        union = {b for s in live for b in s.block_ids}
        for s in live:
            assert s.block_ids[:full] == prompt_blocks  # the same physical prompt blocks
        for b in prompt_blocks:
            assert kv.ref_counts[b] == len(live)  # counted once, referenced by every beam
        assert kv.num_used_blocks - base_used == len(union)  # nothing held outside the live beams
        assert len(union) < len(live) * -(-(len(prompt) + 12) // bs)  # less than k separate sequences
    assert done and seen_widths[0] == k
    assert kv.num_used_blocks == base_used and sum(kv.ref_counts) == 0
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_beam_width_array_schedule(stories_path):
    llm = LLM(str(stories_path), max_beam_width=4, kv_cache_config=KvCacheConfig(max_tokens=4096))
    ref = llm.generate("Once upon a time", SamplingParams(beam_width=4, n=2, max_tokens=10), use_tqdm=False)
    same = llm.generate("Once upon a time", SamplingParams(beam_width_array=[4], n=2, max_tokens=10),
                        use_tqdm=False)
    assert [c.token_ids for c in same.outputs] == [c.token_ids for c in ref.outputs]
    llm.shutdown()
    engine = llm.engine
    prompt = llm.tokenizer.encode("Once upon a time")
    req = llm._input.make_request(2000, None, prompt, SamplingParams(beam_width_array=[1, 2, 4, 3], n=2,
                                                                        max_tokens=8, end_id=-1))
    engine.add_request(req)
    widths = []
    while not req.is_finished:
        engine.step()
        if not req.is_finished:
            widths.append(len(req.seqs))
    assert widths == [1, 2, 4, 3, 3, 3, 3]
    assert engine.kv.num_used_blocks == 0


# --- beams among other requests --------------------------------------------------------------------------


def test_mixed_batch_same_as_alone(beam_llm):
    tok = beam_llm.tokenizer
    prompts = [tok.encode(p) for p in STORY_PROMPTS]
    params = [
        SamplingParams(beam_width=4, n=2, max_tokens=20, end_id=DOT),
        SamplingParams(max_tokens=20),  # greedy
        SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=20),
        SamplingParams(use_beam_search=True, best_of=3, n=1, max_tokens=14, length_penalty=0.5, logprobs=1),
    ]
    together = beam_llm.generate(prompts, params, use_tqdm=False)
    for p, sp, t in zip(prompts, params, together):
        alone = beam_llm.generate(p, sp, use_tqdm=False)
        assert [c.token_ids for c in t.outputs] == [c.token_ids for c in alone.outputs]
        assert [c.cumulative_logprob for c in t.outputs] == pytest.approx(
            [c.cumulative_logprob for c in alone.outputs], abs=1e-5)


def test_streaming_carries_the_best_beams(beam_llm):
    import asyncio

    prompt = "Lily and Tom went to the park"

    async def stream(params):
        states = []
        async for out in beam_llm.generate_async(prompt, params, streaming=True):
            states.append([(c.token_ids[:], c.text, c.finish_reason) for c in out.outputs])
        return states, out

    for params in (SamplingParams(beam_width=4, n=2, max_tokens=16, end_id=DOT),
                   SamplingParams(beam_width=4, n=2, max_tokens=8, end_id=-1)):
        final = beam_llm.generate(prompt, params, use_tqdm=False)
        states, out = asyncio.run(stream(params))
        assert len(states) == len(final.outputs[0].token_ids) if params.end_id == -1 else len(states) > 3
        assert all(len(s) == 2 for s in states)  # each update: the best n beams, finished or live
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in final.outputs]
        assert [c.text for c in out.outputs] == [c.text for c in final.outputs]
    # without an end id every update holds live beams, a token longer each step
    assert [len(s[0][0]) for s in states] == list(range(1, 9))
    assert all(s[0][2] is None for s in states[:-1]) and states[-1][0][2] == "length"


def test_abort_returns_the_best_so_far(beam_llm):
    fut = beam_llm.generate_async("Once upon a time", SamplingParams(beam_width=4, n=2, max_tokens=400,
                                                                     end_id=-1), streaming=True)
    for i, _ in enumerate(fut):
        if i == 3:
            fut.abort()
    res = fut.result()
    assert res.finished and len(res.outputs) == 2
    assert {c.finish_reason for c in res.outputs} == {"cancelled"}


# --- per-beam features ------------------------------------------------------------------------------------


def test_logprobs_and_cumulative_logprob(beam_llm):
    out = beam_llm.generate("The cat", SamplingParams(beam_width=4, n=3, max_tokens=12, end_id=DOT, logprobs=2),
                            use_tqdm=False)
    for c in out.outputs:
        assert len(c.logprobs) == len(c.token_ids)
        chosen = [d[t] for d, t in zip(c.logprobs, c.token_ids)]
        assert sum(lp.logprob for lp in chosen) == pytest.approx(c.cumulative_logprob, abs=1e-4)
        for d, t in zip(c.logprobs, c.token_ids):
            assert next(iter(d)) == t and 2 <= len(d) <= 3  # the chosen token first, then the top 2
            ranked = sorted(d.values(), key=lambda lp: lp.rank)
            assert all(a.logprob >= b.logprob for a, b in zip(ranked, ranked[1:]))


def test_stop_ids_strings_min_tokens_per_beam(beam_llm):
    base = dict(beam_width=4, n=4, max_tokens=20, end_id=2)
    by_end = beam_llm.generate("The cat", SamplingParams(**{**base, "end_id": DOT}), use_tqdm=False)
    by_id = beam_llm.generate("The cat", SamplingParams(**base, stop_token_ids=[DOT]), use_tqdm=False)
    assert [c.token_ids for c in by_id.outputs] == [c.token_ids for c in by_end.outputs]
    assert any(c.stop_reason == DOT for c in by_id.outputs)
    by_str = beam_llm.generate("The cat", SamplingParams(**base, stop="."), use_tqdm=False)
    assert [c.token_ids for c in by_str.outputs] == [c.token_ids for c in by_end.outputs]
    for c in by_str.outputs:
        assert "." not in c.text
        assert c.finish_reason == "length" or c.stop_reason == "."
    long = beam_llm.generate("The cat", SamplingParams(**{**base, "end_id": DOT}, min_tokens=9), use_tqdm=False)
    assert all(len(c.token_ids) >= 9 for c in long.outputs)
    assert all(DOT not in c.token_ids[:8] for c in long.outputs)
    short = beam_llm.generate("The cat", SamplingParams(**{**base, "max_tokens": 5}), use_tqdm=False)
    assert all(len(c.token_ids) == 5 and c.finish_reason == "length" for c in short.outputs)


def test_penalties_and_diversity_shape_the_beams(beam_llm):
    base = dict(beam_width=4, n=4, max_tokens=16, end_id=-1)
    plain = beam_llm.generate("The cat", SamplingParams(**base), use_tqdm=False)
    rep = beam_llm.generate("The cat", SamplingParams(**base, repetition_penalty=1.8, logprobs=0,
                                                      logprobs_mode="processed"), use_tqdm=False)
    assert [c.token_ids for c in rep.outputs] != [c.token_ids for c in plain.outputs]
    for c in rep.outputs:  # processed logprobs are what the beam score adds up
        chosen = sum(d[t].logprob for d, t in zip(c.logprobs, c.token_ids))
        assert chosen == pytest.approx(c.cumulative_logprob, abs=1e-4)
    zero = beam_llm.generate("The cat", SamplingParams(**base, beam_search_diversity_rate=0.0), use_tqdm=False)
    assert [c.token_ids for c in zero.outputs] == [c.token_ids for c in plain.outputs]
    diverse = beam_llm.generate("The cat", SamplingParams(**base, beam_search_diversity_rate=3.0), use_tqdm=False)
    assert [c.token_ids for c in diverse.outputs] != [c.token_ids for c in plain.outputs]


def test_chunked_prefill_and_tight_cache_give_the_same_beams(stories_path, beam_llm):
    tok = beam_llm.tokenizer
    prompts = [tok.encode(p * 3) for p in STORY_PROMPTS]
    params = SamplingParams(beam_width=4, n=2, max_tokens=16, end_id=DOT)
    ref = beam_llm.generate(prompts, params, use_tqdm=False)
    # chunked prefill of the first beam; and a cache that holds about one 4-beam request at a time
    with LLM(str(stories_path), max_beam_width=4, enable_chunked_prefill=True, max_num_tokens=16,
             kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=320)) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    for a, b in zip(outs, ref):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_many_beam_requests_in_a_tight_cache(stories_path, beam_llm):
    """Beam and greedy requests contend for a cache that holds about one 4-beam request: under
    MAX_UTILIZATION beams get preempted (and beams waiting for a preempted sibling give their blocks
    back), under GUARANTEED_NO_EVICT admission reserves every beam; the outputs never change."""
    from quanta.llmapi import CapacitySchedulerPolicy, SchedulerConfig

    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 512, (int(m),), generator=g).tolist() for m in torch.randint(5, 30, (8,), generator=g)]
    params = [SamplingParams(beam_width=4, n=2, max_tokens=24, end_id=DOT) if i % 2 == 0
              else SamplingParams(max_tokens=30) for i in range(8)]
    ref = beam_llm.generate(prompts, params, use_tqdm=False)
    for policy in (CapacitySchedulerPolicy.MAX_UTILIZATION, CapacitySchedulerPolicy.GUARANTEED_NO_EVICT):
        with LLM(str(stories_path), max_beam_width=4, max_batch_size=32,
                 kv_cache_config=KvCacheConfig(tokens_per_block=8, max_tokens=160),
                 scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy)) as llm:
            outs = llm.generate(prompts, params, use_tqdm=False)
            stats = llm.get_stats(timeout=0)
            if policy == CapacitySchedulerPolicy.GUARANTEED_NO_EVICT:  # (MAX_UTILIZATION: dozens, timing-dependent)
                assert stats[-1]["num_preemptions"] == 0
            assert max(s["num_scheduled_seqs"] for s in stats) <= 32
            assert llm.engine.kv.num_used_blocks == 0
        for a, b in zip(outs, ref):
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_batch_slots_count_every_beam(stories_path):
    """A 4-beam request takes 4 of max_batch_size=5 slots from admission on: no step runs more than 5."""
    with LLM(str(stories_path), max_beam_width=4, max_batch_size=5) as llm:
        params = [SamplingParams(beam_width=4, max_tokens=12)] + [SamplingParams(max_tokens=12)] * 4
        outs = llm.generate(["Once upon a time"] * 5, params, use_tqdm=False)
        assert all(o.finished for o in outs)
        assert max(s["num_scheduled_seqs"] for s in llm.get_stats(timeout=0)) <= 5
    with LLM(str(stories_path), max_beam_width=4, max_batch_size=3) as llm:
        with pytest.raises(ValueError, match=r"beam width 4 > max_batch_size=3"):
            llm.generate("a", SamplingParams(beam_width=4))


def test_early_stopping_mapping_and_hypotheses_bookkeeping():
    from quanta.engine.beam_search import BeamState, Hypothesis, hf_early_stopping

    assert [hf_early_stopping(v) for v in (None, 0, False, 1, True, 2, -1, 7, "never")] == \
        [False, False, False, True, True, "never", "never", "never", "never"]
    state = BeamState(widths=[2], capacity=2, length_penalty=2.0, early_stopping=False, diversity_rate=0.0,
                      max_new_tokens=8, candidates_per_beam=2, block_size=4)
    for cum, n in ((-4.0, 2), (-4.0, 4), (-1.0, 1), (-9.0, 3)):
        state.add(Hypothesis(list(range(n)), cum, state.score(cum, n), [], [], "", "stop", None))
    # scores -1, -0.25, -1, -1: the best two, the older first on a tie
    assert [(h.cumulative_logprob, len(h.token_ids)) for h in state.hyps] == [(-4.0, 4), (-4.0, 2)]
    assert [h.score for h in state.hyps] == [-0.25, -1.0]
