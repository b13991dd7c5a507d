"""RequestOutput: the result of a request and also its future (sync + async, streaming deltas)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

from quanta.engine.output import RequestDelta
from quanta.outputs import CompletionOutput

if TYPE_CHECKING:
    from quanta.engine.async_loop import EngineLoop


class RequestError(RuntimeError):
    """Raised by result()/iteration when the request failed (its own error, or the engine died)."""


# Blocking waits wake up this often, so that Ctrl-C (a signal the main thread handles only between
# bytecodes, and which does not interrupt a lock wait when it lands on another thread) is acted on.
_WAIT_SLICE_S = 0.1


class RequestOutput:
    def __init__(self, request_id: int, prompt: str | None, prompt_token_ids: list[int], num_outputs: int,
                 loop: EngineLoop | None = None, streaming: bool = False):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index=i) for i in range(num_outputs)]
        self.context_logits = None
        self.finished = False
        self.streaming = streaming
        self._loop = loop
        self._pending: deque[RequestDelta] = deque()
        self._cond = threading.Condition()
        self._apply_lock = threading.RLock()  # consumers (result, iteration) in several threads
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._error: BaseException | None = None
        self._aborted = False
        self._done = False  # the final delta has arrived (maybe not applied yet)

    def __repr__(self) -> str:
        return (
            f"RequestOutput(request_id={self.request_id}, prompt={self.prompt!r}, "
            f"prompt_token_ids={self.prompt_token_ids}, outputs={self.outputs}, finished={self.finished})"
        )

    @property
    def prompt_logprobs(self):
        return self.outputs[0].prompt_logprobs if self.outputs else []

    # --- called from the engine thread ----------------------------------------------------------
    def _push(self, delta: RequestDelta) -> None:
        with self._cond:
            self._pending.append(delta)
            if delta.finished:
                self._done = True
            self._cond.notify_all()
            waiters = list(self._async_waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that event loop is closed
                pass

    # --- applying deltas (consumer side) --------------------------------------------------------
    def _apply(self, delta: RequestDelta) -> None:
        for o in self.outputs:  # what the consumer saw at its previous state
            o._last_text_len, o._last_token_ids_len, o._last_logprobs_len = (
                len(o.text), len(o.token_ids), len(o.logprobs))
        if delta.final_replace:
            self.outputs = [CompletionOutput(index=d.index) for d in delta.seqs]
        for d in delta.seqs:
            o = self.outputs[d.index]
            o.token_ids = o.token_ids + d.token_ids
            o.text += d.text
            o.logprobs = o.logprobs + d.logprobs
            o.cumulative_logprob = d.cumulative_logprob
            o.finish_reason, o.stop_reason = d.finish_reason, d.stop_reason
            if d.generation_logits:
                import torch

                new = torch.stack(d.generation_logits)
                o.generation_logits = new if o.generation_logits is None else torch.cat([o.generation_logits, new])
        if delta.prompt_logprobs is not None:
            for o in self.outputs:
                o.prompt_logprobs = delta.prompt_logprobs
        if delta.context_logits is not None:
            self.context_logits = delta.context_logits
        if delta.error is not None:
            self._error = delta.error
        if delta.finished:
            self.finished = True

    def _take(self) -> RequestDelta | None:
        with self._cond:
            return self._pending.popleft() if self._pending else None

    def _raise_if_error(self) -> None:
        if self._error is not None:
            raise RequestError(f"request {self.request_id} failed: {self._error}") from self._error

    def _apply_all(self) -> None:
        with self._apply_lock:
            while (d := self._take()) is not None:
                self._apply(d)

    def _apply_next(self) -> RequestDelta | None:
        with self._apply_lock:
            d = self._take()
            if d is not None:
                self._apply(d)
            return d

    def _wait(self, predicate, timeout: float | None) -> bool:
        """Block until predicate() (checked under the lock) or timeout; in short slices (see above)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if not predicate() and self._loop is not None and self._loop.in_engine_thread():
                raise RuntimeError(f"request {self.request_id}: waiting for a result inside the engine loop "
                                   "(e.g. from a logits processor) would deadlock")
            while not predicate():
                if deadline is None:
                    wait = _WAIT_SLICE_S
                else:
                    wait = deadline - time.monotonic()
                    if wait <= 0:
                        return False
                    wait = min(wait, _WAIT_SLICE_S)
                self._cond.wait(wait)
        return True

    # --- sync API -------------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> RequestOutput:
        """Block until the request finishes; TimeoutError after `timeout` s (the request goes on)."""
        if not self._wait(lambda: self._done, timeout):
            raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        self._apply_all()
        self._raise_if_error()
        return self

    def done(self) -> bool:
        return self._done

    def __iter__(self):
        """The request's successive states until it finishes. Leaving the loop early aborts it."""
        if self.finished and not self._pending:
            yield self
            return
        finished = False
        try:
            while not finished:
                self._wait(lambda: bool(self._pending) or self._done, None)
                d = self._apply_next()
                if d is None:  # another consumer took it
                    finished = self.finished
                    continue
                finished = d.finished
                self._raise_if_error()
                yield self
        finally:  # closed early (break, exception, Ctrl-C): stop the request
            if not finished:
                self.abort()

    # --- async API ------------------------------------------------------------------------------
    async def _wait_async(self, predicate) -> None:
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            if predicate():
                return
            self._async_waiters.append((loop, event))
        try:
            while True:
                with self._cond:
                    if predicate():
                        return
                    event.clear()
                await event.wait()
        finally:
            with self._cond:
                self._async_waiters.remove((loop, event))

    async def aresult(self) -> RequestOutput:
        try:
            await self._wait_async(lambda: self._done)
        except asyncio.CancelledError:
            self.abort()
            raise
        self._apply_all()
        self._raise_if_error()
        return self

    def __await__(self):
        return self.aresult().__await__()

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        if self.finished and not self._pending:
            yield self
            return
        finished = False
        try:
            while not finished:
                await self._wait_async(lambda: bool(self._pending) or self._done)
                d = self._apply_next()
                if d is None:  # another consumer took it
                    finished = self.finished
                    continue
                finished = d.finished
                self._raise_if_error()
                yield self
        finally:  # task cancelled or iterator closed early: stop the request
            if not finished:
                self.abort()

    # --- cancellation ---------------------------------------------------------------------------
    def abort(self) -> None:
        if self._done or self._aborted:
            return
        self._aborted = True
        if self._loop is not None:
            self._loop.abort(self.request_id)

    def aborted(self) -> bool:
        return self._aborted

    def _fail(self, error: BaseException) -> None:
        self._push(RequestDelta(self.request_id, [], finished=True, error=error))
