"""The KV manager's prefix reuse and the scheduler around it, on the CPU, no model: exact asserts on block
ids, ref counts, hashes, eviction order, copies and host swaps, chunking policies.

A "step" is schedule -> update -> append one fake token to each sequence that samples (as in
test_kv_scheduler.py); `computed(seq)` stands for a step that computed all of a sequence's tokens.
"""

from __future__ import annotations

import itertools
from array import array
from types import SimpleNamespace

import pytest

from quanta.config import CapacitySchedulerPolicy, ContextChunkingPolicy, EngineConfig
from quanta.engine.kv_cache import KVCacheManager, PrefixHit, _digest, root_hash
from quanta.engine.request import Sequence
from quanta.engine.scheduler import Scheduler

BS = 4
_ids = itertools.count()


def make_request(max_tokens: int = 8, salt: str | None = None):
    return SimpleNamespace(params=SimpleNamespace(max_tokens=max_tokens), max_seq_len=1024, cache_salt=salt,
                           seqs=[], needs_prompt_logits=False)


def make_seq(tokens: list[int], max_tokens: int = 8, request=None, index: int = 0) -> Sequence:
    request = request or make_request(max_tokens)
    seq = Sequence(seq_id=next(_ids), request=request, index=index, token_ids=list(tokens),
                   num_prompt_tokens=len(tokens))
    request.seqs.append(seq)
    return seq


def chain(tokens: list[int], request) -> list[bytes]:
    """The expected chain hashes of the full blocks of `tokens`."""
    out, parent = [], root_hash(request)
    for i in range(len(tokens) // BS):
        parent = _digest(parent + array("i", tokens[i * BS : (i + 1) * BS]).tobytes())
        out.append(parent)
    return out


def admit(kv: KVCacheManager, seq: Sequence) -> PrefixHit:
    """What the scheduler does for a waiting sequence: lookup, acquire, blocks for the rest."""
    hit = kv.lookup(seq)
    assert kv.blocks_to_acquire(hit, seq.num_tokens) <= kv.num_free_blocks
    kv.acquire(seq, hit)
    assert kv.allocate_slots(seq, seq.num_tokens - seq.num_computed_tokens)
    return hit


def computed(kv: KVCacheManager, seq: Sequence) -> None:
    seq.num_computed_tokens = seq.num_tokens
    kv.cache_full_blocks(seq)


def reuse_kv(num_blocks: int = 8, **kw) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, enable_block_reuse=True, **kw)


# ---------------------------------------------------------------------------------------------------
# KVCacheManager
# ---------------------------------------------------------------------------------------------------


def test_full_computed_blocks_are_published_under_their_chain_hash():
    kv = reuse_kv()
    a = make_seq(list(range(10)))
    admit(kv, a)
    assert a.block_ids == [0, 1, 2] and a.num_computed_tokens == 0
    assert kv.block_hashes == [None] * 8  # nothing computed yet: nothing published
    a.num_computed_tokens = 5  # a chunk of 5: only block 0 is full and computed
    kv.cache_full_blocks(a)
    h = chain(a.token_ids, a.request)
    assert kv.block_hashes[:3] == [h[0], None, None] and kv.num_cached_blocks == 1
    computed(kv, a)
    assert kv.block_hashes[:3] == [h[0], h[1], None]  # block 2 holds 2 tokens: never published
    assert kv.num_cached_blocks == 2 and kv.ref_counts[:3] == [1, 1, 1]
    assert (kv.stats.num_lookups, kv.stats.reused_blocks, kv.stats.missed_blocks) == (1, 0, 3)


def test_a_new_sequence_shares_the_cached_prefix_and_ref_counts_count_each_holder():
    kv = reuse_kv()
    a = make_seq(list(range(10)))
    admit(kv, a)
    computed(kv, a)
    b = make_seq(list(range(9)) + [77])  # same first 9 tokens
    hit = kv.lookup(b)
    assert hit.blocks == [(0, -1), (1, -1)] and hit.partial is None and hit.num_tokens == 8
    assert kv.blocks_to_acquire(hit, 10) == 1  # blocks 0 and 1 are held by a: only block 3 is new
    admit(kv, b)
    assert b.block_ids == [0, 1, 3] and b.num_computed_tokens == 8
    assert kv.ref_counts[:4] == [2, 2, 1, 1]
    assert kv.num_used_blocks == 4  # shared blocks count once
    assert (kv.stats.reused_blocks, kv.stats.missed_blocks, kv.stats.reused_tokens) == (2, 4, 8)
    kv.free(a)
    assert kv.ref_counts[:4] == [1, 1, 0, 1]
    assert list(kv.free_block_ids) == [2, 4, 5, 6, 7]  # a's unpublished tail block is reused first
    kv.free(b)
    assert kv.ref_counts == [0] * 8 and kv.num_free_blocks == 8
    # b's unpublished block 3 goes first; cached blocks at the back, b's tail before its head
    assert list(kv.free_block_ids) == [3, 2, 4, 5, 6, 7, 1, 0]
    assert kv.num_cached_blocks == 2


def test_the_whole_prompt_is_never_matched_and_partial_blocks_are_copied():
    kv = reuse_kv()
    a = make_seq(list(range(8)))
    admit(kv, a)
    computed(kv, a)
    kv.free(a)
    assert list(kv.free_block_ids)[-2:] == [1, 0]
    b = make_seq(list(range(8)))  # the same 8 tokens: the last one must be computed for logits
    hit = kv.lookup(b)
    assert hit.blocks == [(0, -1)] and hit.partial == (1, 3) and hit.num_tokens == 7
    assert kv.blocks_to_acquire(hit, 8) == 3  # block 0 and the copy source leave the free pool + 1 fresh
    admit(kv, b)
    assert b.block_ids == [0, 2] and b.num_computed_tokens == 7
    assert kv.ref_counts[:3] == [1, 1, 1]  # block 1 is held until the copy has run
    assert kv.take_transfers() == ([], [], [(1, 2)])
    kv.begin_step()  # the copy ran
    assert kv.ref_counts[:3] == [1, 0, 1] and kv.num_cached_blocks == 2
    assert (kv.stats.partial_reuses, kv.stats.reused_tokens) == (1, 7)
    computed(kv, b)  # block 2 is full now, with the same tokens as block 1: a duplicate, not republished
    assert kv.block_hashes[2] == kv.block_hashes[1] and kv.num_cached_blocks == 2
    kv.free(b)
    assert kv.block_hashes[2] is None and list(kv.free_block_ids)[0] == 2


def test_partial_reuse_picks_the_longest_match_and_can_be_off():
    for partial in (True, False):
        kv = reuse_kv(enable_partial_reuse=partial)
        for tail in ([4, 5, 9, 9], [4, 5, 6, 9]):
            s = make_seq([0, 1, 2, 3] + tail)
            admit(kv, s)
            computed(kv, s)
            kv.free(s)
        c = make_seq([0, 1, 2, 3, 4, 5, 6, 7, 8])
        hit = kv.lookup(c)
        assert hit.blocks == [(0, -1)]
        assert hit.partial == ((2, 3) if partial else None)  # [4, 5, 6, 9] (block 2) matches 3 tokens


def test_lru_eviction_order_and_what_an_eviction_unpublishes():
    kv = reuse_kv(num_blocks=4)
    a, b = make_seq([1] * 8), make_seq([2] * 8)
    for s in (a, b):
        admit(kv, s)
        computed(kv, s)
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    kv.free(b)
    kv.free(a)  # a is more recently used than b now
    assert list(kv.free_block_ids) == [3, 2, 1, 0]
    c = make_seq([1] * 4 + [3] * 5)  # hits a's block 0; needs 2 fresh blocks: b's tail, then b's head
    admit(kv, c)
    assert c.block_ids == [0, 3, 2]
    assert kv.stats.evicted_blocks == 2 and kv.num_cached_blocks == 2
    assert kv.lookup(make_seq([2] * 8)).num_tokens == 0  # b's blocks are gone
    assert kv.lookup(make_seq([1] * 8)).blocks == [(0, -1)]  # a's are not
    assert list(kv.free_block_ids) == [1]


def test_cache_salt_and_adapter_separate_the_caches():
    kv = reuse_kv()
    a = make_seq(list(range(9)), request=make_request(salt="tenant-a"))
    admit(kv, a)
    computed(kv, a)
    assert kv.lookup(make_seq(list(range(9)), request=make_request(salt="tenant-a"))).num_tokens == 8
    assert kv.lookup(make_seq(list(range(9)), request=make_request(salt="tenant-b"))).num_tokens == 0
    assert kv.lookup(make_seq(list(range(9)))).num_tokens == 0
    other = make_request(salt="tenant-a")
    other.adapter_id = 3
    assert kv.lookup(make_seq(list(range(9)), request=other)).num_tokens == 0


def test_host_tier_takes_evicted_blocks_and_gives_them_back():
    kv = reuse_kv(num_blocks=3, num_host_blocks=2)
    a = make_seq([1] * 9)
    admit(kv, a)
    computed(kv, a)
    kv.free(a)
    assert list(kv.free_block_ids) == [2, 1, 0]
    b = make_seq([5] * 12)  # takes every block: a's two published blocks go to the host
    admit(kv, b)
    assert b.block_ids == [2, 1, 0]
    assert kv.take_transfers() == ([(1, 0), (0, 1)], [], [])  # a's tail (block 1) was evicted first
    assert kv.num_host_cached_blocks == 2 and kv.stats.offloaded_blocks == 2
    kv.begin_step()
    computed(kv, b)
    kv.free(b)
    c = make_seq([1] * 9)
    hit = kv.lookup(c)
    assert hit.blocks == [(-1, 1), (-1, 0)] and hit.num_tokens == 8  # host slots of a's blocks 0 and 1
    admit(kv, c)
    # b's blocks are evicted in LRU order (tail first); b's first two go to the host first, in slots
    # that the hit does not read
    swap_out, swap_in, copies = kv.take_transfers()
    assert swap_in == [(1, 0), (0, 1)] and c.block_ids == [0, 1, 2] and copies == []
    assert swap_out == []  # the host is full and both slots are being read: nothing offloaded
    assert kv.stats.onboarded_blocks == 2 and c.num_computed_tokens == 8
    assert kv.lookup(make_seq([1] * 9)).blocks == [(0, -1), (1, -1)]  # back on the device


def test_host_slots_being_read_are_not_overwritten():
    kv = reuse_kv(num_blocks=2, num_host_blocks=1)
    a = make_seq([1] * 5)
    admit(kv, a)
    computed(kv, a)
    kv.free(a)
    b = make_seq([2] * 5)
    admit(kv, b)  # evicts a's block 0 -> host slot 0
    assert kv.take_transfers()[0] == [(0, 0)]
    kv.begin_step()
    computed(kv, b)
    kv.free(b)
    c = make_seq([1] * 5)
    admit(kv, c)  # host hit on slot 0 into block 0; block 1 evicts b's first block: no slot for it
    swap_out, swap_in, _ = kv.take_transfers()
    assert swap_in == [(0, 0)] and swap_out == [] and c.block_ids == [0, 1]
    assert kv.num_host_cached_blocks == 1 and kv.num_cached_blocks == 1
    kv.begin_step()
    kv.free(c)
    d = make_seq([9] * 8)  # evicts c's block 0, whose contents the host already holds: no copy
    admit(kv, d)
    assert kv.take_transfers()[0] == [] and kv.stats.offloaded_blocks == 1


def test_fork_and_copy_on_write():
    kv = reuse_kv()
    parent = make_seq(list(range(6)))
    admit(kv, parent)
    computed(kv, parent)
    child = make_seq(list(range(6)))
    kv.fork(parent, child)
    assert child.block_ids == [0, 1] and kv.ref_counts[:2] == [2, 2]
    assert child.block_hashes == parent.block_hashes
    assert kv.copy_on_write(child)
    assert child.block_ids == [0, 2] and kv.ref_counts[:3] == [2, 2, 1]  # block 1 pinned for the copy
    assert kv.take_transfers() == ([], [], [(1, 2)])
    kv.begin_step()
    assert kv.ref_counts[:3] == [2, 1, 1]
    kv.free(parent)
    kv.free(child)
    assert kv.ref_counts == [0] * 8 and kv.num_cached_blocks == 1


def test_reuse_off_is_a_plain_pool():
    kv = KVCacheManager(4, BS)
    a = make_seq([1] * 8)
    admit(kv, a)
    computed(kv, a)
    assert kv.block_hashes == [None] * 4 and kv.num_cached_blocks == 0
    kv.free(a)
    assert kv.lookup(make_seq([1] * 8)).num_tokens == 0
    assert list(kv.free_block_ids) == [2, 3, 1, 0]


# ---------------------------------------------------------------------------------------------------
# Scheduler with reuse and chunking policies
# ---------------------------------------------------------------------------------------------------


def make_scheduler(num_blocks=64, max_num_tokens=64, max_batch_size=8, chunked=False,
                   policy=CapacitySchedulerPolicy.GUARANTEED_NO_EVICT, chunking=None, reuse=True) -> Scheduler:
    config = EngineConfig(
        max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, max_seq_len=1024, max_input_len=1024,
        max_beam_width=1, tokens_per_block=BS, num_kv_blocks=num_blocks, enable_chunked_prefill=chunked,
        scheduler_policy=policy, context_chunking_policy=chunking, enable_block_reuse=reuse,
    )
    return Scheduler(config, KVCacheManager(num_blocks, BS, enable_block_reuse=reuse))


def step(sched: Scheduler):
    out = sched.schedule()
    sched.update(out)
    for s in out.scheduled:
        if s.do_sample:
            s.seq.token_ids.append(7)
            if s.seq.num_output_tokens >= s.seq.request.params.max_tokens:
                sched.finish(s.seq, "length")
    return out


def plan(out) -> list[tuple[int, int, bool]]:
    return [(s.seq.seq_id, s.num_new_tokens, s.do_sample) for s in out.scheduled]


def test_scheduler_starts_a_sequence_at_its_cached_prefix():
    sched = make_scheduler()
    a = make_seq(list(range(10)), max_tokens=1)
    sched.add(a)
    assert plan(step(sched)) == [(a.seq_id, 10, True)]
    assert a.is_finished and sched.kv.num_cached_blocks == 2
    b = make_seq(list(range(11)), max_tokens=2)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(b.seq_id, 3, True)]  # 8 tokens cached
    assert out.num_tokens == 3 and b.block_ids[:2] == [0, 1]


def test_partial_copy_reaches_the_scheduler_output():
    sched = make_scheduler()
    a = make_seq(list(range(12)), max_tokens=1)
    sched.add(a)
    step(sched)
    b = make_seq(list(range(6)) + [50, 51], max_tokens=1)
    sched.add(b)
    out = sched.schedule()
    # block 0 shared, block 1's first 2 tokens copied into a fresh block, 2 tokens computed
    assert plan(out) == [(b.seq_id, 2, True)]
    assert b.num_computed_tokens == 6 and b.block_ids == [0, 3]
    assert out.blocks_to_copy == [(1, 3)] and out.blocks_to_swap_in == out.blocks_to_swap_out == []


def test_samples_of_one_request_wait_for_the_first_to_read_the_prompt():
    sched = make_scheduler()
    req = make_request(max_tokens=3)
    seqs = [make_seq(list(range(10)), request=req, index=i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    other = make_seq(list(range(50, 55)), max_tokens=3)  # a later request is not held up by them
    sched.add(other)
    out = step(sched)
    assert plan(out) == [(seqs[0].seq_id, 10, True), (other.seq_id, 5, True)]  # the others wait for its blocks
    assert list(sched.waiting) == seqs[1:]
    out = step(sched)
    assert plan(out) == [(seqs[0].seq_id, 1, True), (other.seq_id, 1, True), (seqs[1].seq_id, 2, True),
                         (seqs[2].seq_id, 2, True)]
    assert seqs[1].block_ids[:2] == seqs[2].block_ids[:2] == seqs[0].block_ids[:2]
    assert sched.kv.ref_counts[seqs[0].block_ids[0]] == 3


def test_guaranteed_no_evict_counts_shared_blocks_once():
    # 5 blocks; a may grow to 13 tokens (4 blocks); b (12 tokens at most) shares a's 2 full blocks and
    # needs 1 more for its whole life: admitted next to a, although 4 + 3 > 5
    sched = make_scheduler(num_blocks=5)
    a = make_seq(list(range(10)), max_tokens=3)
    sched.add(a)
    step(sched)
    b = make_seq(list(range(9)) + [99], max_tokens=2)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(a.seq_id, 1, True), (b.seq_id, 2, True)]
    assert sched.kv.num_used_blocks == 4


@pytest.mark.parametrize("chunking", [ContextChunkingPolicy.FIRST_COME_FIRST_SERVED,
                                      ContextChunkingPolicy.EQUAL_PROGRESS])
def test_chunking_policies_share_the_prompt_budget(chunking):
    sched = make_scheduler(max_num_tokens=20, chunked=True, chunking=chunking, reuse=False)
    d = make_seq([1], max_tokens=50)
    sched.add(d)
    step(sched)
    a, b = make_seq(list(range(30))), make_seq(list(range(100, 117)))
    sched.add(a)
    sched.add(b)
    out = step(sched)
    if chunking == ContextChunkingPolicy.FIRST_COME_FIRST_SERVED:
        assert plan(out) == [(d.seq_id, 1, True), (a.seq_id, 19, False)]
        assert plan(step(sched)) == [(d.seq_id, 1, True), (a.seq_id, 11, True), (b.seq_id, 8, False)]
    else:  # one block (4 tokens) to each prompt in turn: 19 = 4+4 + 4+4 + 3
        assert plan(out) == [(d.seq_id, 1, True), (a.seq_id, 11, False), (b.seq_id, 8, False)]
        assert plan(step(sched)) == [(d.seq_id, 1, True), (a.seq_id, 11, False), (b.seq_id, 8, False)]


def test_decodes_are_served_before_prompt_chunks():
    """A prompt still being read comes first in the running list, yet the decodes get their tokens first."""
    sched = make_scheduler(max_num_tokens=8, chunked=True, reuse=False,
                           chunking=ContextChunkingPolicy.EQUAL_PROGRESS)
    long = make_seq(list(range(60)))
    sched.add(long)
    assert plan(step(sched)) == [(long.seq_id, 8, False)]
    short = [make_seq([i + 1], max_tokens=50) for i in range(3)]
    for s in short:
        sched.add(s)
    # one block's worth to each prompt in turn: long 4, the three 1-token prompts 1 each, long 1 more
    assert plan(step(sched)) == [(long.seq_id, 5, False)] + [(s.seq_id, 1, True) for s in short]
    assert sched.running == [long] + short
    while long.num_computed_tokens < long.num_prompt_tokens:
        out = step(sched)
        assert plan(out)[:3] == [(s.seq_id, 1, True) for s in short]
        assert plan(out)[3][0] == long.seq_id


def test_a_partial_match_never_blocks_admission():
    """A request that needs every block is admitted without its partial match (whose copy source would
    hold one block more), instead of waiting forever."""
    sched = make_scheduler(num_blocks=3)
    a = make_seq(list(range(10)), max_tokens=1)
    sched.add(a)
    step(sched)
    assert sched.kv.num_cached_blocks == 2
    b = make_seq(list(range(6)) + [40, 41, 42], max_tokens=3)  # 12 tokens at most: all 3 blocks
    assert sched.kv.lookup(b).partial == (1, 2)
    sched.add(b)
    out = step(sched)
    assert plan(out) == [(b.seq_id, 5, True)]  # block 0 reused, the partial match dropped
    assert out.blocks_to_copy == [] and b.block_ids[0] == 0
