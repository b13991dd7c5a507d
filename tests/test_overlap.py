"""Overlap scheduling (step N+1 launched before step N's tokens are read) gives exactly the outputs of the
synchronous engine: tokens, text, finish reasons, streamed deltas; with EOS and stop strings (a sequence
that finished runs once more for nothing), max_tokens (held, never overrun), preemption under a small cache,
chunked prefill, prefix reuse, aborts in flight, and requests that need the synchronous path mixed in."""

from __future__ import annotations

import asyncio
import random

import pytest

from quanta import LLM, SamplingParams
from quanta.llmapi import KvCacheConfig

rng = random.Random(0)
PROMPTS = [[1] + [rng.randrange(10, 500) for _ in range(rng.randrange(1, 40))] for _ in range(24)]


STORY_STARTS = ["Once upon a time", "The little dog", "Tom and Sue went", "One day, a bird", "Lily had a",
                "The sun was", "Max wanted to", "There was a big"]


def run(path, jobs, **kw):
    """jobs: [(prompts, params)] run one after the other on one engine."""
    res = []
    with LLM(str(path), **kw) as llm:
        assert llm.engine.config.overlap_scheduler == (kw.get("disable_overlap_scheduler") is False)
        for prompts, params in jobs:
            outs = llm.generate(prompts, params, use_tqdm=False)
            res.append([(o.outputs[0].token_ids, o.outputs[0].text, o.outputs[0].finish_reason) for o in outs])
        assert llm.engine.kv.num_used_blocks == 0 and not llm.engine.scheduler.hold
    return res


def both(path, jobs, **kw):
    sync = run(path, jobs, disable_overlap_scheduler=True, **kw)
    over = run(path, jobs, disable_overlap_scheduler=False, **kw)
    assert over == sync
    return sync


@pytest.mark.timeout(300)
def test_overlap_equals_sync_lengths_eos_stops(stories_path):
    jobs = [
        # mixed max_tokens: sequences leave the batch at different steps
        (PROMPTS, [SamplingParams(max_tokens=1 + (i * 7) % 23, ignore_eos=True) for i in range(len(PROMPTS))]),
        # a stop token (handled as EOS: 426 is '.') and stop strings: a finished sequence ran once more for nothing
        (STORY_STARTS, SamplingParams(max_tokens=60, stop_token_ids=[426])),
        (STORY_STARTS, SamplingParams(max_tokens=60, stop=["."])),
    ]
    _, eos, stops = both(stories_path, jobs)
    assert any(r[2] == "stop" for r in eos) and any(r[2] == "stop" for r in stops)


@pytest.mark.timeout(300)
def test_overlap_equals_sync_small_cache_chunked_reuse(stories_path):
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    # preemption: a cache far smaller than the batch needs
    both(stories_path, [(PROMPTS, params)], kv_cache_config=KvCacheConfig(max_tokens=256, tokens_per_block=16),
         max_batch_size=8)
    # chunked prefill + prefix reuse, prompts sharing a prefix (twice: the second run hits the cache)
    shared = PROMPTS[0] * 4
    prompts = [shared + p[1:] for p in PROMPTS[:10]]
    both(stories_path, [(prompts, params), (prompts, params)], enable_chunked_prefill=True, max_num_tokens=64,
         kv_cache_config=KvCacheConfig(enable_block_reuse=True, tokens_per_block=16))


@pytest.mark.timeout(300)
def test_overlap_mixed_with_sync_requests_and_streaming(stories_path):
    plain = SamplingParams(max_tokens=30, ignore_eos=True)
    sampled = SamplingParams(max_tokens=30, ignore_eos=True, temperature=0.8, seed=3)
    with LLM(str(stories_path), disable_overlap_scheduler=True) as llm:
        ref_plain = [o.outputs[0].token_ids for o in llm.generate(PROMPTS[:8], plain, use_tqdm=False)]
        ref_sampled = llm.generate(PROMPTS[8], sampled).outputs[0].token_ids

    async def go(llm):
        async def stream(p):
            ids = []
            async for out in llm.generate_async(p, plain, streaming=True):
                ids.extend(out.outputs[0].token_ids_diff)
            return ids

        tasks = [asyncio.create_task(stream(p)) for p in PROMPTS[:8]]
        await asyncio.sleep(0.05)  # a request that needs the synchronous path arrives mid-way
        other = await llm.generate_async(PROMPTS[8], sampled)
        return await asyncio.gather(*tasks), other.outputs[0].token_ids

    with LLM(str(stories_path), disable_overlap_scheduler=False) as llm:
        streamed, other = asyncio.run(go(llm))
        assert streamed == ref_plain
        assert other == ref_sampled
        # abort while a token is in flight: the rest continue, nothing leaks
        futs = [llm.generate_async(p, SamplingParams(max_tokens=200, ignore_eos=True)) for p in PROMPTS[:6]]
        futs[2].abort()
        outs = [f.result(timeout=60) for f in futs]
        assert outs[2].outputs[0].finish_reason == "cancelled"
        assert all(o.outputs[0].finish_reason == "length" for i, o in enumerate(outs) if i != 2)
        engine = llm.engine
        llm.generate(PROMPTS[0], plain)
        assert engine.kv.num_used_blocks == 0 and not engine.scheduler.hold


def test_fed_in_place_only_for_the_same_rows_in_flight():
    """worker/pending.fed_in_place: the input ids come from the graph's own hand-over only when every scheduled
    sequence's token is in flight from a hand-over step, in the row it was sampled in."""
    from types import SimpleNamespace as NS

    from quanta.worker.pending import PendingStep, fed_in_place

    a, b, c = (NS(seq_id=i, pending_token=True) for i in range(3))

    def step(*seqs):
        return NS(scheduled=[NS(seq=s) for s in seqs])

    prev = PendingStep(step(a, b), [a, b], None, None, None, None, {0: 0, 1: 1}, handoff=(None, 1))
    assert fed_in_place(step(a, b), prev) and fed_in_place(step(a), prev)
    assert not fed_in_place(step(b), prev)  # a finished: b moved up a row
    assert not fed_in_place(step(a, b, c), prev)  # a new sequence joined
    assert not fed_in_place(step(a, b), None)
    copied = PendingStep(step(a, b), [a, b], None, None, None, None, {0: 0, 1: 1})  # tokens came back by copy
    assert not fed_in_place(step(a, b), copied)
    b.pending_token = False  # its token is known on the host
    assert not fed_in_place(step(a, b), prev)
