"""Server lifecycle: SIGTERM drains in-flight requests (then aborts them after --shutdown-timeout), the queue cap
answers 503 with Retry-After, a dead engine turns /health 503 and the server exits non-zero, startup failures
print one clear line and exit non-zero; YAML options lose to the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from .test_serve_fixtures import AUTH, metric, post, request, scrape

httpx = pytest.importorskip("httpx")

from quanta.serve.testing import TEST_ENV, ServerProcess  # noqa: E402


class Stream(threading.Thread):
    """A streaming completion read in a thread: .first is set at the first text chunk."""

    def __init__(self, server, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = server.url, dict(body, stream=True, stream_options={"include_usage": True})
        self.first = threading.Event()
        self.events: list[str] = []
        self.text = ""
        self.error: BaseException | None = None
        self.status: int | None = None

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, headers=AUTH, timeout=120) as c:
                with c.stream("POST", "/v1/completions", json=self.body) as r:
                    self.status = r.status_code
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        self.events.append(line[6:])
                        if line[6:].startswith("{"):
                            for ch in json.loads(line[6:]).get("choices", []):
                                self.text += ch["text"]
                                if ch["text"]:
                                    self.first.set()
        except BaseException as e:  # the connection cut by the server: recorded
            self.error = e
        finally:
            self.first.set()

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1] == "[DONE]"

    @property
    def usage(self) -> dict | None:
        for e in reversed(self.events):
            if e.startswith("{") and json.loads(e).get("usage"):
                return json.loads(e)["usage"]
        return None


def _no_process_group(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.timeout(120)
def test_sigterm_drains_in_flight_requests(stories_path):
    srv = ServerProcess(str(stories_path), "--kv-cache-max-tokens", "16384", "--shutdown-timeout", "60", env=TEST_ENV).start()
    try:
        streams = [Stream(srv, {"prompt": "Once upon a time", "max_tokens": 60, "ignore_eos": True,
                                "temperature": 0}) for _ in range(4)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.first.wait(60)
        srv.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connections while draining
            socket.create_connection(srv.url.removeprefix("http://").rsplit(":", 1), timeout=2).close()
        for s in streams:
            s.join(60)
            assert s.error is None and s.done, (s.error, s.events[-3:])
            assert s.usage["completion_tokens"] == 60
        assert srv.wait(60) == 0
        assert _no_process_group(srv.proc.pid)
    finally:
        srv.stop(signal.SIGKILL)


@pytest.mark.timeout(120)
def test_queue_cap_then_sigterm_timeout_aborts(stories_path):
    srv = ServerProcess(str(stories_path), "--kv-cache-max-tokens", "16384", "--max-batch-size", "1",
                        "--max-queued-requests", "2", "--shutdown-timeout", "1", env=TEST_ENV).start()
    try:
        long = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
        running = Stream(srv, long)
        running.start()
        assert running.first.wait(60)
        queued = [Stream(srv, long) for _ in range(2)]
        for s in queued:
            s.start()
        deadline = time.monotonic() + 30
        while metric(scrape(srv, headers={}), "quanta:num_requests_waiting") < 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        status, raw, headers = request(srv, "POST", "/v1/completions", long)
        assert status == 503, raw
        assert headers.get("retry-after") == "1"
        assert json.loads(raw)["error"]["code"] == "overloaded"
        # SIGTERM: the requests cannot finish within --shutdown-timeout 1: they are cut, the server exits 0
        t0 = time.monotonic()
        srv.send_signal(signal.SIGTERM)
        assert srv.wait(30) == 0
        assert time.monotonic() - t0 < 15
        for s in [running, *queued]:
            s.join(30)
            assert not s.is_alive()
        assert not all(s.done for s in [running, *queued])
        assert _no_process_group(srv.proc.pid)
    finally:
        srv.stop(signal.SIGKILL)


FAULT = """
import quanta.engine.engine as _engine
_step = _engine.LLMEngine.step
def _faulty_step(self):
    if any(r.params.max_tokens == 77 for r in self.requests.values()):
        raise RuntimeError("injected engine fault")
    return _step(self)
_engine.LLMEngine.step = _faulty_step
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["--engine-process", "--no-engine-process"])
def test_engine_death_fails_requests_and_exits_nonzero(stories_path, mode):
    # the fault goes where the engine runs: this process, or (through CHILD_PRELUDE) the engine process
    prelude = FAULT + f"\nimport quanta.serve.engine_client as _ec\n_ec.CHILD_PRELUDE = {FAULT!r}\n"
    srv = ServerProcess(str(stories_path), "--kv-cache-max-tokens", "16384", mode, prelude=prelude,
                        env=TEST_ENV).start()
    try:
        stream = Stream(srv, {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True})
        stream.start()
        assert stream.first.wait(60)
        status, out = post(srv, "/v1/completions", {"prompt": "a", "max_tokens": 77}, headers={})
        assert status == 503, out
        assert out["error"]["code"] == "engine_unavailable"
        try:
            status, _, _ = request(srv, "GET", "/health", timeout=5)
            assert status == 503
        except OSError:  # already gone
            pass
        stream.join(30)
        # the stream ends with an error event (then the [DONE] marker): no finish_reason, no usage
        assert stream.events[-1] == "[DONE]" and '"error"' in stream.events[-2], stream.events[-3:]
        assert "finish_reason\":\"length" not in "".join(stream.events) and stream.usage is None
        assert srv.wait(30) == 1
        assert "the engine loop died" in srv.output
        assert ("engine process" in srv.output) == (mode == "--engine-process")
        assert _no_process_group(srv.proc.pid)
    finally:
        srv.stop(signal.SIGKILL)


@pytest.mark.timeout(60)
def test_engine_process_dies_with_a_killed_server(stories_path):
    srv = ServerProcess(str(stories_path), "--kv-cache-max-tokens", "4096", env=TEST_ENV).start()
    try:
        children = [int(c) for t in os.listdir(f"/proc/{srv.proc.pid}/task")
                    for c in open(f"/proc/{srv.proc.pid}/task/{t}/children").read().split()]
        assert len(children) == 1  # the engine process
        srv.proc.kill()  # SIGKILL: no chance to clean up
        srv.wait(10)

        def state() -> str:  # X: gone; Z: dead, not yet reaped by init
            try:
                return open(f"/proc/{children[0]}/stat").read().rsplit(")", 1)[1].split()[0]
            except OSError:
                return "X"

        deadline = time.monotonic() + 10
        while state() not in ("X", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state() in ("X", "Z"), f"engine process {children[0]} outlived the server (state {state()})"
    finally:
        srv.stop(signal.SIGKILL)


# --- startup ---------------------------------------------------------------------------------------------


def _serve(argv: list[str], capsys) -> tuple[int, str]:
    from quanta.cli import main

    rc = main(["serve", *argv])
    return rc, capsys.readouterr().err


@pytest.mark.timeout(60)
def test_startup_failures_print_one_line(stories_path, tmp_path, capsys):
    # a missing model, in a real process: one line on stderr, exit 1
    p = subprocess.run([sys.executable, "-m", "quanta.cli", "serve", str(tmp_path / "no-model"), "--port", "0"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("quanta serve: error: cannot load the model"), p.stderr
    # a port in use: fails before loading the model
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        t0 = time.monotonic()
        rc, err = _serve([str(stories_path), "--port", str(busy.getsockname()[1])], capsys)
        assert rc == 1 and "address already in use" in err and err.count("\n") == 1
        assert time.monotonic() - t0 < 10
    finally:
        busy.close()
    # bad options
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max-batchsize: 4\n")
    rc, err = _serve([str(stories_path), "--config", str(cfg)], capsys)
    assert rc == 1 and "unknown option 'max-batchsize'" in err and "max-batch-size" in err
    cfg.write_text("max-n: many\n")
    rc, err = _serve([str(stories_path), "--config", str(cfg)], capsys)
    assert rc == 1 and "max-n must be a int" in err
    cfg.write_text("[unclosed\n")
    rc, err = _serve([str(stories_path), "--config", str(cfg)], capsys)
    assert rc == 1 and "not valid YAML" in err
    rc, err = _serve([str(stories_path), "--chat-template", str(tmp_path / "none.jinja")], capsys)
    assert rc == 1 and "chat template file" in err
    rc, err = _serve([str(stories_path), "--port", "70000"], capsys)
    assert rc == 2 and "--port" in err


def test_command_line_beats_yaml_beats_defaults(tmp_path):
    from quanta.serve.cli import llm_kwargs, register, resolve_options

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("max-n: 3\nport: 9001\nmax_batch_size: 7\nkv-cache-max-tokens: 4096\nenable-chunked-prefill: true\n"
                   "model: from-yaml\n")
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    handlers = register(sub)
    assert set(handlers) == {"serve", "bench-serve"}
    o = resolve_options(parser.parse_args(["serve", "--config", str(cfg), "--max-n", "5",
                                           "--no-enable-chunked-prefill"]))
    assert o["max_n"] == 5 and o["port"] == 9001 and o["max_batch_size"] == 7 and o["host"] == "127.0.0.1"
    assert o["model"] == "from-yaml" and o["enable_chunked_prefill"] is False and o["max_stop"] == 16
    kw = llm_kwargs(o)
    assert kw["max_batch_size"] == 7 and kw["kv_cache_config"].max_tokens == 4096
    assert "enable_chunked_prefill" not in kw
    o = resolve_options(parser.parse_args(["serve", "m", "--config", str(cfg)]))
    assert o["model"] == "m" and o["max_n"] == 3 and o["enable_chunked_prefill"] is True
