"""Property-based fuzzing of the request schema (hypothesis, bounded): zero 5xx, every error in the envelope,
every stream well terminated, and the server idle and healthy after.

Bodies mix valid values with wrong types, out-of-range numbers, odd strings and unknown fields.
"""

from __future__ import annotations

import json

import pytest

from .test_serve_fixtures import (
    AUTH,
    assert_envelope,
    get_stories_server,
    get_tiny_server,
    model_name,
    request,
    sse_events,
    wait_idle,
)


@pytest.fixture(scope="module")
def stories_server(stories_path):
    return get_stories_server(stories_path)


@pytest.fixture(scope="module")
def tiny_server():
    return get_tiny_server()


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = dict(deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
junk = st.recursive(scalar, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                    max_leaves=5)


def floats(lo, hi):
    return st.floats(lo, hi) | st.sampled_from([0.0, 1e-30, 1e30, float("nan"), float("inf"), -0.0])


text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=20) | st.sampled_from(
    ["Once upon a time", "\u0000", "</s>", "<s> hi", "\n\n", "日本", "\U0001f600", " "])
stop_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=4)

# in-range values of every field (a valid body may still be refused: best_of < n, min_tokens > max_tokens ...)
VALID = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2) | st.sampled_from([0, 1e-30]),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(-1, 600) | st.just(10 ** 9),
    "min_p": st.floats(0, 1),
    "n": st.integers(1, 4),
    "best_of": st.integers(1, 6),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                          "continuous_usage_stats": st.booleans()}),
    "stop": stop_text | st.lists(stop_text, max_size=4),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=3),
    "seed": st.integers(0, 2 ** 63),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.1, 3),
    "logit_bias": st.dictionaries(st.integers(0, 511).map(str), st.floats(-100, 100), max_size=3),
    "ignore_eos": st.booleans(),
    "min_tokens": st.integers(0, 3),
    "include_stop_str_in_output": st.booleans(),
    "user": text,
    "truncate_prompt_tokens": st.integers(1, 6),
    "skip_special_tokens": st.booleans(),
    "spaces_between_special_tokens": st.booleans(),
}
COMPLETION = {
    **VALID,
    "prompt": text | st.lists(st.integers(0, 511), min_size=1, max_size=6) | st.lists(text, min_size=1, max_size=2)
    | st.lists(st.lists(st.integers(0, 511), min_size=1, max_size=4), min_size=1, max_size=2),
    "logprobs": st.integers(0, 5),
    "echo": st.booleans(),
    "add_special_tokens": st.booleans(),
}
content_part = st.fixed_dictionaries({"type": st.just("text"), "text": text})
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                 "content": text | st.lists(content_part, min_size=1, max_size=2)},
                                optional={"name": text})
CHAT = {
    **VALID,
    "max_completion_tokens": st.integers(1, 6),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 5),
    "add_generation_prompt": st.booleans(),
}
# what may replace a field in a mutated body: wrong types, out-of-range values, odd strings
BAD = st.one_of(junk, st.integers(-(2 ** 70), 2 ** 70), floats(-1e9, 1e9),
                st.sampled_from(["", "\ud800", "a\udfffb", [], {}, [[]], -1, 0, 10 ** 6, True]))
EXTRA = {"response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}]), "suffix": text,
         "tools": st.just([{"type": "function", "function": {"name": "f"}}]),
         "tool_choice": st.sampled_from(["none", "auto"]), "use_beam_search": st.booleans()}


@st.composite
def bodies(draw, fields: dict, required: str, required_value):
    """A body of valid fields (about half the time), else with one or two fields broken or unknown."""
    names = draw(st.lists(st.sampled_from(sorted(fields)), max_size=6, unique=True))
    body = {name: draw(fields[name]) for name in names}
    body[required] = draw(required_value)
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = draw(st.integers(1, 6))
    if draw(st.booleans()):
        for _ in range(draw(st.integers(1, 2))):
            kind = draw(st.integers(0, 3))
            if kind == 0:
                body[draw(st.text(max_size=8))] = draw(junk)
            elif kind == 1:
                name = draw(st.sampled_from(sorted(EXTRA)))
                body[name] = draw(EXTRA[name])
            elif kind == 2 and body:
                body.pop(draw(st.sampled_from(sorted(body))))
            else:
                body[draw(st.sampled_from(sorted(fields)))] = draw(BAD)
    return body


completion_body = bodies(COMPLETION, "prompt", COMPLETION["prompt"])
chat_body = bodies(CHAT, "messages", st.lists(message, min_size=1, max_size=3))
tokenize_body = st.fixed_dictionaries({}, optional={"prompt": text | BAD, "tokens": st.lists(st.integers(-2, 600),
                                      max_size=5) | BAD, "messages": st.lists(message, max_size=2) | BAD,
                                      "add_special_tokens": st.booleans() | BAD})


def _check(server, path: str, body) -> None:
    if isinstance(body, dict) and "model" not in body and len(body) % 3 == 0:
        body["model"] = model_name(server)
    raw = json.dumps(body, allow_nan=True) if isinstance(body, dict) else body
    status, out, headers = request(server, "POST", path, raw, headers=AUTH, timeout=120)
    assert status < 500, (status, out[:500], raw[:500])
    if status != 200:
        assert status in (400, 404, 413), (status, out[:300])
        assert_envelope(json.loads(out))
        return
    if headers["content-type"].startswith("text/event-stream"):
        events = sse_events(out)
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1, events[-3:]
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        data = json.loads(out)
        assert data["choices"] and data["usage"]["total_tokens"] == (
            data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"])


@pytest.mark.timeout(150)
def test_fuzz_completions(stories_server):
    @settings(max_examples=250, **SETTINGS)
    @given(body=completion_body | completion_body | completion_body | st.binary(max_size=40)
           | junk.map(lambda j: json.dumps(j)))
    def run(body):
        _check(stories_server, "/v1/completions", body)

    run()
    status, _, _ = request(stories_server, "GET", "/health")
    assert status == 200
    wait_idle(stories_server)


@pytest.mark.timeout(150)
def test_fuzz_chat(tiny_server):
    @settings(max_examples=120, **SETTINGS)
    @given(body=chat_body)
    def run(body):
        _check(tiny_server, "/v1/chat/completions", body)

    run()
    status, _, _ = request(tiny_server, "GET", "/health")
    assert status == 200
    wait_idle(tiny_server)


@pytest.mark.timeout(60)
def test_fuzz_tokenize_detokenize(stories_server):
    @settings(max_examples=60, **SETTINGS)
    @given(path=st.sampled_from(["/tokenize", "/detokenize"]), body=tokenize_body)
    def run(path, body):
        status, out, _ = request(stories_server, "POST", path, json.dumps(body), headers=AUTH)
        assert status < 500, (status, out[:300], body)
        if status != 200:
            assert_envelope(json.loads(out))

    run()
