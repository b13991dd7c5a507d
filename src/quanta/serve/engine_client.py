"""How the HTTP server reaches the engine: in its own process (`LocalEngine`, an `LLM` object) or in a child
process (`ProcessEngine`, the default of `quanta serve`).

Why a child process: the HTTP side (parsing, JSON, SSE writes) and the engine loop's Python both need the GIL.
In one process, every streamed token's HTTP work delays the engine's next step; measured on a CPU the HTTP
thread costs ~70 us of CPU per streamed token and the engine thread ran ~10% slower. In the child, the engine
has the GIL to itself but for one consumer (the same `async for` the Python API uses), and the HTTP process
only parses frames.

The two processes talk over a socketpair in length-prefixed JSON frames (no pickle on any socket):

    parent -> child   ["add", rid, prompt_ids, sampling_params_fields, cache_salt]  ["abort", rid]  ["shutdown"]
    child -> parent   ["ready", info] | ["fatal", message]      once, at startup
                      ["ack", rid] | ["reject", rid, kind, message]      per add
                      ["d", rid, finished, replace, seqs, prompt_logprobs]   output deltas
                      ["e", rid, kind, message]                            a request failed
                      ["state", {running, waiting, kv_*, preemptions}]    engine state, when it changes
                      ["dead", message]                                    the engine loop died

`kind` is "value" (a bad request: 400), "dead" (the engine is gone: 503) or "other" (500). The child ignores
SIGINT / SIGTERM (the parent drains, then tells it to stop), exits when its socket closes, and on Linux dies
with its parent (PR_SET_PDEATHSIG), so no orphan survives the server.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import struct
import subprocess
import sys
from collections import deque
from typing import Any

_HEADER = struct.Struct(">I")
_MAX_FRAME = 1 << 30


# Python code the engine process runs before building the LLM (tests set it to inject faults).
CHILD_PRELUDE: str | None = None


class EngineGone(RuntimeError):
    """The engine (process or loop) is gone."""


def _frame(obj: Any) -> bytes:
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(len(data)) + data


def _params_to_json(params) -> dict:
    """SamplingParams -> JSON-able fields (the tensor logit bias as a sparse {id: bias})."""
    from dataclasses import fields

    out = {}
    for f in fields(params):
        value = getattr(params, f.name)
        if f.name == "embedding_bias" and value is not None:
            nz = value.nonzero().flatten().tolist()
            out[f.name] = {"__size__": int(value.numel()), "bias": {str(i): float(value[i]) for i in nz}}
        elif f.name == "logits_processor" and value is not None:
            raise ValueError("logits processors cannot cross to the engine process")
        else:
            out[f.name] = value
    return out


def _params_from_json(data: dict):
    from quanta.sampling_params import SamplingParams

    bias = data.get("embedding_bias")
    if bias is not None:
        import torch

        t = torch.zeros(bias["__size__"], dtype=torch.float32)
        for i, v in bias["bias"].items():
            t[int(i)] = v
        data = dict(data, embedding_bias=t)
    return SamplingParams(**data)


def _lp_to_json(d: dict | None) -> list | None:
    if d is None:
        return None
    return [[tid, lp.logprob, lp.rank] for tid, lp in d.items()]


def _lp_from_json(items: list | None) -> dict | None:
    if items is None:
        return None
    from quanta.outputs import Logprob

    return {tid: Logprob(lp, rank) for tid, lp, rank in items}


def _error_kind(err: BaseException | None, dead: bool) -> str:
    if dead:
        return "dead"
    cause = err.__cause__ if err is not None and err.__cause__ is not None else err
    return "value" if isinstance(cause, ValueError) else "other"


def _make_error(kind: str, message: str) -> BaseException:
    """The exception a request's consumer sees, with the cause the server maps to a status."""
    from quanta.llmapi.request_output import RequestError

    cause: BaseException = ValueError(message) if kind == "value" else (
        EngineGone(message) if kind == "dead" else RuntimeError(message))
    err = RequestError(message)
    err.__cause__ = cause
    return err


# --- in-process -------------------------------------------------------------------------------------------


class LocalEngine:
    """The engine in this process: an `LLM` object (its RequestOutputs are the handles)."""

    def __init__(self, llm):
        import inspect

        from quanta.serve.metrics import engine_state

        self.llm = llm
        self.tokenizer = llm.tokenizer
        cfg = llm.engine_config
        self.max_seq_len, self.max_input_len = cfg.max_seq_len, cfg.max_input_len
        built = getattr(llm, "_built", None)
        size = getattr(getattr(built, "hf_config", None), "vocab_size", None)
        self.vocab_size = size if isinstance(size, int) and size > 0 else len(llm.tokenizer)
        self.accepts_cache_salt = "cache_salt" in inspect.signature(llm.generate_async).parameters
        self._engine_state = engine_state

    async def start(self) -> None:
        pass

    async def generate(self, ids: list[int], params, cache_salt: str | None = None):
        kwargs = {"cache_salt": cache_salt} if cache_salt is not None else {}
        return self.llm.generate_async(ids, params, streaming=True, **kwargs)

    def state(self) -> dict:
        return self._engine_state(self.llm.engine)

    def error(self) -> str | None:
        loop = getattr(self.llm, "_loop", None)
        if loop is None:
            return "the engine is not running"
        if loop.dead is not None:
            return f"the engine loop died ({type(loop.dead).__name__}: {loop.dead})"
        if not loop.is_alive:
            return "the engine is shutting down"
        return None

    def shutdown(self) -> None:
        self.llm.shutdown()


def llm_summary(llm) -> dict:
    """What the startup line shows about an LLM (and what the child reports as ready)."""
    built = llm._built
    cfg = built.config
    return {
        "arch": (getattr(built.hf_config, "architectures", None) or ["?"])[0],
        "dtype": str(built.dtype).replace("torch.", ""), "device": str(built.device),
        "kv_tokens": cfg.num_kv_blocks * cfg.tokens_per_block, "max_seq_len": cfg.max_seq_len,
        "max_input_len": cfg.max_input_len,
        "vocab_size": int(getattr(built.hf_config, "vocab_size", 0) or len(llm.tokenizer or [])),
        "model_path": str(built.model_path) if built.model_path is not None else None,
    }


# --- child process: the parent's side -------------------------------------------------------------------


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
            self._error = _make_error(msg[2], msg[3])
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
                o.logprobs.extend(_lp_from_json(x) for x in lps)
            o.cumulative_logprob = cum
            o.finish_reason, o.stop_reason = finish, stop
        if prompt_lps is not None:
            self.prompt_logprobs = [_lp_from_json(x) for x in prompt_lps]
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
    """The engine in a child process (`python -m quanta.serve.engine_client`), reached over a socketpair."""

    def __init__(self, model: str, llm_kwargs: dict, tokenizer_spec: dict | None = None,
                 prelude: str | None = None, env: dict | None = None):
        self.model = model
        parent_sock, child_sock = socket.socketpair()
        self._sock = parent_sock
        spec = {"model": model, "llm_kwargs": _kwargs_to_json(llm_kwargs), "prelude": prelude}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quanta.serve.engine_client", str(child_sock.fileno())],
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
            msg = _recv_frame_blocking(self._sock)
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
        reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=_MAX_FRAME)
        self._reader_task = asyncio.ensure_future(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        reason = "the engine process closed its connection"
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                (size,) = _HEADER.unpack(header)
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
            self._writer.write(_frame(msg))

    async def generate(self, ids: list[int], params, cache_salt: str | None = None) -> RemoteOutput:
        if self._dead is not None:
            raise EngineGone(self._dead)
        rid = self._next_id
        self._next_id += 1
        fut = asyncio.get_running_loop().create_future()
        self._acks[rid] = fut
        out = RemoteOutput(self, rid, list(ids), params.n)
        self._outputs[rid] = out
        self._send(["add", rid, list(ids), _params_to_json(params), cache_salt])
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
                self._writer.write(_frame(["shutdown"]))
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


def _kwargs_to_json(kw: dict) -> dict:
    """LLM kwargs from the CLI (plain values and the KV / scheduler config dataclasses) as JSON."""
    out = {}
    for k, v in kw.items():
        if hasattr(v, "to_dict"):
            d = {key: (str(val) if hasattr(val, "value") else val) for key, val in v.to_dict().items()}
            out[k] = {"__config__": type(v).__name__, "fields": d}
        else:
            out[k] = v
    return out


def _kwargs_from_json(kw: dict) -> dict:
    import quanta.llmapi as api

    out = {}
    for k, v in kw.items():
        if isinstance(v, dict) and "__config__" in v:
            out[k] = getattr(api, v["__config__"])(**v["fields"])
        else:
            out[k] = v
    return out


def _recv_frame_blocking(sock: socket.socket) -> list:
    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("connection closed")
            buf += chunk
        return buf

    (size,) = _HEADER.unpack(exact(_HEADER.size))
    return json.loads(exact(size))


# --- child process: the engine's side --------------------------------------------------------------------


class _Child:
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
        self.out.append(_frame(msg))
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
        reader, self.writer = await asyncio.open_connection(sock=self.sock, limit=_MAX_FRAME)
        watcher = asyncio.ensure_future(self.watch())
        tasks: set[asyncio.Task] = set()
        try:
            while True:
                try:
                    (size,) = _HEADER.unpack(await reader.readexactly(_HEADER.size))
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
            params = _params_from_json(pfields)
            kwargs = {"cache_salt": salt} if salt is not None and self.accepts_cache_salt else {}
            h = self.llm.generate_async(ids, params, streaming=True, **kwargs)
        except Exception as e:
            self.emit(["reject", rid, _error_kind(e, self.dead() is not None), str(e)])
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
                    seqs.append([o.index, text, ids, [_lp_to_json(d) for d in lps] if lps else None,
                                 o.cumulative_logprob, o.finish_reason, o.stop_reason])
                plps = None
                if not sent_prompt_lps and out.prompt_logprobs:
                    plps = [_lp_to_json(d) for d in out.prompt_logprobs]
                    sent_prompt_lps = True
                self.emit(["d", rid, out.finished, replace, seqs, plps])
        except Exception as e:
            self.emit(["e", rid, _error_kind(e, self.dead() is not None), str(e)])
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

        llm = LLM(spec["model"], **_kwargs_from_json(spec["llm_kwargs"]))
    except BaseException as e:  # reported as one line by the parent
        text = " ".join(str(e).split()) or type(e).__name__
        if isinstance(e, MemoryError) or "out of memory" in text.lower():
            text = f"not enough memory: {text}"
        sock.sendall(_frame(["fatal", f"cannot load the model {spec['model']!r}: {text[:500]}"]))
        return 1
    try:
        info = llm_summary(llm)
        child = _Child(llm, sock)
        info["accepts_cache_salt"] = child.accepts_cache_salt
        sock.sendall(_frame(["ready", info]))
        asyncio.run(child.run())
        return 1 if child.dead() else 0
    finally:
        llm.shutdown()


if __name__ == "__main__":
    sys.exit(child_main(int(sys.argv[1])))
