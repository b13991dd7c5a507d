"""KV cache reuse, chunked prefill, capacity policies, the host tier and sliding windows, end to end on the
CPU with stories260K (and a tiny Mistral vs transformers): greedy outputs must equal the reference run
(no reuse, a cache big enough, no chunking), whatever the cache does underneath."""

from __future__ import annotations

import json
import random

import pytest
import torch

from quanta import LLM, SamplingParams
from quanta.config import CapacitySchedulerPolicy, ContextChunkingPolicy
from quanta.llmapi import KvCacheConfig, SchedulerConfig

BS = 16
rng = random.Random(0)
BASE = [rng.randrange(10, 500) for _ in range(300)]  # a long shared "system prompt"


def tail(i: int, n: int = 3) -> list[int]:
    r = random.Random(1000 + i)
    return [r.randrange(10, 500) for _ in range(n)]


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, **kw)


def token_ids(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def ref_llm(stories_path):
    """The reference: no reuse, no chunking, a cache that never runs short."""
    llm = LLM(str(stories_path), kv_cache_config=KvCacheConfig(enable_block_reuse=False, tokens_per_block=BS))
    yield llm
    llm.shutdown()


# ---------------------------------------------------------------------------------------------------
# reuse == no reuse
# ---------------------------------------------------------------------------------------------------

# shared prefixes of every length around block boundaries, then a distinct tail; and exact prefixes
PREFIX_PROMPTS = [BASE[:n] + tail(i) for i, n in enumerate([0, 3, 15, 16, 17, 31, 32, 33, 48, 63, 64, 65, 90])]
PREFIX_PROMPTS += [BASE[:n] for n in (2, 16, 17, 32, 33, 64, 100)]


@pytest.mark.timeout(120)
def test_outputs_with_reuse_equal_outputs_without(stories_path, ref_llm):
    sp = greedy(12)
    ref = token_ids(ref_llm.generate(PREFIX_PROMPTS, sp, use_tqdm=False))
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(tokens_per_block=BS)) as llm:
        assert token_ids(llm.generate(PREFIX_PROMPTS, sp, use_tqdm=False)) == ref  # all at once
        assert token_ids(llm.generate(PREFIX_PROMPTS, sp, use_tqdm=False)) == ref  # everything cached
        assert [llm.generate(p, sp).outputs[0].token_ids for p in PREFIX_PROMPTS[::-1]] == ref[::-1]
        stats = llm.get_stats(timeout=2)
        cs = llm.engine.kv.stats
        assert cs.partial_reuses > 0 and cs.reused_tokens > 0
        last = stats[-1]
        assert last["num_reused_tokens"] == cs.reused_tokens
        assert 0 < last["cache_hit_rate"] == last["kv_cache_stats"]["cache_hit_rate"] < 1
        assert last["kv_cache_stats"]["reused_blocks"] == cs.reused_blocks > 0
        assert last["num_preemptions"] == 0
        kv = llm.engine.kv
        assert kv.num_free_blocks == kv.num_blocks and kv.num_cached_blocks > 0  # idle: nothing held


@pytest.mark.timeout(120)
def test_n_samples_share_the_prompt_blocks(stories_path, ref_llm):
    prompt = [7] + BASE[:39]  # 40 tokens: 2 full blocks + 8
    ref = ref_llm.generate(prompt, greedy(10)).outputs[0].token_ids
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(tokens_per_block=BS)) as llm:
        out = llm.generate(prompt, greedy(10, n=3))
        assert [o.token_ids for o in out.outputs] == [ref] * 3
        # samples 2 and 3 found the 2 full prompt blocks of sample 1 and computed 8 tokens each
        assert llm.engine.kv.stats.reused_tokens == 2 * 32
        stats = llm.get_stats(timeout=2)
        assert sum(s["num_scheduled_tokens"] for s in stats) == 40 + 8 + 8 + 3 * 9
        # sampling too: each sample equals itself without reuse
        sp = SamplingParams(max_tokens=10, n=3, temperature=0.8, seed=5)
        with_reuse = [o.token_ids for o in llm.generate(prompt, sp).outputs]
        # many n > 1 requests at once (their later samples wait, the other requests do not)
        burst = PREFIX_PROMPTS[:8]
        outs = llm.generate(burst, greedy(6, n=2), use_tqdm=False)
    assert with_reuse == [o.token_ids for o in ref_llm.generate(prompt, sp).outputs]
    ref_burst = token_ids(ref_llm.generate(burst, greedy(6), use_tqdm=False))
    assert [[o.token_ids for o in out.outputs] for out in outs] == [[r, r] for r in ref_burst]


def test_cache_salt_keeps_caches_apart(stories_path):
    prompt = BASE[:70]
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(tokens_per_block=BS)) as llm:
        stats = llm.engine.kv.stats
        first = llm.generate(prompt, greedy(4), cache_salt="alice").outputs[0].token_ids
        assert stats.reused_tokens == 0
        assert llm.generate(prompt, greedy(4), cache_salt="bob").outputs[0].token_ids == first
        assert llm.generate(prompt, greedy(4)).outputs[0].token_ids == first
        assert stats.reused_tokens == 0  # other salts (and no salt) found nothing
        outs = llm.generate([prompt, prompt], greedy(4), cache_salt=["alice", "bob"], use_tqdm=False)
        assert token_ids(outs) == [first, first] and stats.reused_tokens == 2 * 64
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate(prompt, greedy(4), cache_salt=5)
        with pytest.raises(ValueError, match="cache_salt"):
            llm.generate([prompt], greedy(4), cache_salt=["a", "b"])


def test_prompt_logprobs_are_complete_with_reuse(stories_path, ref_llm):
    prompt = BASE[:50]
    sp = greedy(5, prompt_logprobs=0, return_context_logits=True)
    ref = ref_llm.generate(prompt, sp)
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(tokens_per_block=BS)) as llm:
        llm.generate(prompt, greedy(3))  # cached now
        out = llm.generate(prompt, sp)  # ... but prompt logits need the whole prompt computed
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids
    assert len(out.outputs[0].prompt_logprobs) == 50 and out.context_logits.shape == ref.context_logits.shape
    torch.testing.assert_close(out.context_logits, ref.context_logits, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------
# KV exhaustion: a cache for 8 long sequences, 64 requests at once
# ---------------------------------------------------------------------------------------------------

EXHAUST_PROMPTS = [(BASE[: 8 * (i % 4)] if i % 2 else []) + tail(i, 10 + i % 7) for i in range(64)]
EXHAUST_MAX_TOKENS = [40 + 8 * (i % 5) for i in range(64)]  # 50..98 tokens each: 4..7 blocks


@pytest.fixture(scope="module")
def exhaust_ref(ref_llm):
    sps = [greedy(m) for m in EXHAUST_MAX_TOKENS]
    ref = token_ids(ref_llm.generate(EXHAUST_PROMPTS, sps, use_tqdm=False))
    for i in (0, 13, 42, 63):  # the batched reference run equals the solo runs
        assert ref_llm.generate(EXHAUST_PROMPTS[i], sps[i]).outputs[0].token_ids == ref[i]
    return ref


@pytest.mark.timeout(120)
@pytest.mark.parametrize("policy", [CapacitySchedulerPolicy.MAX_UTILIZATION, CapacitySchedulerPolicy.GUARANTEED_NO_EVICT])
def test_kv_exhaustion_all_complete_and_match(stories_path, exhaust_ref, policy):
    longest = max(len(p) + m for p, m in zip(EXHAUST_PROMPTS, EXHAUST_MAX_TOKENS))
    max_tokens = 8 * -(-longest // BS) * BS  # 8 of the longest sequences
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(max_tokens=max_tokens, tokens_per_block=BS),
             scheduler_config=SchedulerConfig(capacity_scheduler_policy=policy), enable_chunked_prefill=True,
             max_num_tokens=256) as llm:
        outs = llm.generate(EXHAUST_PROMPTS, [greedy(m) for m in EXHAUST_MAX_TOKENS], use_tqdm=False)
        assert all(o.finished for o in outs)
        assert token_ids(outs) == exhaust_ref
        kv, sched = llm.engine.kv, llm.engine.scheduler
        assert kv.num_blocks == 8 * -(-longest // BS)
        assert kv.num_free_blocks == kv.num_blocks and sched.num_unfinished == 0  # every block back
        stats = llm.get_stats(timeout=2)
        assert max(s["kv_cache_stats"]["used_num_blocks"] for s in stats) <= kv.num_blocks
        assert stats[-1]["num_preemptions"] == sched.num_preemptions
        if policy == CapacitySchedulerPolicy.MAX_UTILIZATION:
            assert sched.num_preemptions > 0
            assert max(s["num_active_requests"] for s in stats) > 8  # admitted beyond what can finish
        else:
            assert sched.num_preemptions == 0


# ---------------------------------------------------------------------------------------------------
# chunked prefill
# ---------------------------------------------------------------------------------------------------

CHUNK_PROMPTS = [BASE[:n] + tail(i) for i, n in enumerate([1, 40, 120, 250, 7, 180])] + [tail(99, 200)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunking", [ContextChunkingPolicy.FIRST_COME_FIRST_SERVED, ContextChunkingPolicy.EQUAL_PROGRESS])
@pytest.mark.parametrize("reuse", [False, True])
def test_chunked_prefill_equals_unchunked(stories_path, ref_llm, chunking, reuse):
    sp = greedy(16)
    ref = token_ids(ref_llm.generate(CHUNK_PROMPTS, sp, use_tqdm=False))
    with LLM(str(stories_path), enable_chunked_prefill=True, max_num_tokens=40,
             kv_cache_config=KvCacheConfig(tokens_per_block=BS, enable_block_reuse=reuse),
             scheduler_config=SchedulerConfig(context_chunking_policy=chunking)) as llm:
        assert token_ids(llm.generate(CHUNK_PROMPTS, sp, use_tqdm=False)) == ref
        stats = llm.get_stats(timeout=2)
        assert max(s["num_scheduled_tokens"] for s in stats) <= 40
        assert max(s["num_context_requests"] for s in stats) >= (3 if chunking == "EQUAL_PROGRESS" else 2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("chunking", [ContextChunkingPolicy.FIRST_COME_FIRST_SERVED, ContextChunkingPolicy.EQUAL_PROGRESS])
def test_long_prompt_does_not_stop_the_token_flow(stories_path, ref_llm, chunking):
    """16 streams decode; a 400-token prompt arrives: every stream gets a token in every step while the
    prompt is read in chunks (the engine is stepped by hand: the background loop never starts)."""
    budget = 48
    llm = LLM(str(stories_path), enable_chunked_prefill=True, max_num_tokens=budget,
              kv_cache_config=KvCacheConfig(tokens_per_block=BS),
              scheduler_config=SchedulerConfig(context_chunking_policy=chunking))
    engine = llm.engine
    streams = [llm._input.make_request(i, None, [1] + tail(i, 5), greedy(60)) for i in range(16)]
    for req in streams:
        engine.add_request(req)
    while any(req.seqs[0].num_output_tokens == 0 for req in streams):
        engine.step()
    long_prompt = tail(500, 400)
    long = llm._input.make_request(100, None, long_prompt, greedy(4))
    engine.add_request(long)
    steps, got = 0, [0] * 16
    while long.seqs[0].num_output_tokens == 0:
        before = [req.seqs[0].num_output_tokens for req in streams]
        engine.step()
        steps += 1
        for i, req in enumerate(streams):
            got[i] += req.seqs[0].num_output_tokens - before[i]
    assert steps >= 400 // (budget - 16)  # the prompt really was read in chunks ...
    assert got == [steps] * 16  # ... and every stream got a token in every one of those steps
    while engine.has_unfinished():
        engine.step()
    assert long.seqs[0].output_token_ids == ref_llm.generate(long_prompt, greedy(4)).outputs[0].token_ids
    ref = token_ids(ref_llm.generate([req.prompt_token_ids for req in streams], greedy(60), use_tqdm=False))
    assert [req.seqs[0].output_token_ids for req in streams] == ref
    llm.shutdown()


# ---------------------------------------------------------------------------------------------------
# host tier
# ---------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_host_cache_brings_evicted_blocks_back(stories_path, ref_llm):
    prompts = [tail(200 + i, 100) for i in range(6)]  # 7 blocks each with the output: 2 fit at a time
    sp = greedy(8)
    ref = token_ids(ref_llm.generate(prompts, sp, use_tqdm=False))
    block_bytes = 2 * 5 * 4 * 8 * 4 * BS  # k+v x layers x kv heads x head_dim x fp32 x tokens
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(max_tokens=16 * BS, tokens_per_block=BS,
                                                              host_cache_size=64 * block_bytes)) as llm:
        kv = llm.engine.kv
        assert kv.num_host_blocks == 64
        assert [llm.generate(p, sp).outputs[0].token_ids for p in prompts] == ref
        assert kv.stats.offloaded_blocks > 0
        assert [llm.generate(p, sp).outputs[0].token_ids for p in prompts] == ref  # from the host
        assert kv.stats.onboarded_blocks >= 5 * 6 and kv.stats.reused_tokens >= 5 * 6 * BS
        s = llm.get_stats(timeout=2)[-1]["kv_cache_stats"]
        assert s["onboarded_blocks"] == kv.stats.onboarded_blocks and s["host_max_num_blocks"] == 64
    with LLM(str(stories_path), kv_cache_config=KvCacheConfig(max_tokens=16 * BS, tokens_per_block=BS)) as llm:
        for _ in range(2):  # the same without a host tier: evicted blocks are simply recomputed
            assert [llm.generate(p, sp).outputs[0].token_ids for p in prompts] == ref
        assert llm.engine.kv.stats.onboarded_blocks == 0


# ---------------------------------------------------------------------------------------------------
# sliding window
# ---------------------------------------------------------------------------------------------------


def test_attention_windows_resolution():
    from types import SimpleNamespace

    from quanta.builder import attention_windows

    llama = SimpleNamespace(model_type="llama")
    assert attention_windows(None, llama, 3, 512) == [None] * 3
    assert attention_windows(64, llama, 3, 512) == [64] * 3
    assert attention_windows([64, 1000], llama, 3, 512) == [64, None, 64]  # repeated; >= max_seq_len: none
    mistral = SimpleNamespace(model_type="mistral", sliding_window=128)
    assert attention_windows(None, mistral, 2, 512) == [128, 128]
    assert attention_windows(64, mistral, 2, 512) == [64, 64]
    assert attention_windows(None, mistral, 2, 100) == [None, None]
    qwen = SimpleNamespace(model_type="qwen2", sliding_window=32, use_sliding_window=False)
    assert attention_windows(None, qwen, 2, 512) == [None, None]
    qwen.use_sliding_window, qwen.layer_types = True, ["full_attention", "sliding_attention"]
    assert attention_windows(None, qwen, 2, 512) == [None, 32]
    with pytest.raises(ValueError, match="max_attention_window"):
        KvCacheConfig(max_attention_window=0)
    with pytest.raises(ValueError, match="max_attention_window"):
        KvCacheConfig(max_attention_window=[])


@pytest.fixture(scope="module")
def windowed_mistral(tiny_model_factory, tmp_path_factory):
    """The tiny random Mistral with sliding_window=8 in its config (same weights)."""
    import shutil

    src = tiny_model_factory("mistral")
    dst = tmp_path_factory.mktemp("mistral_w8")
    for f in src.iterdir():
        shutil.copy(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["sliding_window"] = 8
    (dst / "config.json").write_text(json.dumps(cfg))
    return src, dst


@pytest.mark.timeout(120)
def test_sliding_window_matches_transformers(windowed_mistral):
    from transformers import AutoModelForCausalLM

    plain, windowed = windowed_mistral
    hf = AutoModelForCausalLM.from_pretrained(str(windowed), torch_dtype=torch.float32).eval()
    assert hf.config.sliding_window == 8
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(3, 512, (n,), generator=g).tolist() for n in (3, 20, 45)]
    refs = []
    for p in prompts:
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                          eos_token_id=2, pad_token_id=0)
        refs.append(out[0, len(p):].tolist())
    sp = SamplingParams(max_tokens=16, end_id=2)
    kw = dict(skip_tokenizer_init=True, kv_cache_config=KvCacheConfig(tokens_per_block=4))
    with LLM(str(windowed), **kw) as llm:  # the window from the model's config
        assert token_ids(llm.generate(prompts, sp, use_tqdm=False)) == refs
    # the window from KvCacheConfig, with chunked prefill and prefix reuse across block boundaries
    with LLM(str(plain), skip_tokenizer_init=True, enable_chunked_prefill=True, max_num_tokens=8,
             kv_cache_config=KvCacheConfig(tokens_per_block=4, max_attention_window=8)) as llm:
        assert token_ids(llm.generate(prompts, sp, use_tqdm=False)) == refs
        assert token_ids(llm.generate(prompts, sp, use_tqdm=False)) == refs
        assert llm.engine.kv.stats.reused_tokens > 0
    with LLM(str(plain), **kw) as llm:  # no window: the answer really differs
        assert token_ids(llm.generate(prompts, sp, use_tqdm=False)) != refs
