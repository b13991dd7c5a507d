"""The engine loop's lifecycle and fault isolation (issue 3): shutdown, exit without shutdown, idle CPU,
loop death, stalls, a failing logits processor, Ctrl-C inside generate(). Every test is time-bounded."""

from __future__ import annotations

import _thread
import asyncio
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from quanta import SamplingParams
from quanta.engine.async_loop import EngineDeadError, EngineStallError
from quanta.engine.scheduler import SchedulerOutput
from quanta.llmapi.request_output import RequestError

from .async_helpers import KV_TOKENS, LONG, engine_threads, make_llm, run_async, wait_idle

PROMPTS = [
    "Once upon a time",
    "The little dog",
    "Tom had a red ball",
    "Mom said",
    "One day, a big bird",
    "Lily and Ben went to the park",
    "The sun was hot and",
    "There was a cat named",
]


def long_params(n=LONG):
    return SamplingParams(max_tokens=n, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(stories_path):
    llm = make_llm(stories_path)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def refs(llm):
    """Greedy solo reference runs."""
    return {p: llm.generate(p, SamplingParams(max_tokens=12)).outputs[0].token_ids for p in PROMPTS}


# --- shutdown -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_shutdown_leaves_no_engine_thread(stories_path):
    before = set(engine_threads())
    llm = make_llm(stories_path)
    assert set(engine_threads()) == before, "the engine thread starts only when first needed"
    llm.generate("Once upon a time", SamplingParams(max_tokens=4))
    mine = [t for t in engine_threads() if t not in before]
    assert len(mine) == 1 and mine[0].daemon
    inflight = llm.generate_async("Once upon a time", long_params())
    t0 = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - t0 < 5
    assert not mine[0].is_alive()
    assert set(engine_threads()) == before
    with pytest.raises(RequestError, match="shut down"):  # in flight at shutdown: an error, not a hang
        inflight.result(timeout=5)
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate("Once upon a time")
    with pytest.raises(EngineDeadError, match="shut down"):
        llm.generate_async("Once upon a time")
    llm.shutdown()  # idempotent


@pytest.mark.timeout(60)
def test_context_manager(stories_path):
    before = set(engine_threads())
    with make_llm(stories_path) as llm:
        out = llm.generate("Once upon a time", SamplingParams(max_tokens=4))
        assert out.finished
        assert len(set(engine_threads()) - before) == 1
    assert set(engine_threads()) == before
    with pytest.raises(EngineDeadError):
        llm.generate("Once upon a time")


@pytest.mark.timeout(60)
def test_result_outlives_a_dropped_llm(stories_path):
    """`LLM(m).generate_async(p).result()`: the LLM is collected at once; its request still finishes,
    then the engine thread exits by itself."""
    before = set(engine_threads())
    fut = make_llm(stories_path).generate_async("Once upon a time", SamplingParams(max_tokens=40))
    out = fut.result(timeout=20)
    assert out.finished and out.outputs[0].finish_reason in ("stop", "length") and out.outputs[0].token_ids
    deadline = time.monotonic() + 5
    while set(engine_threads()) - before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert set(engine_threads()) == before, "the engine thread of a collected LLM did not exit"


SCRIPT = textwrap.dedent("""
    import sys
    from quanta import LLM, SamplingParams
    from quanta.llmapi import KvCacheConfig

    llm = LLM(sys.argv[1], kv_cache_config=KvCacheConfig(max_tokens={kv}))
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=8))
    assert out.finished and out.outputs[0].token_ids, out
    if sys.argv[2] == "busy":  # requests still running when the script ends
        pending = [llm.generate_async("Once upon a time", SamplingParams(max_tokens=400, ignore_eos=True))
                   for _ in range(4)]
        stream = llm.generate_async("The dog", SamplingParams(max_tokens=400, ignore_eos=True), streaming=True)
        for state in stream:
            break
    print("END OF SCRIPT", flush=True)
    # no shutdown(), no `if __name__ == "__main__"` guard
""").format(kv=KV_TOKENS)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("state", ["idle", "busy"])
def test_script_without_shutdown_exits_promptly(stories_path, tmp_path, state):
    script = tmp_path / "no_shutdown.py"
    script.write_text(SCRIPT)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(script), str(stories_path), state], capture_output=True, text=True, timeout=60
    )
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "END OF SCRIPT" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert wall < 30, f"the script took {wall:.1f} s to exit (import included)"


@pytest.mark.timeout(60)
def test_near_zero_cpu_when_idle(llm):
    llm.generate(PROMPTS, SamplingParams(max_tokens=8), use_tqdm=False)
    wait_idle(llm)
    time.sleep(0.2)
    c0, w0 = time.process_time(), time.monotonic()
    time.sleep(1.0)
    cpu, wall = time.process_time() - c0, time.monotonic() - w0
    assert cpu < 0.1, f"{cpu:.3f} s of CPU over {wall:.2f} s idle"
    assert llm._loop._thread.is_alive()  # sleeping, not gone


# --- the engine loop dies -----------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_engine_loop_death_fails_every_waiting_request(stories_path):
    llm = make_llm(stories_path)
    try:
        futs = [llm.generate_async(p, long_params()) for p in PROMPTS]
        stream = llm.generate_async("Mom said", long_params(), streaming=True)
        states = iter(stream)  # kept: dropping a started iterator aborts its request
        next(states)  # the engine is stepping

        def broken_step():
            raise RuntimeError("injected engine fault")

        llm.engine.step = broken_step
        late = llm.generate_async("The little dog", long_params())  # may land before or after the death
        for f in [*futs, late]:
            with pytest.raises(RequestError, match="injected engine fault"):
                f.result(timeout=10)
        with pytest.raises(RequestError, match="injected engine fault"):
            for _ in states:
                pass

        async def awaiting():
            with pytest.raises(EngineDeadError, match="died.*injected engine fault"):
                llm.generate_async("The little dog")

        run_async(awaiting)
        with pytest.raises(EngineDeadError, match="died"):
            llm.generate("The little dog")
        llm._loop._thread.join(5)
        assert not llm._loop._thread.is_alive() and not llm._loop.is_alive
    finally:
        llm.shutdown()


@pytest.mark.timeout(60)
def test_scheduler_stall_fails_requests_instead_of_hanging(llm, refs, monkeypatch):
    monkeypatch.setattr(llm.engine.scheduler, "schedule", lambda: SchedulerOutput())
    t0 = time.monotonic()
    fut = llm.generate_async("Once upon a time", SamplingParams(max_tokens=8))
    with pytest.raises(RequestError, match="no progress"):
        fut.result(timeout=20)
    assert time.monotonic() - t0 < 10
    assert isinstance(fut._error, EngineStallError)
    monkeypatch.undo()
    wait_idle(llm)
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=12))  # still serving
    assert out.outputs[0].token_ids == refs["Once upon a time"]


# --- isolation ----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_failing_logits_processor_fails_only_its_request(stories_path):
    llm = make_llm(stories_path)  # its own engine, in case the failure took the loop down
    try:
        refs = {p: llm.generate(p, SamplingParams(max_tokens=12)).outputs[0].token_ids for p in PROMPTS}
        calls = []

        def bad_processor(req_id, logits, token_ids, stream_ptr, client_id):
            calls.append(req_id)
            if len(calls) >= 3:
                raise ValueError("boom from a logits processor")

        good = [llm.generate_async(p, SamplingParams(max_tokens=12)) for p in PROMPTS]
        bad = llm.generate_async("The little dog", SamplingParams(max_tokens=12, logits_processor=bad_processor))
        bad_stream = llm.generate_async("Mom said", SamplingParams(max_tokens=12, logits_processor=[
            lambda req_id, logits, ids, ptr: logits.mul_(1.0), lambda *a: 1 / 0]), streaming=True)
        good += [llm.generate_async(p, SamplingParams(max_tokens=12)) for p in PROMPTS]
        with pytest.raises(RequestError, match="boom from a logits processor"):
            bad.result(timeout=20)
        with pytest.raises(RequestError, match="ZeroDivisionError|division by zero"):
            for _ in bad_stream:
                pass
        for p, f in zip(PROMPTS * 2, good):
            out = f.result(timeout=20)
            assert out.outputs[0].finish_reason in ("stop", "length")
            assert out.outputs[0].token_ids == refs[p]
        wait_idle(llm)
        assert llm.generate("Mom said", SamplingParams(max_tokens=12)).outputs[0].token_ids == refs["Mom said"]
    finally:
        llm.shutdown()


# --- Ctrl-C -------------------------------------------------------------------------------------


def _interrupt_main_after(delay: float) -> threading.Thread:
    def run():
        time.sleep(delay)
        _thread.interrupt_main()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.timeout(60)
@pytest.mark.parametrize("how", ["generate", "stream"])
def test_ctrl_c_aborts_requests(llm, refs, how):
    assert threading.current_thread() is threading.main_thread()
    wait_idle(llm)
    # long enough that the interrupt surely lands while we wait (tens of seconds of work if not aborted)
    prompts = PROMPTS * 4
    params = long_params(400)
    it0 = llm.engine.iteration
    t = _interrupt_main_after(0.5)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        if how == "generate":
            llm.generate(prompts, params, use_tqdm=False)
        else:
            for _ in llm.generate_async(prompts[0], params, streaming=True):
                pass
    t.join(5)
    assert time.monotonic() - t0 < 3, "Ctrl-C was not acted on promptly"
    wait_idle(llm, timeout=5)  # aborted: no request left, KV blocks back to baseline
    assert llm.engine.iteration - it0 < 300, "the requests ran on after Ctrl-C"
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=12))  # the LLM still works
    assert out.outputs[0].token_ids == refs["Once upon a time"]


@pytest.mark.timeout(60)
def test_many_threads_and_loops_at_once(llm, refs):
    """Several threads, each with its own event loop, plus sync callers, all on one engine."""
    errors = []

    def with_loop(i):
        async def main():
            outs = await asyncio.gather(*(llm.generate_async(p, SamplingParams(max_tokens=12)) for p in PROMPTS))
            return [o.outputs[0].token_ids for o in outs]

        try:
            assert asyncio.run(main()) == [refs[p] for p in PROMPTS]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    def sync(i):
        try:
            for p in PROMPTS:
                assert llm.generate(p, SamplingParams(max_tokens=12)).outputs[0].token_ids == refs[p]
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=f, args=(i,)) for i in range(3) for f in (with_loop, sync)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    wait_idle(llm)


@pytest.mark.timeout(60)
def test_waiting_inside_the_engine_loop_fails_instead_of_deadlocking(llm, refs):
    def reentrant(req_id, logits, token_ids, stream_ptr, client_id):
        llm.generate("Mom said", SamplingParams(max_tokens=4))  # would wait on the engine thread itself

    bad = llm.generate_async("The little dog", SamplingParams(max_tokens=8, logits_processor=reentrant))
    good = llm.generate_async("Once upon a time", SamplingParams(max_tokens=12))
    with pytest.raises(RequestError, match="deadlock"):
        bad.result(timeout=20)
    assert good.result(timeout=20).outputs[0].token_ids == refs["Once upon a time"]
    wait_idle(llm)
