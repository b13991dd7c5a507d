"""The control plane on the CPU, no model: exact asserts on the KV block manager and the scheduler.

Sequences are the engine's own `Sequence` over a fake request (only `params.max_tokens` and `max_seq_len`
are read); a "step" here is schedule -> update -> append one fake token to each sequence that samples.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from quanta.config import CapacitySchedulerPolicy, EngineConfig
from quanta.engine.kv_cache import KVCacheManager
from quanta.engine.request import Sequence, SequenceStatus
from quanta.engine.scheduler import Scheduler

BS = 4  # tokens per block in every test
_ids = itertools.count()


def make_seq(num_prompt: int, max_tokens: int = 8, max_seq_len: int = 1024) -> Sequence:
    request = SimpleNamespace(params=SimpleNamespace(max_tokens=max_tokens), max_seq_len=max_seq_len)
    return Sequence(
        seq_id=next(_ids), request=request, index=0, token_ids=list(range(num_prompt)), num_prompt_tokens=num_prompt
    )


def make_scheduler(
    num_blocks: int = 64,
    max_num_tokens: int = 64,
    max_batch_size: int = 8,
    chunked: bool = False,
    policy: CapacitySchedulerPolicy = CapacitySchedulerPolicy.GUARANTEED_NO_EVICT,
) -> Scheduler:
    config = EngineConfig(
        max_batch_size=max_batch_size,
        max_num_tokens=max_num_tokens,
        max_seq_len=1024,
        max_input_len=1024,
        max_beam_width=1,
        tokens_per_block=BS,
        num_kv_blocks=num_blocks,
        enable_chunked_prefill=chunked,
        scheduler_policy=policy,
    )
    return Scheduler(config, KVCacheManager(num_blocks, BS))


def step(sched: Scheduler):
    """One engine step without a model: each sampling sequence gets token 7; max_tokens finishes it."""
    out = sched.schedule()
    sched.update(out)
    for s in out.scheduled:
        if s.do_sample:
            s.seq.token_ids.append(7)
            if s.seq.num_output_tokens >= s.seq.request.params.max_tokens:
                sched.finish(s.seq, "length")
    return out


def plan(out) -> list[tuple[int, int, bool]]:
    """(seq_id, num_new_tokens, do_sample) per scheduled sequence, in order."""
    return [(s.seq.seq_id, s.num_new_tokens, s.do_sample) for s in out.scheduled]


# ---------------------------------------------------------------------------------------------------
# KVCacheManager
# ---------------------------------------------------------------------------------------------------


def test_allocate_slots_takes_blocks_in_order_and_only_when_needed():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    seq = make_seq(5)
    assert kv.num_new_blocks(seq, 5) == 2
    assert kv.allocate_slots(seq, 5)
    assert seq.block_ids == [0, 1]
    assert kv.ref_counts[:3] == [1, 1, 0]
    assert (kv.num_free_blocks, kv.num_used_blocks) == (6, 2)

    seq.num_computed_tokens = 5
    assert kv.num_new_blocks(seq, 3) == 0  # 8 tokens still fit in 2 blocks
    assert kv.allocate_slots(seq, 3)
    assert seq.block_ids == [0, 1]
    assert kv.allocate_slots(seq, 4)  # 9 tokens: a third block
    assert seq.block_ids == [0, 1, 2]
    assert kv.num_free_blocks == 5


def test_allocate_slots_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a, b = make_seq(8), make_seq(8)
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)  # needs 2, 1 free: nothing taken
    assert b.block_ids == []
    assert kv.num_free_blocks == 1
    assert kv.ref_counts == [1, 1, 0]


def test_free_returns_blocks_tail_first_and_fresh_blocks_are_used_before_freed_ones():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a = make_seq(12)
    assert kv.allocate_slots(a, 12)
    assert a.block_ids == [0, 1, 2]
    kv.block_hashes[1] = 1234  # a content hash (prefix reuse) is cleared when the block is freed
    kv.free(a)
    assert a.block_ids == []
    assert kv.ref_counts == [0] * 6
    assert kv.block_hashes == [None] * 6
    assert list(kv.free_block_ids) == [3, 4, 5, 2, 1, 0]
    b = make_seq(16)
    assert kv.allocate_slots(b, 16)
    assert b.block_ids == [3, 4, 5, 2]
    kv.free(make_seq(1))  # a sequence without blocks: no-op
    assert kv.num_free_blocks == 2


def test_fork_shares_blocks_with_ref_counts():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    parent, child = make_seq(6), make_seq(6)
    assert kv.allocate_slots(parent, 6)
    kv.fork(parent, child)
    assert child.block_ids == [0, 1]
    assert child.block_ids is not parent.block_ids
    assert kv.ref_counts == [2, 2, 0, 0]
    assert kv.num_free_blocks == 2
    kv.free(parent)
    assert kv.ref_counts == [1, 1, 0, 0]  # still held by the child
    assert kv.num_free_blocks == 2
    kv.free(child)
    assert kv.ref_counts == [0, 0, 0, 0]
    assert kv.num_free_blocks == 4


# ---------------------------------------------------------------------------------------------------
# Scheduler
# ---------------------------------------------------------------------------------------------------


def test_token_budget_max_num_tokens():
    sched = make_scheduler(max_num_tokens=14)
    a, b, c = make_seq(6), make_seq(6), make_seq(6)
    for s in (a, b, c):
        sched.add(s)
    out = sched.schedule()
    assert plan(out) == [(a.seq_id, 6, True), (b.seq_id, 6, True)]  # c would make 18 > 14
    assert out.num_tokens == 12
    assert list(sched.waiting) == [c]
    assert sched.running == [a, b]
    assert c.block_ids == [] and c.status == SequenceStatus.WAITING


def test_max_batch_size_caps_the_running_set():
    sched = make_scheduler(max_batch_size=2)
    seqs = [make_seq(2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert [p[0] for p in plan(out)] == [seqs[0].seq_id, seqs[1].seq_id]
    out = step(sched)  # still full: only the two decodes
    assert plan(out) == [(seqs[0].seq_id, 1, True), (seqs[1].seq_id, 1, True)]
    assert list(sched.waiting) == [seqs[2]]


def test_prefill_and_decode_mixed_in_one_step():
    sched = make_scheduler()
    a, b = make_seq(5), make_seq(3)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 5, True), (b.seq_id, 3, True)]
    c = make_seq(9)
    sched.add(c)
    out = step(sched)
    # running sequences decode first (one token each), the new prompt is prefilled in the same step
    assert plan(out) == [(a.seq_id, 1, True), (b.seq_id, 1, True), (c.seq_id, 9, True)]
    assert out.num_tokens == 11
    assert (a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens) == (6, 4, 9)
    assert (a.num_tokens, b.num_tokens, c.num_tokens) == (7, 5, 10)


def test_long_prompt_waits_for_budget_without_chunked_prefill():
    sched = make_scheduler(max_num_tokens=8)
    long, short = make_seq(20), make_seq(2)
    sched.add(long)
    sched.add(short)
    out = sched.schedule()
    assert out.is_empty  # first come, first served: the long prompt blocks the queue
    assert list(sched.waiting) == [long, short]
    assert long.block_ids == []


def test_chunked_prefill_splits_a_long_prompt_across_steps():
    sched = make_scheduler(max_num_tokens=8, chunked=True)
    a = make_seq(2)
    sched.add(a)
    step(sched)  # a: prefilled, 1 output token
    long = make_seq(20)
    sched.add(long)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1, True), (long.seq_id, 7, False)]  # budget 8 = 1 decode + 7 chunk
    assert long.num_computed_tokens == 7 and long.num_tokens == 20
    assert len(long.block_ids) == 2  # blocks for 7 tokens only
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1, True), (long.seq_id, 7, False)]
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1, True), (long.seq_id, 6, True)]  # last chunk samples
    assert long.num_computed_tokens == 20 and long.num_tokens == 21
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1, True), (long.seq_id, 1, True)]


def test_guaranteed_no_evict_admits_only_what_can_finish():
    # 4 blocks of 4 tokens; each sequence may grow to 4 + 8 = 12 tokens = 3 blocks
    sched = make_scheduler(num_blocks=4)
    a, b = make_seq(4, max_tokens=8), make_seq(4, max_tokens=8)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 4, True)]  # b would not be able to finish next to a
    assert list(sched.waiting) == [b]
    for _ in range(7):
        out = step(sched)
        assert plan(out) == [(a.seq_id, 1, True)]
        assert not out.preempted
    assert a.is_finished and a.num_output_tokens == 8
    assert sched.kv.num_free_blocks == 4  # a's blocks came back at finish
    out = step(sched)
    assert plan(out) == [(b.seq_id, 4, True)]
    assert sched.num_preemptions == 0


def test_max_utilization_admits_greedily_and_preempts_by_recompute():
    sched = make_scheduler(num_blocks=4, policy=CapacitySchedulerPolicy.MAX_UTILIZATION)
    a, b = make_seq(4, max_tokens=8), make_seq(4, max_tokens=8)
    sched.add(a)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 4, True), (b.seq_id, 4, True)]  # both admitted at once
    assert (a.block_ids, b.block_ids) == ([0], [1])
    for _ in range(4):  # tokens 5..8 of each: one more block each, then the cache is full
        out = step(sched)
        assert plan(out) == [(a.seq_id, 1, True), (b.seq_id, 1, True)]
    assert (a.block_ids, b.block_ids) == ([0, 2], [1, 3])
    assert sched.kv.num_free_blocks == 0
    assert a.num_tokens == b.num_tokens == 9
    out = step(sched)  # a needs a 3rd block: the last running sequence (b) is preempted
    assert out.preempted == [b]
    assert plan(out) == [(a.seq_id, 1, True)]
    assert b.status == SequenceStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # generated tokens are kept and recomputed as a prompt
    assert (b.num_preemptions, sched.num_preemptions) == (1, 1)
    assert list(sched.waiting) == [b] and sched.running == [a]
    assert a.block_ids == [0, 2, 3]
    while not a.is_finished:
        step(sched)
    out = step(sched)
    assert plan(out) == [(b.seq_id, 9, True)]  # recompute: prompt + its 5 generated tokens


def test_static_batch_admits_only_when_the_batch_is_done():
    sched = make_scheduler(policy=CapacitySchedulerPolicy.STATIC_BATCH)
    a = make_seq(3, max_tokens=2)
    sched.add(a)
    step(sched)
    b = make_seq(3, max_tokens=2)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1, True)]  # room and budget, but a batch is running
    assert a.is_finished
    out = step(sched)
    assert plan(out) == [(b.seq_id, 3, True)]


def test_finish_frees_blocks_and_removes_from_queues():
    sched = make_scheduler(num_blocks=8)
    a, b = make_seq(5), make_seq(5)
    sched.add(a)
    sched.add(b)
    sched.schedule()
    assert sched.kv.num_free_blocks == 4
    sched.finish(a, "stop", "x")
    assert (a.status, a.finish_reason, a.stop_reason) == (SequenceStatus.FINISHED, "stop", "x")
    assert a.block_ids == [] and sched.running == [b] and sched.kv.num_free_blocks == 6
    sched.finish(a, "length")  # finishing twice changes nothing
    assert a.finish_reason == "stop" and sched.kv.num_free_blocks == 6
    c = make_seq(3)
    sched.add(c)
    sched.finish(c, "cancelled")  # still waiting: just dropped
    assert list(sched.waiting) == [] and sched.num_unfinished == 1


@pytest.mark.parametrize("policy", list(CapacitySchedulerPolicy))
def test_every_sequence_finishes_and_all_blocks_return(policy):
    """A small cache and many requests: no deadlock, nothing leaks, under each policy."""
    sched = make_scheduler(num_blocks=6, max_num_tokens=10, max_batch_size=3, policy=policy, chunked=True)
    seqs = [make_seq(n, max_tokens=m) for n, m in [(5, 6), (9, 3), (2, 8), (7, 4), (3, 5), (1, 1)]]
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        if not sched.num_unfinished:
            break
        out = step(sched)
        assert out.num_tokens <= 10 and len(out.scheduled) <= 3
    assert all(s.is_finished for s in seqs)
    assert [s.num_output_tokens for s in seqs] == [6, 3, 8, 4, 5, 1]
    assert sched.kv.num_free_blocks == 6 and sched.kv.ref_counts == [0] * 6
    if policy != CapacitySchedulerPolicy.MAX_UTILIZATION:
        assert sched.num_preemptions == 0


# ---------------------------------------------------------------------------------------------------
# The same scheduler driving the real engine (stories260K): a cache too small for the batch
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy", [CapacitySchedulerPolicy.MAX_UTILIZATION, CapacitySchedulerPolicy.GUARANTEED_NO_EVICT]
)
def test_engine_under_kv_pressure_matches_the_reference(stories_path, stories_llm, policy):
    from quanta import LLM, SamplingParams
    from quanta.llmapi import KvCacheConfig, SchedulerConfig

    prompts = [
        "Once upon a time",
        "The dog",
        "Lily and Ben went",
        "Tom had a red ball",
        "One day",
        "The sun was hot",
        "Mom said",
        "There was a cat",
    ]
    # prompt logprobs and context logits too: a recomputed prompt must not repeat them
    sp = SamplingParams(max_tokens=40, ignore_eos=True, prompt_logprobs=0, return_context_logits=True)
    ref = stories_llm.generate(prompts, sp, use_tqdm=False)
    with LLM(
        str(stories_path),
        kv_cache_config=KvCacheConfig(max_tokens=160, tokens_per_block=16),
        scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy),
        max_batch_size=8,
        max_num_tokens=24,
        enable_chunked_prefill=True,
    ) as small:
        outs = small.generate(prompts, sp, use_tqdm=False)
        for out, r in zip(outs, ref):
            assert out.outputs[0].token_ids == r.outputs[0].token_ids
            assert out.context_logits.shape == r.context_logits.shape == (len(r.prompt_token_ids), 512)
            torch.testing.assert_close(out.context_logits, r.context_logits, atol=1e-4, rtol=1e-4)
            lps, ref_lps = out.outputs[0].prompt_logprobs, r.outputs[0].prompt_logprobs
            assert len(lps) == len(ref_lps) == len(r.prompt_token_ids)
            assert [None if e is None else list(e) for e in lps] == [None if e is None else list(e) for e in ref_lps]
        kv, sched = small.engine.kv, small.engine.scheduler
        assert kv.num_free_blocks == kv.num_blocks == 10  # every block back
        if policy == CapacitySchedulerPolicy.MAX_UTILIZATION:
            assert sched.num_preemptions > 0  # the cache really was too small
        else:
            assert sched.num_preemptions == 0
