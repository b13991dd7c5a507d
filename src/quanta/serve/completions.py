"""POST /v1/completions: prompts (text or token ids, one or several) -> one engine request each; `n`
completions of each, as one JSON body or as SSE chunks, with echo and legacy logprobs."""

from __future__ import annotations

import time
import uuid
from functools import partial

from quanta.serve.jobs import Job
from quanta.serve.prompts import truncate
from quanta.serve.protocol import CompletionRequest
from quanta.serve.responses import ChunkWriter, finish_reason
from quanta.serve.server import OpenAIServer
from quanta.serve.validation import parse, refuse_unsupported

# SamplingParams field -> the request field an error names
_PARAM_NAMES = {"embedding_bias": "logit_bias", "beam_width": "use_beam_search", "prompt_logprobs": "logprobs"}


async def completions(server: OpenAIServer, request):
    arrival = time.monotonic()
    checks = server.checks
    data = await checks.read_json(request)
    checks.check_model(data)
    req = parse(CompletionRequest, data)
    refuse_unsupported(req)
    checks.check_caps(req, req.logprobs, "logprobs", req.max_tokens, "max_tokens")
    prompts = truncate(server.prompts.completion_prompts(req), req.truncate_prompt_tokens)
    longest = max(len(ids) for _, ids in prompts)
    max_tokens = checks.resolve_max_tokens(req.max_tokens, 16, longest, "max_tokens")
    echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
    params = checks.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=echo_lp,
                                    param_names=_PARAM_NAMES)
    jobs = await server.submit(prompts, params, arrival, _PARAM_NAMES, req.cache_salt)
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    stream_fn = partial(_stream, server, req, rid, created) if req.stream else None
    return await server.respond(request, jobs, stream_fn, partial(_body, server, req, rid, created))


def _choice(server: OpenAIServer, req, job: Job, o, text: str, toks, lps, fin: bool, first: bool,
            offset: int) -> dict:
    logprobs = None
    if req.echo and first:
        prompt = server.prompt_text(job)
        if req.logprobs is not None:
            logprobs = server.logprobs.completion(toks, lps, 0, job.handle.prompt_token_ids,
                                                  o.prompt_logprobs or job.handle.prompt_logprobs)
        text = prompt + text
    elif req.logprobs is not None:
        logprobs = server.logprobs.completion(toks, lps, offset)
    return {"index": job.prompt_index * req.n + o.index, "text": text, "logprobs": logprobs,
            "finish_reason": finish_reason(o.finish_reason) if fin else None,
            "stop_reason": o.stop_reason if fin else None}


def _body(server: OpenAIServer, req, rid: str, created: int, jobs: list[Job]) -> dict:
    choices = []
    for job in jobs:
        for o in job.handle.outputs:
            choices.append(_choice(server, req, job, o, o.text, o.token_ids, o.logprobs, True, True, 0))
    choices.sort(key=lambda c: c["index"])
    return {"id": rid, "object": "text_completion", "created": created, "model": server.cfg.model_name,
            "choices": choices, "usage": server.usage(jobs), "system_fingerprint": None}


def _stream(server: OpenAIServer, req, rid: str, created: int, jobs: list[Job], release):
    chunks = ChunkWriter(rid, "text_completion", created, server.cfg.model_name, req.stream_options,
                         partial(server.usage, jobs))

    def choice(job: Job, o, took, before: int) -> dict:
        offset = before + (len(server.prompt_text(job)) if req.echo else 0)
        return _choice(server, req, job, o, *took, offset)

    return server.stream(jobs, release, chunks, choice)
