"""The engine process's side (`python -m quanta.serve.engine_child FD`): builds the LLM from the spec on stdin,
then serves the frames of engine_ipc.py on the socket FD with one task per request.

The child ignores SIGINT / SIGTERM (the parent drains, then tells it to stop), exits when its socket closes,
and on Linux dies with its parent (PR_SET_PDEATHSIG), so no orphan survives the server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from typing import Any

from quanta.serve.engine_ipc import (
    HEADER,
    MAX_FRAME,
    error_kind,
    frame,
    kwargs_from_json,
    lp_to_json,
    params_from_json,
)
from quanta.serve.engine_local import llm_summary


class _Child:
    """The engine process's loop: reads frames from the server, runs each request as a task, writes deltas."""

    def __init__(self, llm, sock: socket.socket):
        self.llm = llm
        self.sock = sock
        self.handles: dict[int, Any] = {}
        self.out: list[bytes] = []
        self.flush_scheduled = False
        self.writer: asyncio.StreamWriter | None = None
        self.last_state: dict | None = None
        import inspect

        self.accepts_cache_salt = "cache_salt" in inspect.signature(llm.generate_async).parameters

    def emit(self, msg: list) -> None:
        self.out.append(frame(msg))
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if self.out and self.writer is not None and not self.writer.is_closing():
            self.writer.write(b"".join(self.out))
        self.out.clear()

    def dead(self) -> str | None:
        loop = getattr(self.llm, "_loop", None)
        if loop is not None and loop.dead is not None:
            return f"the engine loop died ({type(loop.dead).__name__}: {loop.dead})"
        return None

    async def run(self) -> None:
        self.sock.setblocking(False)
        reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=MAX_FRAME)
        watcher = asyncio.ensure_future(self.watch())
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    (size,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                    msg = json.loads(await reader.readexactly(size))
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    return  # the server is gone
                if msg[0] == "add":
                    self.add(msg, tasks)
                elif msg[0] == "abort":
                    h = self.handles.get(msg[1])
                    if h is not None:
                        h.abort()
                elif msg[0] == "shutdown":
                    return
        finally:
            watcher.cancel()
            for h in self.handles.values():
                h.abort()
            for t in list(tasks):
                t.cancel()
            await asyncio.gather(watcher, *tasks, return_exceptions=True)
            self.flush()
            try:
                await asyncio.wait_for(self.writer.drain(), 2)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                pass

    def add(self, msg: list, tasks: set) -> None:
        _, rid, ids, pfields, salt = msg
        try:
            params = params_from_json(pfields)
            kwargs = {"cache_salt": salt} if salt is not None and self.accepts_cache_salt else {}
            h = self.llm.generate_async(ids, params, streaming=True, **kwargs)
        except Exception as e:
            self.emit(["reject", rid, error_kind(e, self.dead() is not None), str(e)])
            return
        self.handles[rid] = h
        self.emit(["ack", rid])
        t = asyncio.ensure_future(self.drive(rid, h))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    async def drive(self, rid: int, h) -> None:
        outputs_ref = h.outputs
        sent_prompt_lps = False
        try:
            async for out in h:
                replace = out.outputs is not outputs_ref
                outputs_ref = out.outputs
                seqs = []
                for o in out.outputs:
                    ids = o.token_ids_diff
                    text = o.text_diff
                    if not ids and not text and o.finish_reason is None and not replace:
                        continue
                    lps = o.logprobs_diff
                    seqs.append([o.index, text, ids, [lp_to_json(d) for d in lps] if lps else None,
                                 o.cumulative_logprob, o.finish_reason, o.stop_reason])
                plps = None
                if not sent_prompt_lps and out.prompt_logprobs:
                    plps = [lp_to_json(d) for d in out.prompt_logprobs]
                    sent_prompt_lps = True
                self.emit(["d", rid, out.finished, replace, seqs, plps])
        except Exception as e:
            self.emit(["e", rid, error_kind(e, self.dead() is not None), str(e)])
        finally:
            self.handles.pop(rid, None)

    async def watch(self) -> None:
        from quanta.serve.metrics import engine_state

        while True:
            await asyncio.sleep(0.02)
            dead = self.dead()
            if dead is not None:
                for rid in list(self.handles):
                    self.emit(["e", rid, "dead", dead])
                self.emit(["dead", dead])
                self.flush()
                return
            state = engine_state(self.llm.engine)
            if state != self.last_state:
                self.last_state = state
                self.emit(["state", state])


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def child_main(fd: int) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains on Ctrl-C / SIGTERM, then stops us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent()
    sock = socket.socket(fileno=fd)
    spec = json.loads(sys.stdin.read())
    if spec.get("prelude"):
        exec(compile(spec["prelude"], "<engine prelude>", "exec"), {})  # tests: fault injection
    try:
        from quanta import LLM

        llm = LLM(spec["model"], **kwargs_from_json(spec["llm_kwargs"]))
    except BaseException as e:  # reported as one line by the parent
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, MemoryError) or "out of memory" in text.lower():
            text = f"not enough memory: {text}"
        sock.sendall(frame(["fatal", f"cannot load the model {spec['model']!r}: {text[:500]}"]))
        return 1
    try:
        info = llm_summary(llm)
        child = _Child(llm, sock)
        info["accepts_cache_salt"] = child.accepts_cache_salt
        sock.sendall(frame(["ready", info]))
        asyncio.run(child.run())
        return 1 if child.dead() else 0
    finally:
        llm.shutdown()


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1])))
