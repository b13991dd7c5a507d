"""POST /v1/chat/completions: messages -> the chat template -> one engine request with `n` completions, as
one JSON body or as SSE chunks (a role delta per choice first), with chat logprobs."""

from __future__ import annotations

import time
import uuid
from functools import partial

from quanta.serve.errors import bad_request
from quanta.serve.jobs import Job
from quanta.serve.prompts import truncate
from quanta.serve.protocol import ChatCompletionRequest
from quanta.serve.responses import ChunkWriter, finish_reason
from quanta.serve.server import OpenAIServer
from quanta.serve.validation import parse, refuse_unsupported


async def chat_completions(server: OpenAIServer, request):
    arrival = time.monotonic()
    checks = server.checks
    data = await checks.read_json(request)
    checks.check_model(data)
    req = parse(ChatCompletionRequest, data)
    refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    asked, asked_name = ((req.max_completion_tokens, "max_completion_tokens")
                         if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
    checks.check_caps(req, logprobs, "top_logprobs", asked, asked_name)
    text = server.prompts.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
    ids = server.prompts.encode(text, req.add_special_tokens, "messages")
    prompts = truncate([(text, ids)], req.truncate_prompt_tokens)
    server.prompts.check_ids(prompts[0][1], "messages")
    max_tokens = checks.resolve_max_tokens(asked, None, len(prompts[0][1]), asked_name)
    names = {"max_tokens": asked_name, "embedding_bias": "logit_bias", "beam_width": "use_beam_search",
             "logprobs": "top_logprobs"}
    params = checks.sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None,
                                    param_names=names)
    jobs = await server.submit(prompts, params, arrival, names, req.cache_salt)
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    stream_fn = partial(_stream, server, req, rid, created, logprobs) if req.stream else None
    return await server.respond(request, jobs, stream_fn, partial(_body, server, req, rid, created, logprobs))


def _body(server: OpenAIServer, req, rid: str, created: int, k: int | None, jobs: list[Job]) -> dict:
    choices = []
    for o in jobs[0].handle.outputs:
        lp = {"content": server.logprobs.chat(o.token_ids, o.logprobs, k)} if k is not None else None
        choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text, "tool_calls": []},
                        "logprobs": lp, "finish_reason": finish_reason(o.finish_reason),
                        "stop_reason": o.stop_reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": server.cfg.model_name,
            "choices": choices, "usage": server.usage(jobs), "system_fingerprint": None}


def _stream(server: OpenAIServer, req, rid: str, created: int, k: int | None, jobs: list[Job], release):
    chunks = ChunkWriter(rid, "chat.completion.chunk", created, server.cfg.model_name, req.stream_options,
                         partial(server.usage, jobs))
    roles = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
             for i in range(req.n)]

    def choice(job: Job, o, took, before: int) -> dict:
        text, toks, lps, fin, _ = took
        lp = {"content": server.logprobs.chat(toks, lps, k)} if k is not None else None
        delta = {"content": text} if text or not fin else {}
        return {"index": o.index, "delta": delta, "logprobs": lp,
                "finish_reason": finish_reason(o.finish_reason) if fin else None,
                "stop_reason": o.stop_reason if fin else None}

    return server.stream(jobs, release, chunks, choice, first_choices=roles)
