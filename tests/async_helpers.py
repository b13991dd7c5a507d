"""Helpers shared by test_async.py and test_lifecycle.py (not a test module)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import warnings

# A KV cache sized for the tests: the default (a share of the host RAM) takes seconds to allocate on a CPU.
KV_TOKENS = 1 << 16
LONG = 200  # max_tokens of a request that runs for a good while (with ignore_eos)


def make_llm(path, **kw):
    from quanta import LLM
    from quanta.llmapi import KvCacheConfig

    return LLM(str(path), kv_cache_config=KvCacheConfig(max_tokens=KV_TOKENS), **kw)


def wait_idle(llm, timeout: float = 10.0) -> None:
    """Poll (with a deadline) until no request is left in the engine and every KV block is free."""
    kv, engine = llm.engine.kv, llm.engine
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not engine.has_unfinished() and kv.num_free_blocks == kv.num_blocks:
            return
        time.sleep(0.01)
    raise AssertionError(
        f"engine not idle after {timeout} s: {len(engine.requests)} requests, "
        f"{kv.num_free_blocks}/{kv.num_blocks} KV blocks free"
    )


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "quanta-engine"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_async(coro_fn, *args, timeout: float = 60.0):
    """asyncio.run(coro_fn(*args)) with the hygiene checks: when the coroutine ends no other task is
    pending, and neither asyncio nor Python warns about destroyed pending tasks or unawaited coroutines."""

    async def main():
        result = await asyncio.wait_for(coro_fn(*args), timeout)
        await asyncio.sleep(0)  # let finished callbacks run
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]
        assert not pending, f"pending asyncio tasks left: {pending}"
        return result

    handler = _Records()
    asyncio_logger = logging.getLogger("asyncio")
    asyncio_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = asyncio.run(main())
            gc.collect()
    finally:
        asyncio_logger.removeHandler(handler)
    bad = [m for m in handler.messages if "destroyed" in m or "pending" in m or "never retrieved" in m]
    assert not bad, f"asyncio complained: {bad}"
    bad_w = [str(w.message) for w in caught if "never awaited" in str(w.message) or "destroyed" in str(w.message)]
    assert not bad_w, f"warnings: {bad_w}"
    return result
