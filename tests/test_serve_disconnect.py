"""Client disconnects (50 of 100 streams closed early, some before their first token; a non-streaming request
dropped mid-generation) abort their requests within about a second and free their KV blocks; the other
streams finish with the reference text. And /metrics reconciles with a known workload.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from .test_serve_fixtures import (
    AUTH,
    get_stories_server,
    metric,
    post,
    scrape,
    wait_idle,
)


@pytest.fixture(scope="module")
def stories_server(stories_path):
    return get_stories_server(stories_path)


httpx = pytest.importorskip("httpx")

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "Tom had a red ball"]
ABORT = "quanta:request_success_total"


def _aborted(samples) -> float:
    return metric(samples, ABORT, finished_reason="abort")


async def _streams(url: str, aborted_before: float):
    """100 streams at once: 50 read to the end, 40 closed after their first text chunk, 10 closed as soon as
    the response starts (before any token). Returns (kept results, seconds from the last close until /metrics
    counted all 50 aborts)."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    closes: list[float] = []
    all_closed = asyncio.Event()
    async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=120) as client:

        async def keep(i: int):
            prompt = PROMPTS[i % len(PROMPTS)]
            body = {"prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}
            text, events, finish = "", [], []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if not line:
                        continue
                    assert line.startswith("data: ")
                    events.append(line[6:])
                    if line[6:] == "[DONE]":
                        continue
                    for c in json.loads(line[6:])["choices"]:
                        text += c["text"]
                        if c["finish_reason"]:
                            finish.append(c["finish_reason"])
            return prompt, text, events, finish

        async def drop(i: int):
            body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 200, "ignore_eos": True, "temperature": 0,
                    "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                if i % 5:  # 40 of 50: after the first text chunk
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                            break
            closes.append(time.monotonic())
            if len(closes) == 50:
                all_closed.set()

        async def watch() -> float:
            await all_closed.wait()
            async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=30) as mc:
                while True:
                    text = (await mc.get("/metrics")).text
                    n = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                            if line.startswith(ABORT) and 'finished_reason="abort"' in line)
                    if n - aborted_before >= 50:
                        return time.monotonic() - max(closes)
                    await asyncio.sleep(0.02)

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*[keep(i) if i % 2 == 0 else drop(i) for i in range(100)])
        took = await asyncio.wait_for(watcher, 30)
    return [r for r in results if r is not None], took


@pytest.mark.timeout(240)
def test_50_of_100_streams_closed_early(stories_server):
    refs = {}
    for p in PROMPTS:
        status, out = post(stories_server, "/v1/completions", {"prompt": p, "max_tokens": 24, "temperature": 0})
        assert status == 200, (out, stories_server.output)
        refs[p] = out["choices"][0]["text"]
    before = wait_idle(stories_server)
    kept, took = asyncio.run(_streams(stories_server.url, _aborted(before)))
    after = wait_idle(stories_server)
    assert _aborted(after) - _aborted(before) == 50
    # the aborts were seen within about a second of the last close
    assert took < 1.5, f"aborts took {took:.2f} s after the last close"
    # their KV blocks are free again, nothing left running
    assert metric(after, "quanta:kv_cache_used_blocks") == 0
    assert metric(after, "quanta:kv_cache_usage_perc") == 0
    # the other 50 finished correctly: the reference text, one finish_reason, [DONE] once at the end
    assert len(kept) == 50
    for prompt, text, events, finish in kept:
        assert text == refs[prompt]
        assert len(finish) == 1 and events[-1] == "[DONE]" and events.count("[DONE]") == 1
    finished = sum(metric(after, ABORT, finished_reason=r) - metric(before, ABORT, finished_reason=r)
                   for r in ("stop", "length"))
    assert finished == 50


@pytest.mark.timeout(120)
def test_non_streaming_disconnect_aborts(stories_server):
    before = wait_idle(stories_server)
    host, port = stories_server.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 250, "ignore_eos": True,
                       "temperature": 0}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    socks = []
    for _ in range(3):
        s = socket.create_connection((host, int(port)))
        s.sendall(head + body)
        socks.append(s)
    deadline = time.monotonic() + 30
    while metric(scrape(stories_server), "quanta:num_requests_running") < 3:  # generating
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for s in socks:
        s.close()
    closed = time.monotonic()
    while _aborted(scrape(stories_server)) - _aborted(before) < 3:
        assert time.monotonic() - closed < 5, "non-streaming requests not aborted"
        time.sleep(0.02)
    took = time.monotonic() - closed
    after = wait_idle(stories_server)
    assert took < 1.5, f"aborts took {took:.2f} s"
    assert metric(after, "quanta:kv_cache_used_blocks") == 0
    gen = metric(after, "quanta:generation_tokens_total") - metric(before, "quanta:generation_tokens_total")
    assert 0 < gen < 3 * 250  # stopped early


@pytest.mark.timeout(120)
def test_metrics_reconcile_with_a_known_workload(stories_server):
    before = wait_idle(stories_server)
    workload = [
        {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0},
        {"prompt": "The little dog", "max_tokens": 7, "temperature": 0, "ignore_eos": True},
        {"prompt": ["Tom had a red ball", "Mom said"], "max_tokens": 5, "temperature": 0},
        {"prompt": "Lily and Ben went to the park", "max_tokens": 6, "n": 3, "temperature": 0.7, "seed": 1},
        {"prompt": [1, 403, 407], "max_tokens": 40, "temperature": 0, "stop": ["."]},
        {"prompt": "Once upon a time", "max_tokens": 9, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True}},
    ]
    prompt_tokens = completion_tokens = engine_requests = 0
    reasons: dict[str, int] = {}
    for body in workload:
        if body.get("stream"):
            with httpx.Client(base_url=stories_server.url, headers=AUTH, timeout=60) as c:
                r = c.post("/v1/completions", json=body)
            chunks = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
            usage = chunks[-1]["usage"]
            finishes = [(ch["index"], ch["finish_reason"]) for c in chunks for ch in c["choices"]
                        if ch["finish_reason"]]
        else:
            status, out = post(stories_server, "/v1/completions", body)
            assert status == 200, out
            usage = out["usage"]
            finishes = [(c["index"], c["finish_reason"]) for c in out["choices"]]
        n = body.get("n", 1)
        prompts = 2 if isinstance(body["prompt"], list) and isinstance(body["prompt"][0], str) else 1
        engine_requests += prompts
        for index, reason in finishes:
            if index % n == 0:  # one per engine request: its first output's reason
                reasons[reason] = reasons.get(reason, 0) + 1
        prompt_tokens += usage["prompt_tokens"]
        completion_tokens += usage["completion_tokens"]
    for bad in ({"prompt": "a", "n": 0}, {"prompt": "a", "max_tokens": "x"}):
        assert post(stories_server, "/v1/completions", bad)[0] == 400
    after = wait_idle(stories_server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("quanta:prompt_tokens_total") == prompt_tokens
    assert delta("quanta:generation_tokens_total") == completion_tokens
    assert delta("quanta:request_prompt_tokens_sum") == prompt_tokens
    assert delta("quanta:request_generation_tokens_sum") == completion_tokens
    for name in ("quanta:request_prompt_tokens_count", "quanta:e2e_request_latency_seconds_count",
                 "quanta:time_to_first_token_seconds_count"):
        assert delta(name) == engine_requests, name
    assert delta(ABORT) == engine_requests
    for reason, count in reasons.items():
        assert delta(ABORT, finished_reason=reason) == count, reason
    assert delta("quanta:http_request_errors_total", status="400") == 2
    assert delta("quanta:num_preemptions_total") == 0
    assert metric(after, "quanta:kv_cache_usage_perc") == 0 and metric(after, "quanta:engine_alive") == 1
    # the histograms are well formed: +Inf bucket == count
    inf = metric(after, "quanta:e2e_request_latency_seconds_bucket", le="+Inf")
    assert inf == metric(after, "quanta:e2e_request_latency_seconds_count") > 0
