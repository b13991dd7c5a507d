"""The OpenAI-compatible server through the official `openai` client (issue 8): completions and chat, streamed
and not, n > 1, logprobs, usage; greedy text streamed == non-streamed == `LLM.generate`.

Real server processes on loopback (stories260K; quanta-tiny for chat), shared with the other test_serve_*
modules.
"""

from __future__ import annotations

import json

import pytest

from quanta import SamplingParams

from .async_helpers import make_llm
from .test_serve_fixtures import (
    API_KEY,
    AUTH,
    TINY,
    get_stories_server,
    get_tiny_server,
    model_name,
    post,
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


openai = pytest.importorskip("openai")

PROMPTS = ["Once upon a time", "The little dog", "Lily and Ben went to the park", "Tom had a red ball"]


@pytest.fixture(scope="module")
def client(stories_server):
    return openai.OpenAI(base_url=stories_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tiny_client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url, api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def stories_llm_ref(stories_path):
    llm = make_llm(stories_path)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def tiny_llm_ref():
    llm = make_llm(TINY)
    yield llm
    llm.shutdown()


@pytest.fixture(autouse=True)
def _idle_after(request):
    yield
    for name in ("stories_server", "tiny_server"):
        if name in request.fixturenames:
            wait_idle(request.getfixturevalue(name))


def _stream_completion(client, **kw):
    text, usage, finish, chunks = {}, None, {}, 0
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        chunks += 1
        if chunk.usage is not None:
            assert not chunk.choices
            usage = chunk.usage
        for c in chunk.choices:
            text[c.index] = text.get(c.index, "") + c.text
            if c.finish_reason is not None:
                assert c.index not in finish, "two finish_reasons for one choice"
                finish[c.index] = c.finish_reason
    return text, usage, finish, chunks


@pytest.mark.timeout(120)
def test_completions_greedy_streamed_equals_non_streamed_equals_llm_generate(client, stories_server,
                                                                            stories_llm_ref):
    model = model_name(stories_server)
    refs = stories_llm_ref.generate(PROMPTS, SamplingParams(max_tokens=40), use_tqdm=False)
    for prompt, ref in zip(PROMPTS, refs):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0)
        assert r.object == "text_completion" and r.model == model and r.id.startswith("cmpl-")
        choice = r.choices[0]
        assert choice.text == ref.outputs[0].text
        assert choice.finish_reason == ref.outputs[0].finish_reason
        assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
        assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        text, usage, finish, chunks = _stream_completion(client, model=model, prompt=prompt, max_tokens=40,
                                                         temperature=0)
        assert text == {0: ref.outputs[0].text}
        assert finish == {0: choice.finish_reason}
        assert usage.completion_tokens == r.usage.completion_tokens
        assert usage.prompt_tokens == r.usage.prompt_tokens
        assert chunks >= 3  # really streamed


@pytest.mark.timeout(120)
def test_completions_n_logprobs_and_usage(client, stories_server):
    model = model_name(stories_server)
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, n=3, temperature=0.8,
                                  seed=7, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    total = 0
    for c in r.choices:
        lp = c.logprobs
        n = len(lp.tokens)
        assert n == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
        assert all(isinstance(x, float) and x <= 0 for x in lp.token_logprobs)
        assert all(1 <= len(t) <= 3 for t in lp.top_logprobs)  # top-2 (+ the sampled token)
        assert lp.text_offset == sorted(lp.text_offset)
        total += n
    assert r.usage.completion_tokens == total
    assert r.usage.prompt_tokens == 5
    # the same seed gives the same choices, streamed or not
    text, usage, finish, _ = _stream_completion(client, model=model, prompt="Once upon a time", max_tokens=12, n=3,
                                                temperature=0.8, seed=7)
    assert text == {c.index: c.text for c in r.choices}
    assert usage.completion_tokens == r.usage.completion_tokens
    assert set(finish) == {0, 1, 2}


@pytest.mark.timeout(120)
def test_completions_prompt_forms_batch_stop_echo(client, stories_server, stories_llm_ref):
    model = model_name(stories_server)
    ids = stories_llm_ref.tokenizer.encode("The little dog")
    # a list of prompts (text and token ids), n=2: choice index = prompt * n + i
    r = client.completions.create(model=model, prompt=["Once upon a time", "Tom had a red ball"], max_tokens=8,
                                  temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    single = client.completions.create(model=model, prompt="Tom had a red ball", max_tokens=8, temperature=0)
    assert r.choices[2].text == single.choices[0].text
    assert r.usage.completion_tokens == 32
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=model, prompt="The little dog", max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)
    # stop strings cut the text; stop_reason names the string
    full = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0)
    stop_word = full.choices[0].text.split()[3]
    cut = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0,
                                    stop=[stop_word])
    assert cut.choices[0].finish_reason == "stop"
    assert stop_word not in cut.choices[0].text
    assert full.choices[0].text.startswith(cut.choices[0].text)
    assert cut.model_extra is not None
    assert cut.choices[0].model_extra.get("stop_reason") == stop_word
    kept = client.completions.create(model=model, prompt="Once upon a time", max_tokens=30, temperature=0,
                                     stop=[stop_word], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == cut.choices[0].text + stop_word
    # echo puts the prompt first; with logprobs the prompt tokens come first too
    echo = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0, echo=True,
                                     logprobs=1)
    gen = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
    assert echo.choices[0].text == "Once upon a time" + gen.choices[0].text
    assert len(echo.choices[0].logprobs.tokens) == echo.usage.prompt_tokens + echo.usage.completion_tokens
    assert echo.choices[0].logprobs.token_logprobs[0] is None


@pytest.mark.timeout(120)
def test_sse_wire_format(stories_server):
    body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0, "stream": True, "n": 2,
            "stream_options": {"include_usage": True}}
    status, raw, headers = request(stories_server, "POST", "/v1/completions", body, headers=AUTH)
    assert status == 200
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    usage_chunks = [c for c in chunks if c["usage"] is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1] and chunks[-1]["choices"] == []
    finishes = [ch["index"] for c in chunks for ch in c["choices"] if ch["finish_reason"] is not None]
    assert sorted(finishes) == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 20
    # without include_usage: no usage key at all
    body["stream_options"] = None
    del body["stream_options"]
    status, raw, _ = request(stories_server, "POST", "/v1/completions", body, headers=AUTH)
    chunks = [json.loads(e) for e in sse_events(raw)[:-1]]
    assert all("usage" not in c for c in chunks)


@pytest.mark.timeout(150)
def test_chat_quanta_tiny(tiny_client, tiny_server, tiny_llm_ref):
    model = model_name(tiny_server)
    messages = [{"role": "system", "content": "You tell short stories."},
                {"role": "user", "content": "Tell me about a cat."}]
    tok = tiny_llm_ref.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.encode(text, add_special_tokens=False)
    ref = tiny_llm_ref.generate(ids, SamplingParams(max_tokens=30), use_tqdm=False).outputs[0]
    r = tiny_client.chat.completions.create(model=model, messages=messages, max_tokens=30, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content == ref.text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(ref.token_ids)
    assert r.choices[0].finish_reason == ref.finish_reason
    # streamed: role first, then content deltas that add up to the same text
    content, roles, finish, usage = "", [], None, None
    stream = tiny_client.chat.completions.create(model=model, messages=messages, max_completion_tokens=30,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            content += c.delta.content or ""
            if c.finish_reason:
                finish = c.finish_reason
    assert roles == ["assistant"] and content == ref.text and finish == ref.finish_reason
    assert usage.completion_tokens == len(ref.token_ids)
    # n > 1 with logprobs
    r = tiny_client.chat.completions.create(model=model, messages=messages, max_tokens=10, n=2, temperature=0.9,
                                            seed=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    total = 0
    for c in r.choices:
        content = c.logprobs.content
        assert content and all(len(t.top_logprobs) == 2 for t in content)
        assert all(t.logprob <= 0 and t.bytes == list(t.token.encode()) for t in content)
        total += len(content)
    assert r.usage.completion_tokens == total
    # the default max_tokens is the server's cap (64) when the context allows it
    r = tiny_client.chat.completions.create(model=model, messages=messages, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 64 and r.choices[0].finish_reason == "length"


@pytest.mark.timeout(60)
def test_models_tokenize_detokenize_version(stories_server, tiny_server, stories_llm_ref):
    status, body, _ = request(stories_server, "GET", "/v1/models", headers=AUTH)
    card = json.loads(body)["data"][0]
    assert status == 200 and card["id"] == model_name(stories_server) and card["max_model_len"] == 512
    status, body, _ = request(stories_server, "GET", "/v1/models/" + model_name(stories_server), headers=AUTH)
    assert status == 200 and json.loads(body)["id"] == card["id"]
    status, tok = post(stories_server, "/tokenize", {"prompt": "Once upon a time"})
    assert status == 200 and tok["tokens"] == stories_llm_ref.tokenizer.encode("Once upon a time")
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    status, detok = post(stories_server, "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"] == stories_llm_ref.tokenizer.decode(tok["tokens"])
    status, chat_tok = post(tiny_server, "/tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200 and chat_tok["count"] > 2
    status, body, _ = request(stories_server, "GET", "/version", headers=AUTH)
    assert status == 200 and json.loads(body)["version"]


@pytest.mark.timeout(60)
def test_in_process_app_matches_llm_generate(stories_llm_ref):
    """create_app(llm) serves an LLM of this process (LocalEngine): the same text as LLM.generate."""
    import asyncio

    httpx = pytest.importorskip("httpx")
    from quanta.serve import ServeConfig, create_app

    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # --chat-template, for a model with none
    app = create_app(stories_llm_ref, ServeConfig(model_name="stories", chat_template=template))
    ref = stories_llm_ref.generate("Once upon a time", SamplingParams(max_tokens=16), use_tqdm=False)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.post("/v1/completions", json={"model": "stories", "prompt": "Once upon a time",
                                                      "max_tokens": 16, "temperature": 0})
            assert r.status_code == 200, r.text
            s = await c.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 16,
                                                      "temperature": 0, "stream": True})
            events = sse_events(s.content)
            text = "".join(ch["text"] for e in events[:-1] for ch in json.loads(e)["choices"])
            m = await c.get("/metrics")
            chat = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 16, "temperature": 0})
            assert chat.status_code == 200, chat.text
            return r.json(), text, m.text, chat.json()

    body, streamed, metrics, chat = asyncio.run(run())
    # the template renders the bare content, tokenized without special tokens: no BOS, so a different prompt
    assert chat["usage"]["prompt_tokens"] == len(stories_llm_ref.tokenizer.encode("Once upon a time",
                                                                                  add_special_tokens=False))
    assert chat["usage"]["completion_tokens"] > 0 and chat["choices"][0]["message"]["content"]
    assert body["choices"][0]["text"] == streamed == ref.outputs[0].text
    assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
    assert 'quanta:generation_tokens_total{model_name="stories"} 32.0' in metrics
