"""generate_async: concurrency, streaming, future-style results, cancellation, stats (issue 3).

Every test has a time bound, so a hang fails instead of stalling CI. One LLM (small KV cache) serves the
module; each test leaves it idle (no request left, KV blocks back to baseline).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from quanta import SamplingParams
from quanta.llmapi import RequestOutput

from .async_helpers import LONG, make_llm, run_async, wait_idle

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Lily and Ben went to the park",
    "One day, a big bird",
    "Tom had a red ball",
    "The sun was hot and",
    "Mom said",
    "There was a cat named",
]


@pytest.fixture(scope="module")
def llm(stories_path):
    llm = make_llm(stories_path)
    yield llm
    llm.shutdown()


@pytest.fixture(autouse=True)
def _idle_after(request):
    yield
    if "llm" in request.fixturenames:
        wait_idle(request.getfixturevalue("llm"))


def greedy(n):
    return SamplingParams(max_tokens=n)


def seeded(n, seed):
    return SamplingParams(max_tokens=n, temperature=0.9, top_k=40, top_p=0.95, seed=seed)


def long_params():
    return SamplingParams(max_tokens=LONG, ignore_eos=True)


def key(out: RequestOutput):
    o = out.outputs[0]
    return o.token_ids, o.text


# --- concurrency --------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_500_concurrent_requests_tasks_and_threads(llm):
    # the workload: (prompt, params, is_reference_checked)
    jobs = []
    for i in range(500):
        prompt = PROMPTS[i % len(PROMPTS)]
        kind = i % 4
        if kind == 0:
            jobs.append((prompt, greedy(4 + 4 * (i % 3))))  # max_tokens 4, 8, 12
        elif kind == 1:
            jobs.append((prompt, greedy(6)))
        elif kind == 2:
            jobs.append((prompt, seeded(6 + (i % 2) * 4, seed=i % 5)))
        else:
            jobs.append((prompt, SamplingParams(max_tokens=3 + i % 5, temperature=1.0)))  # unseeded

    # solo reference runs, one at a time on an otherwise idle engine
    def ref_key(prompt, p):
        return prompt, p.max_tokens, p.temperature, p.seed

    refs = {}
    for prompt, p in jobs:
        if (p.temperature is None or p.seed is not None) and ref_key(prompt, p) not in refs:
            refs[ref_key(prompt, p)] = key(llm.generate(prompt, p))
            wait_idle(llm)

    results: dict[int, RequestOutput] = {}
    errors: list[BaseException] = []
    n_async, n_threads, per_thread = 400, 4, 25  # 400 from asyncio tasks, 100 from threads
    assert n_async + n_threads * per_thread == len(jobs)

    def thread_worker(t):
        try:
            idx = list(range(n_async + t * per_thread, n_async + (t + 1) * per_thread))
            if t == 0:  # one thread uses the batch API
                outs = llm.generate([jobs[i][0] for i in idx], [jobs[i][1] for i in idx], use_tqdm=False)
                results.update(zip(idx, outs))
            else:  # the others submit one by one, then wait on the futures
                futs = [(i, llm.generate_async(*jobs[i])) for i in idx]
                for i, f in futs:
                    results[i] = f.result(timeout=120)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    async def one(i):
        prompt, p = jobs[i]
        fut = llm.generate_async(prompt, p)
        assert isinstance(fut, RequestOutput)  # at once, not a coroutine
        results[i] = await (fut if i % 2 else fut.aresult())

    async def main():
        threads = [threading.Thread(target=thread_worker, args=(t,)) for t in range(n_threads)]
        for t in threads:
            t.start()
        await asyncio.gather(*(one(i) for i in range(n_async)))
        for t in threads:
            await asyncio.to_thread(t.join, 120)

    llm.get_stats(timeout=0)  # drain
    t0 = time.monotonic()
    run_async(main, timeout=140)
    elapsed = time.monotonic() - t0
    assert not errors, errors
    assert sorted(results) == list(range(len(jobs)))
    for i, (prompt, p) in enumerate(jobs):
        out = results[i]
        assert out.finished and out.request_id is not None
        o = out.outputs[0]
        assert o.finish_reason in ("stop", "length"), (i, o)
        assert 1 <= len(o.token_ids) <= p.max_tokens
        if ref_key(prompt, p) in refs:
            assert key(out) == refs[ref_key(prompt, p)], f"job {i} ({prompt!r}, {p}) differs from its solo run"
    assert len({r.request_id for r in results.values()}) == len(jobs)
    stats = llm.get_stats(timeout=0)
    assert max(s["num_scheduled_seqs"] for s in stats) >= 100, "the requests did not run concurrently"
    print(f"500 concurrent requests in {elapsed:.1f} s")


# --- streaming ----------------------------------------------------------------------------------


def _check_stream(states, final_n=1):
    """Deltas of successive states concatenate to the final output; exactly one terminal state, last."""
    assert states, "no state streamed"
    finished_flags = [f for f, _ in states]
    assert finished_flags.count(True) == 1 and finished_flags[-1] is True, finished_flags
    final = states[-1][1]
    for idx in range(final_n):
        text = "".join(s[idx]["text_diff"] for _, s in states)
        ids = [t for _, s in states for t in s[idx]["token_ids_diff"]]
        lps = [lp for _, s in states for lp in s[idx]["logprobs_diff"]]
        assert text == final[idx]["text"]
        assert ids == final[idx]["token_ids"]
        assert lps == final[idx]["logprobs"]


def _snapshot(out: RequestOutput):
    return out.finished, [
        dict(
            text_diff=o.text_diff,
            token_ids_diff=list(o.token_ids_diff),
            logprobs_diff=list(o.logprobs_diff),
            text=o.text,
            token_ids=list(o.token_ids),
            logprobs=list(o.logprobs),
        )
        for o in out.outputs
    ]


STREAM_CASES = [
    ("greedy+logprobs", SamplingParams(max_tokens=24, logprobs=2)),
    ("stop string", SamplingParams(max_tokens=40, stop=["."], logprobs=0)),
    ("seeded n=2", SamplingParams(max_tokens=16, n=2, temperature=0.8, seed=7, logprobs=1)),
    ("ignore_eos", SamplingParams(max_tokens=30, ignore_eos=True)),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,params", STREAM_CASES, ids=[c[0] for c in STREAM_CASES])
def test_streaming_async_deltas(llm, name, params):
    async def main():
        states = []
        async for out in llm.generate_async("Once upon a time", params, streaming=True):
            states.append(_snapshot(out))
        return states

    states = run_async(main)
    _check_stream(states, params.n)
    assert len(states) > 2, "a streamed request should yield several states"
    ref = llm.generate("Once upon a time", params)  # same request, not streamed
    final = states[-1][1]
    for idx, o in enumerate(ref.outputs):
        assert final[idx]["token_ids"] == o.token_ids and final[idx]["text"] == o.text
    if params.logprobs is not None:
        assert len(final[0]["logprobs"]) == len(final[0]["token_ids"])


@pytest.mark.timeout(60)
def test_streaming_sync_iteration(llm):
    states = []
    for out in llm.generate_async("The little dog", SamplingParams(max_tokens=20, logprobs=1), streaming=True):
        states.append(_snapshot(out))
    _check_stream(states)
    assert len(states) > 2


@pytest.mark.timeout(60)
def test_iterating_non_streaming_and_finished_results(llm):
    out = llm.generate_async("Tom had a red ball", greedy(8))  # not streaming: one state, the final one
    states = [_snapshot(o) for o in out]
    assert len(states) == 1 and states[0][0] is True
    again = list(out)  # a finished result yields itself once
    assert again == [out]

    async def main():
        fut = llm.generate_async("Tom had a red ball", greedy(8))
        return [o.finished async for o in fut]

    assert run_async(main) == [True]


# --- future-style results ----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_result_timeout_then_completes(llm):
    fut = llm.generate_async("Once upon a time", long_params())
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.01)
    assert time.monotonic() - t0 < 1.0
    assert not fut.finished and not fut.aborted()
    out = fut.result(timeout=50)  # the timeout did not cancel it
    assert out is fut and out.finished
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == LONG


@pytest.mark.timeout(60)
def test_aresult_await_and_sync_without_loop(llm):
    with pytest.raises(RuntimeError):  # plain sync code: no event loop is running here
        asyncio.get_running_loop()
    ref = llm.generate_async("Mom said", greedy(10)).result(timeout=30)  # sync, no loop
    assert ref.finished and ref.outputs[0].token_ids

    async def main():
        a = await llm.generate_async("Mom said", greedy(10)).aresult()
        b = await llm.generate_async("Mom said", greedy(10))
        c = await asyncio.wait_for(llm.generate_async("Mom said", greedy(10)), 30)
        return a, b, c

    for out in run_async(main):
        assert out.finished and key(out) == key(ref)


@pytest.mark.timeout(60)
def test_results_from_another_thread_and_repr(llm):
    fut = llm.generate_async("Once upon a time", greedy(6))
    box = []
    t = threading.Thread(target=lambda: box.append(fut.result(timeout=30)))
    t.start()
    t.join(30)
    assert box and box[0] is fut
    assert fut.result() is fut  # idempotent
    r = repr(fut)
    assert r.startswith(f"RequestOutput(request_id={fut.request_id}, prompt='Once upon a time'")
    assert r.endswith("finished=True)")


# --- cancellation -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_abort_returns_partial_cancelled(llm):
    fut = llm.generate_async("Once upon a time", long_params(), streaming=True)
    for out in fut:
        if len(out.outputs[0].token_ids) >= 3:
            break  # leaving the sync loop early drops (closes) the iterator, which aborts the request
    out = fut.result(timeout=10)
    assert fut.aborted()
    o = out.outputs[0]
    assert out.finished and o.finish_reason == "cancelled"
    assert 3 <= len(o.token_ids) < LONG
    wait_idle(llm, timeout=5)

    fut = llm.generate_async("Once upon a time", long_params())  # not streaming: explicit abort()
    time.sleep(0.2)
    fut.abort()
    out = fut.result(timeout=10)
    o = out.outputs[0]
    assert o.finish_reason == "cancelled" and len(o.token_ids) < LONG
    assert o.text  # the partial text is kept
    wait_idle(llm, timeout=5)
    fut.abort()  # aborting a finished request is a no-op


@pytest.mark.timeout(60)
def test_abort_before_it_runs_and_many_aborts(llm):
    futs = [llm.generate_async(p, long_params()) for p in PROMPTS * 4]
    for f in futs:
        f.abort()
    for f in futs:
        o = f.result(timeout=20).outputs[0]
        assert o.finish_reason == "cancelled" and len(o.token_ids) < LONG
    wait_idle(llm, timeout=5)


@pytest.mark.timeout(60)
def test_task_cancellation_aborts(llm):
    async def main():
        fut = llm.generate_async("Once upon a time", long_params())
        task = asyncio.create_task(fut.aresult())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # wait_for cancels the awaiting task on timeout, which aborts the request too
        fut2 = llm.generate_async("The little dog", long_params())
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(fut2, 0.2)
        # a streaming consumer task cancelled mid-stream
        fut3 = llm.generate_async("Mom said", long_params(), streaming=True)

        async def consume():
            async for _ in fut3:
                pass

        t3 = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        t3.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t3
        return fut, fut2, fut3

    futs = run_async(main)
    for f in futs:
        assert f.aborted()
        o = f.result(timeout=10).outputs[0]
        assert o.finish_reason == "cancelled" and len(o.token_ids) < LONG
    wait_idle(llm, timeout=5)


@pytest.mark.timeout(60)
def test_async_iterator_closed_early(llm):
    async def main():
        fut = llm.generate_async("Once upon a time", long_params(), streaming=True)
        seen = 0
        async with contextlib.aclosing(fut.__aiter__()) as agen:
            async for out in agen:
                seen = len(out.outputs[0].token_ids)
                if seen >= 3:
                    break
        out = await fut.aresult()
        assert out.outputs[0].finish_reason == "cancelled" and seen <= len(out.outputs[0].token_ids) < LONG

        # `break` without aclose: the dropped async generator is finalized by asyncio, which aborts too
        fut2 = llm.generate_async("The little dog", long_params(), streaming=True)
        async for out in fut2:
            if len(out.outputs[0].token_ids) >= 2:
                break
        out2 = await asyncio.wait_for(fut2.aresult(), 10)
        assert out2.outputs[0].finish_reason == "cancelled"
        return fut, fut2

    futs = run_async(main)
    assert all(f.aborted() for f in futs)
    wait_idle(llm, timeout=5)


# --- stats --------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_get_stats_and_get_stats_async(llm):
    llm.get_stats(timeout=0)  # drain what earlier tests left
    reused_before = llm.engine.kv.stats.reused_tokens  # the engine is idle: a plain read
    outs = llm.generate(PROMPTS, greedy(8), use_tqdm=False)
    assert all(o.finished for o in outs)
    stats = llm.get_stats(timeout=2)
    assert stats, "no per-iteration stats"
    for s in stats:
        assert s["iter_latency_ms"] > 0
        assert s["num_scheduled_tokens"] > 0
        assert s["num_active_requests"] >= 0 and s["num_queued_requests"] >= 0
        kv = s["kv_cache_stats"]
        assert kv["used_num_blocks"] + kv["free_num_blocks"] == kv["max_num_blocks"] == llm.engine.kv.num_blocks
    # token counts reconcile: every prompt token once (computed, or found in the prefix cache), every
    # generated token but the last fed back once
    expected = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    reused = stats[-1]["num_reused_tokens"] - reused_before
    assert sum(s["num_scheduled_tokens"] for s in stats) + reused == expected
    assert max(s["kv_cache_stats"]["used_num_blocks"] for s in stats) >= len(PROMPTS)
    iters = [s["iter"] for s in stats]
    assert iters == sorted(iters)

    async def main():
        await llm.generate_async("Mom said", greedy(5))
        return [s async for s in llm.get_stats_async(timeout=2)]

    astats = run_async(main)
    assert astats and all("iter_latency_ms" in s and "kv_cache_stats" in s for s in astats)
    assert llm.get_stats(timeout=0) == []  # all were taken
