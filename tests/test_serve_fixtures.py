"""Shared pieces of the test_serve_* modules (no tests here): the servers they share, metrics, raw HTTP.

Two servers are shared by every module of the process (started on first use, stopped at exit): stories260K
(no chat template) and the embedded quanta-tiny (with one), both with an API key and small request caps.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from quanta.serve.testing import shared_server  # noqa: E402

API_KEY = "sk-quanta-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TINY = Path(__file__).resolve().parents[1] / "src" / "quanta" / "assets" / "quanta-tiny"

# caps are small so the limit tests are cheap; KV caches small so startup is fast
STORIES_ARGS = ("--api-key", API_KEY, "--kv-cache-max-tokens", "65536", "--max-n", "8", "--max-best-of", "8",
                "--max-logprobs", "5", "--max-tokens-cap", "256", "--max-stop", "4", "--max-body-bytes", "65536")
TINY_ARGS = ("--api-key", API_KEY, "--kv-cache-max-tokens", "32768", "--max-tokens-cap", "64",
             "--served-model-name", "quanta-tiny")


def get_stories_server(stories_path):
    """The shared stories260K server (each module wraps this in a `stories_server` fixture)."""
    return shared_server(str(stories_path), *STORIES_ARGS)


def get_tiny_server():
    """The shared quanta-tiny server (chat)."""
    return shared_server(str(TINY), *TINY_ARGS)


def model_name(server) -> str:
    return server.model if "--served-model-name" not in server.args else \
        server.args[server.args.index("--served-model-name") + 1]


# --- metrics ---------------------------------------------------------------------------------------------

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(server, headers=AUTH) -> list[tuple[str, dict, float]]:
    status, body, _ = request(server, "GET", "/metrics", headers=headers)
    assert status == 200, body
    out = []
    for line in body.decode().splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m, line
        labels = dict(_LABEL.findall(m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


def metric(samples, name: str, **labels) -> float:
    """Sum of the samples named `name` whose labels include `labels`."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == str(x) for k, x in labels.items()))


def wait_idle(server, timeout: float = 20.0) -> list:
    """Poll /metrics until nothing runs, waits or holds KV blocks, and no HTTP request is in flight."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(server)
        state = {k: metric(s, k) for k in ("quanta:num_requests_running", "quanta:num_requests_waiting",
                                           "quanta:kv_cache_used_blocks", "quanta:num_requests_in_flight")}
        if not any(state.values()):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"server not idle after {timeout} s: {state}")
        time.sleep(0.05)


# --- raw HTTP (no client-side normalization of paths or bodies) ------------------------------------------


def request(server, method: str, path: str, body: bytes | str | dict | None = None, headers: dict | None = None,
            content_type: str | None = "application/json", timeout: float = 60.0) -> tuple[int, bytes, dict]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        h = dict(headers or {})
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogatepass")
        if body is not None and content_type is not None:
            h.setdefault("Content-Type", content_type)
        conn.request(method, path, body=body, headers=h)
        r = conn.getresponse()
        return r.status, r.read(), {k.lower(): v for k, v in r.getheaders()}
    finally:
        conn.close()


def post(server, path: str, body, headers=AUTH, **kw) -> tuple[int, dict]:
    status, raw, _ = request(server, "POST", path, body, headers=headers, **kw)
    return status, json.loads(raw) if raw else {}


def assert_envelope(body: dict, param: str | None = None, code: str | None = None) -> dict:
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    events = []
    for block in raw.decode().split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events
