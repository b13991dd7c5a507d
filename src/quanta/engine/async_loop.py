"""The background engine loop: a thread that owns the engine, sleeps when idle, and feeds handles.

Requests and aborts arrive through an inbox from any thread or event loop; the loop drains it between
steps, so the engine itself is only ever touched by this thread.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections import deque

from quanta.engine.engine import LLMEngine

logger = logging.getLogger("quanta")


class EngineDeadError(RuntimeError):
    """The engine loop is gone (it died, or the LLM was shut down): no request can be served."""


class EngineStallError(RuntimeError):
    """The scheduler made no progress for a while with requests pending (a bug, reported, not a hang)."""


# With requests pending, steps that schedule nothing for this long fail those requests instead of hanging.
STALL_TIMEOUT_S = 2.0


class EngineLoop:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._inbox: deque[tuple] = deque()
        self._handles: dict[int, object] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closing = False  # the LLM is gone: finish what is in flight, then stop
        self.dead: BaseException | None = None
        _LIVE_LOOPS.add(self)

    # --- called from user threads ---------------------------------------------------------------
    def submit(self, request, handle, streaming: bool) -> None:
        with self._cond:
            if self.dead is not None:
                raise EngineDeadError(f"the engine loop died: {self.dead!r}")
            if self._stop or self._closing:
                raise EngineDeadError("the LLM was shut down")
            self._ensure_thread()  # first, so a failed start leaves nothing queued
            self._inbox.append(("add", request, handle, streaming))
            self._cond.notify_all()

    def abort(self, request_id: int) -> None:
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify_all()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def close_when_idle(self) -> None:
        """No new request will come (the LLM was garbage-collected): requests already submitted still
        finish (their RequestOutputs may be awaited after the LLM object is gone), then the thread exits.
        Does not block."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def in_engine_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def is_alive(self) -> bool:
        return self.dead is None and not self._stop and not self._closing

    def _ensure_thread(self) -> None:
        if self._thread is None:
            thread = threading.Thread(target=self._run, name="quanta-engine", daemon=True)
            thread.start()  # may raise (e.g. at interpreter shutdown): then no thread is recorded
            self._thread = thread

    # --- the engine thread ----------------------------------------------------------------------
    def _run(self) -> None:
        stalled_since: float | None = None
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._inbox and not self.engine.has_unfinished():
                        if self._closing:
                            break
                        self._cond.wait()  # idle: sleep, no spinning
                    if self._stop or (self._closing and not self._inbox and not self.engine.has_unfinished()):
                        break
                    if stalled_since is not None and not self._inbox:
                        self._cond.wait(0.05)  # no progress last step: back off, wake on new input
                    inbox, self._inbox = self._inbox, deque()
                self._drain(inbox)
                iteration = self.engine.iteration
                deltas = self.engine.step()
                for delta in deltas:
                    self._dispatch(delta)
                if deltas or self.engine.iteration != iteration or not self.engine.has_unfinished():
                    stalled_since = None
                elif stalled_since is None:
                    stalled_since = time.monotonic()
                elif time.monotonic() - stalled_since > STALL_TIMEOUT_S:
                    self._fail_stalled()
                    stalled_since = None
        except BaseException as e:  # the loop died: every waiting request gets the error
            logger.exception("quanta engine loop died")
            self.dead = e
        finally:
            self._fail_all(self.dead or EngineDeadError("the LLM was shut down"))

    def _drain(self, inbox: deque) -> None:
        for item in inbox:
            if item[0] == "add":
                _, req, handle, streaming = item
                self._handles[req.request_id] = handle
                try:
                    self.engine.add_request(req, streaming)
                except Exception as e:
                    self._handles.pop(req.request_id, None)
                    handle._fail(e)
            else:
                delta = self.engine.abort_request(item[1])
                if delta is not None:
                    self._dispatch(delta)

    def _fail_stalled(self) -> None:
        sched = self.engine.scheduler
        error = EngineStallError(
            f"the scheduler made no progress for {STALL_TIMEOUT_S} s with {len(sched.waiting)} waiting and "
            f"{len(sched.running)} running sequences ({self.engine.kv.num_free_blocks} free KV blocks); "
            "the pending requests are failed instead of hanging"
        )
        logger.error("quanta: %s", error)
        for request_id in list(self.engine.requests):
            delta = self.engine.fail_request(request_id, error)
            if delta is not None:
                self._dispatch(delta)

    def _dispatch(self, delta) -> None:
        handle = self._handles.get(delta.request_id)
        if delta.finished:
            self._handles.pop(delta.request_id, None)
        if handle is not None:
            handle._push(delta)

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            pending = [item[2] for item in self._inbox if item[0] == "add"]
            self._inbox.clear()
        for handle in list(self._handles.values()) + pending:
            handle._fail(error)
        self._handles.clear()


_LIVE_LOOPS: weakref.WeakSet[EngineLoop] = weakref.WeakSet()


@atexit.register
def _shutdown_all() -> None:
    # NOTE: stop engine threads before the interpreter tears down modules they use.
    for loop in list(_LIVE_LOOPS):
        loop.shutdown(timeout=5.0)
