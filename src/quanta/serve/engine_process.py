"""The engine in a child process (`ProcessEngine`, the default of `quanta serve`): the HTTP server's side.

Why a child process: the HTTP side (parsing, JSON, SSE writes) and the engine loop's Python both need the GIL.
In one process, every streamed token's HTTP work delays the engine's next step; measured on a CPU the HTTP
thread costs ~70 us of CPU per streamed token and the engine thread ran ~10% slower. In the child, the engine
has the GIL to itself but for one consumer (the same `async for` the Python API uses), and the HTTP process
only parses frames (engine_ipc.py; the child's side is engine_child.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections import deque

from quanta.serve.engine_ipc import (
    HEADER,
    MAX_FRAME,
    EngineGone,
    frame,
    kwargs_to_json,
    lp_from_json,
    make_error,
    params_to_json,
    recv_frame_blocking,
)


class RemoteOutput:
    """A request running in the engine process, with RequestOutput's surface as the server uses it:
    `outputs` (cumulative CompletionOutputs), `prompt_token_ids`, `prompt_logprobs`, `finished`, `done()`,
    `abort()`, and async iteration (one state per delta; a failed request raises RequestError)."""

    def __init__(self, client: ProcessEngine, rid: int, prompt_token_ids: list[int], n: int):
        from quanta.outputs import CompletionOutput

        self._client = client
        self.request_id = rid
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [CompletionOutput(index=i) for i in range(n)]
        self.prompt_logprobs: list = []
        self.finished = False
        self._queue: deque = deque()
        self._event = asyncio.Event()
        self._done = False  # the final message arrived
        self._aborted = False
        self._error: BaseException | None = None

    def _feed(self, msg: list) -> None:
        self._queue.append(msg)
        if msg[0] == "e" or msg[2]:
            self._done = True
        self._event.set()

    def done(self) -> bool:
        return self._done

    def aborted(self) -> bool:
        return self._aborted

    def abort(self) -> None:
        if self._done or self._aborted:
            return
        self._aborted = True
        self._client._send(["abort", self.request_id])

    def _apply(self, msg: list) -> None:
        from quanta.outputs import CompletionOutput

        if msg[0] == "e":
            self._error = make_error(msg[2], msg[3])
            self.finished = True
            return
        _, _, finished, replace, seqs, prompt_lps = msg
        if replace:
            self.outputs = [CompletionOutput(index=s[0]) for s in seqs]
        for index, text, ids, lps, cum, finish, stop in seqs:
            o = self.outputs[index]
            o.text += text
            o.token_ids.extend(ids)
            if lps:
                o.logprobs.extend(lp_from_json(x) for x in lps)
            o.cumulative_logprob = cum
            o.finish_reason, o.stop_reason = finish, stop
        if prompt_lps is not None:
            self.prompt_logprobs = [lp_from_json(x) for x in prompt_lps]
            for o in self.outputs:
                o.prompt_logprobs = self.prompt_logprobs
        if finished:
            self.finished = True

    def __aiter__(self):
        return self._aiter()

    async def _aiter(self):
        try:
            while not self.finished:
                while not self._queue:
                    self._event.clear()
                    await self._event.wait()
                self._apply(self._queue.popleft())
                if self._error is not None:
                    raise self._error
                yield self
        finally:
            if not self.finished:
                self.abort()

    def _fail(self, kind: str, message: str) -> None:
        if not self._done:
            self._feed(["e", self.request_id, kind, message])


class ProcessEngine:
    """The engine in a child process (`python -m quanta.serve.engine_child`), reached over a socketpair."""

    def __init__(self, model: str, llm_kwargs: dict, tokenizer_spec: dict | None = None,
                 prelude: str | None = None, env: dict | None = None):
        self.model = model
        parent_sock, child_sock = socket.socketpair()
        self._sock = parent_sock
        spec = {"model": model, "llm_kwargs": kwargs_to_json(llm_kwargs), "prelude": prelude}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quanta.serve.engine_child", str(child_sock.fileno())],
            pass_fds=[child_sock.fileno()], stdin=subprocess.PIPE, env=env)
        child_sock.close()
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(spec).encode())
        self.proc.stdin.close()
        self.info: dict = {}
        self.tokenizer = None
        self._tokenizer_spec = tokenizer_spec
        self._next_id = 0
        self._outputs: dict[int, RemoteOutput] = {}
        self._acks: dict[int, asyncio.Future] = {}
        self._state = {"running": 0, "waiting": 0, "kv_used_blocks": 0, "kv_total_blocks": 0, "kv_usage": 0.0,
                       "preemptions": 0}
        self._dead: str | None = None
        self._stopping = False
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self.accepts_cache_salt = True
        self.max_seq_len = self.max_input_len = self.vocab_size = 0

    # --- startup (blocking, before the event loop) ------------------------------------------------------
    def wait_ready(self, timeout: float | None = None) -> dict:
        """Block until the child has built the LLM; RuntimeError(one line) when it failed."""
        self._sock.settimeout(timeout)
        try:
            msg = recv_frame_blocking(self._sock)
        except (OSError, EOFError) as e:
            rc = self.proc.poll()
            raise RuntimeError(f"the engine process exited ({rc}) before it was ready: {e}") from None
        finally:
            self._sock.settimeout(None)
        if msg[0] == "fatal":
            self.proc.wait(30)
            raise RuntimeError(msg[1])
        self.info = msg[1]
        self.max_seq_len, self.max_input_len = self.info["max_seq_len"], self.info["max_input_len"]
        self.vocab_size = self.info["vocab_size"]
        self.accepts_cache_salt = self.info.get("accepts_cache_salt", False)
        return self.info

    def load_tokenizer(self) -> None:
        from quanta.tokenizer import load_tokenizer

        spec = dict(self._tokenizer_spec or {})
        source = spec.pop("tokenizer", None) or self.info.get("model_path") or self.model
        if str(source).endswith(".json"):  # a config.json with dummy weights: no tokenizer
            return
        self.tokenizer = load_tokenizer(source, spec.get("mode", "auto"), spec.get("trust_remote_code", False),
                                        spec.get("revision"))

    # --- the event loop side ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._sock.setblocking(False)
        reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=MAX_FRAME)
        self._reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "the engine process closed its connection"
        try:
            while True:
                header = await reader.readexactly(HEADER.size)
                (size,) = HEADER.unpack(header)
                msg = json.loads(await reader.readexactly(size))
                kind = msg[0]
                if kind == "d" or kind == "e":
                    if kind == "e" and msg[2] == "dead" and self._dead is None:
                        self._dead = msg[3]  # the engine loop died: /health turns 503 at once
                    out = self._outputs.get(msg[1])
                    if out is not None:
                        out._feed(msg)
                        if out.done():
                            self._outputs.pop(msg[1], None)
                elif kind == "state":
                    self._state = msg[1]
                elif kind == "ack" or kind == "reject":
                    fut = self._acks.pop(msg[1], None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
                elif kind == "dead":
                    reason = msg[1]
                    break
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            reason = "the server is shutting down"
            raise
        finally:
            self._mark_dead(reason)

    def _mark_dead(self, reason: str) -> None:
        if self._dead is None:
            self._dead = reason if not self._stopping else "the engine is shutting down"
        for fut in self._acks.values():
            if not fut.done():
                fut.set_result(["reject", -1, "dead", self._dead])
        self._acks.clear()
        for out in self._outputs.values():
            out._fail("dead", self._dead)
        self._outputs.clear()

    def _send(self, msg: list) -> None:
        if self._writer is not None and self._dead is None and not self._writer.is_closing():
            self._writer.write(frame(msg))

    async def generate(self, ids: list[int], params, cache_salt: str | None = None) -> RemoteOutput:
        if self._dead is not None:
            raise EngineGone(self._dead)
        rid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._acks[rid] = fut
        out = RemoteOutput(self, rid, list(ids), params.n)
        self._outputs[rid] = out
        self._send(["add", rid, list(ids), params_to_json(params), cache_salt])
        try:
            msg = await fut
        except asyncio.CancelledError:
            out.abort()
            raise
        if msg[0] == "reject":
            self._outputs.pop(rid, None)
            out._done = True
            if msg[2] == "value":
                raise ValueError(msg[3])
            raise EngineGone(msg[3])
        return out

    def state(self) -> dict:
        return self._state

    def error(self) -> str | None:
        if self._dead is not None:
            return f"the engine stopped: {self._dead}"
        if self.proc.poll() is not None:
            return f"the engine process exited with status {self.proc.returncode}"
        return None

    async def aclose(self) -> None:
        """Tell the child to stop (after the server drained), then wait for it."""
        self._stopping = True
        if self._writer is not None and not self._writer.is_closing():
            try:
                self._writer.write(frame(["shutdown"]))
                await asyncio.wait_for(self._writer.drain(), 5)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                pass
        if self._reader_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader_task), 10)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()

    def shutdown(self, timeout: float = 15.0) -> None:
        """Blocking: make sure the child is gone (terminate, then kill)."""
        self._stopping = True
        try:
            self._sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
