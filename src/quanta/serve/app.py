"""The OpenAI-compatible HTTP server: a FastAPI app over one `LLM`. Translation only, no engine logic.

HTTP request -> pydantic model (protocol.py) -> checks (caps, model name, context length) -> SamplingParams
-> `LLM.generate_async(ids, params, streaming=True)` per prompt -> OpenAI response or SSE chunks.

Every error answers in the OpenAI envelope (errors.py). A client that disconnects aborts its requests
(streaming: the SSE response cancels its body on `http.disconnect`; non-streaming: a watcher task), which
frees their KV blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.requests import Request

from quanta.serve.errors import APIError, bad_request, dumps, error_body, install_handlers, pydantic_errors_to_api_error
from quanta.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from quanta.serve.metrics import Metrics
from quanta.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

logger = logging.getLogger("quanta.serve")

# below this a temperature is greedy (as in vLLM): dividing logits by ~0 would overflow
_TEMPERATURE_EPS = 1e-5
_LOGPROB_FLOOR = -9999.0


@dataclass
class ServeConfig:
    """What the server enforces on top of the engine (the CLI's server flags)."""

    model_name: str
    api_key: str | None = None
    chat_template: str | None = None  # overrides the tokenizer's
    max_n: int = 16
    max_best_of: int = 16
    max_logprobs: int = 20
    max_tokens_cap: int | None = None
    max_stop: int = 16
    max_body_bytes: int = 4 << 20
    max_queued_requests: int = 4096
    retry_after_s: int = 1
    on_fatal: Callable[[], None] | None = None  # called once when the engine loop dies (the CLI exits 1)


# --- small helpers -----------------------------------------------------------------------------------


def _is_token_id(t: Any) -> bool:
    return type(t) is int


def _finite_logprob(v: float) -> float:
    if v != v:  # NaN
        return _LOGPROB_FLOOR
    return max(float(v), _LOGPROB_FLOOR) if not math.isinf(v) or v < 0 else 0.0


def _rank(item) -> int:
    rank = item[1].rank
    return rank if rank is not None else 1 << 30


_SP_PARAM = re.compile(r"SamplingParams\.(\w+)")


class _ClientGone(Exception):
    """The client disconnected before the response was ready."""


class _Job:
    """One engine request of an HTTP request (a completions request with several prompts has several)."""

    __slots__ = ("handle", "prompt_index", "prompt_text", "arrival", "first", "last", "sent", "seen", "done",
                 "error", "counted", "queued")

    def __init__(self, handle, prompt_index: int, prompt_text: str | None, arrival: float):
        self.handle = handle
        self.prompt_index = prompt_index
        self.prompt_text = prompt_text
        self.arrival = arrival
        self.first: float | None = None
        self.last: float | None = None
        self.sent: dict[int, list] = {}  # output index -> [text chars, token ids, logprobs, finish sent]
        self.seen: dict[int, int] = {}  # output index -> tokens counted by the latency metrics
        self.done = False
        self.error: BaseException | None = None
        self.counted = False
        self.queued = True


# --- the server ----------------------------------------------------------------------------------------


class OpenAIServer:
    def __init__(self, engine, config: ServeConfig):
        """engine: a LocalEngine or ProcessEngine (engine_client.py)."""
        self.engine = engine
        self.cfg = config
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.vocab_size
        self.in_flight = 0  # HTTP generation requests being handled
        self.queued = 0  # engine requests submitted that have not produced a token yet
        self.stopping = False
        self._fatal_reported = False
        self._pieces: dict[int, str] = {}
        self._anchor: list[int] | None = None
        self._key_digest = hashlib.sha256(config.api_key.encode()).digest() if config.api_key else None
        self.metrics = Metrics(config.model_name, engine.state, self._server_state)
        self.created = int(time.time())

    # --- engine health ---------------------------------------------------------------------------
    def engine_error(self) -> str | None:
        return self.engine.error()

    def _server_state(self) -> dict:
        return {"in_flight": self.in_flight, "alive": self.engine_error() is None}

    async def watch_engine(self) -> None:
        """Background task: when the engine loop dies, /health turns 503 and the server is told to exit."""
        while True:
            await asyncio.sleep(0.2)
            err = self.engine_error()
            if err is not None and not self.stopping and not self._fatal_reported:
                self._fatal_reported = True
                logger.error("quanta serve: %s; the server exits", err)
                if self.cfg.on_fatal is not None:
                    self.cfg.on_fatal()

    def check_engine(self) -> None:
        err = self.engine_error()
        if err is not None:
            raise APIError(503, f"{err}: no request can be served", code="engine_unavailable")

    # --- request parsing ---------------------------------------------------------------------------
    async def read_json(self, request) -> dict:
        ctype = request.headers.get("content-type")
        if ctype is not None:
            media = ctype.split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                raise bad_request(f"Content-Type must be application/json, got {ctype[:60]!r}",
                                  code="invalid_content_type")
        cap = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise bad_request("invalid Content-Length header")
            if int(length) > cap:
                raise APIError(413, f"request body of {int(length)} bytes is larger than the server's limit of "
                                    f"{cap} bytes (--max-body-bytes)", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > cap:
                raise APIError(413, f"request body is larger than the server's limit of {cap} bytes "
                                    "(--max-body-bytes)", code="request_too_large")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body.strip():
            raise bad_request("the request body is empty: send a JSON object")
        try:
            data = json.loads(body)
        except RecursionError:
            raise bad_request("the request body is nested too deeply") from None
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise bad_request(f"the request body must be a JSON object, got a JSON {type(data).__name__}")
        return data

    def check_model(self, data: dict) -> None:
        name = data.get("model")
        if isinstance(name, str) and name != self.cfg.model_name:
            raise APIError(404, f"The model `{name[:200]}` does not exist (this server serves "
                                f"`{self.cfg.model_name}`).", param="model", code="model_not_found")

    @staticmethod
    def parse(model, data: dict):
        from pydantic import ValidationError

        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise pydantic_errors_to_api_error(e.errors(include_url=False)) from None
        except RecursionError:
            raise bad_request("the request is nested too deeply") from None

    # --- prompts ------------------------------------------------------------------------------------
    def _encode(self, text: str, add_special_tokens: bool, param: str) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer: send token ids", param=param)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(f"{param} is not valid Unicode: a lone surrogate at character {e.start}",
                              param=param) from None
        try:
            return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))
        except Exception as e:  # lone surrogates and the like
            raise bad_request(f"{param}: the text could not be tokenized ({type(e).__name__}: {str(e)[:200]})",
                              param=param) from None

    def _check_ids(self, ids: list, param: str) -> None:
        if not ids:
            raise bad_request(f"{param} is empty: give a non-empty string or at least one token id", param=param)
        for t in ids:
            if not 0 <= t < self.vocab_size:
                raise bad_request(f"{param}: token id {t} is out of range [0, {self.vocab_size})", param=param)

    def completion_prompts(self, req: CompletionRequest) -> list[tuple[str | None, list[int]]]:
        p = req.prompt
        msg = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        if p is None:
            raise bad_request("missing required field 'prompt'", param="prompt")
        if isinstance(p, str):
            items = [p]
        elif isinstance(p, list) and p and all(_is_token_id(t) for t in p):
            items = [p]
        elif isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(
                isinstance(x, list) and all(_is_token_id(t) for t in x) for x in p)):
            items = p
        elif isinstance(p, list) and not p:
            raise bad_request("prompt is empty: give a non-empty string or at least one token id", param="prompt")
        else:
            raise bad_request(msg, param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                if not item:
                    raise bad_request("prompt is empty: give a non-empty string or at least one token id",
                                      param="prompt")
                ids = self._encode(item, req.add_special_tokens, "prompt")
                out.append((item, ids))
            else:
                self._check_ids(item, "prompt")
                out.append((None, list(item)))
        return out

    def chat_template(self) -> str:
        template = self.cfg.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise bad_request("this model has no chat template, so /v1/chat/completions cannot format messages: "
                              "start the server with --chat-template FILE, or use /v1/completions",
                              param="messages", code="chat_template_missing")
        return template

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool,
                    continue_final_message: bool) -> str:
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer: chat needs one", param="messages")
        template = self.chat_template()
        if not messages:
            raise bad_request("messages must hold at least one message", param="messages")
        conv = []
        for i, m in enumerate(messages):
            if m.role not in ("system", "user", "assistant", "developer"):
                raise bad_request(f"messages.{i}.role {m.role[:40]!r} is not supported yet (tool messages need "
                                  "tool calling): use system, user or assistant", param=f"messages.{i}.role")
            for name in ("tool_calls", "tool_call_id", "function_call"):
                if getattr(m, name) not in (None, []):
                    raise bad_request(f"messages.{i}.{name}: tool calling is not supported yet in quanta",
                                      param=f"messages.{i}.{name}")
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad_request(f"messages.{i}.content.{j}: content parts of type {part.type[:40]!r} are "
                                          "not supported yet (text only)", param=f"messages.{i}.content.{j}")
                    texts.append(part.text)
                content = "\n".join(texts)
            entry = {"role": m.role, "content": content if content is not None else ""}
            if m.name is not None:
                entry["name"] = m.name
            conv.append(entry)
        try:
            text = self.tokenizer.apply_chat_template(
                conv, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message)
        except Exception as e:  # template errors (raise_exception), bad flag combinations ...
            raise bad_request(f"could not apply the chat template to these messages: {str(e)[:300]}",
                              param="messages") from None
        if not isinstance(text, str):
            raise bad_request("the chat template did not render to text", param="messages")
        return text

    # --- sampling params ---------------------------------------------------------------------------
    def _stops(self, stop: Any) -> list[str] | None:
        if stop is None:
            return None
        if isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = stop
        else:
            raise bad_request("stop must be a string or a list of strings", param="stop")
        if len(stops) > self.cfg.max_stop:
            raise bad_request(f"stop has {len(stops)} strings, more than the server's limit of {self.cfg.max_stop} "
                              "(--max-stop)", param="stop")
        if any(not s for s in stops):
            raise bad_request("stop strings must not be empty", param="stop")
        return stops or None

    def _logit_bias(self, bias: dict[str, float] | None):
        if not bias:
            return None
        import torch

        t = torch.zeros(self.vocab_size, dtype=torch.float32)
        for key, value in bias.items():
            if not (key.isdigit() and key.isascii()) or int(key) >= self.vocab_size:
                raise bad_request(f"logit_bias key {key[:40]!r} is not a token id in [0, {self.vocab_size})",
                                  param="logit_bias")
            if not (math.isfinite(value) and -100 <= value <= 100):
                raise bad_request(f"logit_bias[{key}] must be in [-100, 100], got {value}", param="logit_bias")
            t[int(key)] = float(value)
        return t

    def _check_caps(self, req, logprobs: int | None, logprobs_param: str, max_tokens: int | None,
                    max_tokens_param: str) -> None:
        c = self.cfg
        if req.n > c.max_n:
            raise bad_request(f"n={req.n} is more than the server's limit of {c.max_n} (--max-n)", param="n")
        if req.best_of is not None and req.best_of > c.max_best_of:
            raise bad_request(f"best_of={req.best_of} is more than the server's limit of {c.max_best_of} "
                              "(--max-best-of)", param="best_of")
        if logprobs is not None and logprobs > c.max_logprobs:
            raise bad_request(f"{logprobs_param}={logprobs} is more than the server's limit of {c.max_logprobs} "
                              "(--max-logprobs)", param=logprobs_param)
        if logprobs is not None and logprobs < 0:
            raise bad_request(f"{logprobs_param} must be >= 0, got {logprobs}", param=logprobs_param)
        if max_tokens is not None and c.max_tokens_cap is not None and max_tokens > c.max_tokens_cap:
            raise bad_request(f"{max_tokens_param}={max_tokens} is more than the server's limit of "
                              f"{c.max_tokens_cap} (--max-tokens-cap)", param=max_tokens_param)
        if max_tokens is not None and max_tokens < 1:
            raise bad_request(f"{max_tokens_param} must be >= 1, got {max_tokens}", param=max_tokens_param)

    def _refuse_unsupported(self, req) -> None:
        rf = req.response_format
        if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text" and len(rf) == 1):
            raise bad_request("response_format is not supported yet in quanta (structured output has not landed); "
                              "omit it or use {\"type\": \"text\"}", param="response_format")
        for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
            if getattr(req, name) is not None:
                raise bad_request(f"{name} is not supported yet in quanta (guided decoding has not landed)",
                                  param=name)
        if req.store:
            raise bad_request("store=true is not supported: quanta does not store completions", param="store")
        if isinstance(req, ChatCompletionRequest):
            if req.tools:
                raise bad_request("tools are not supported yet in quanta (tool calling has not landed)",
                                  param="tools")
            if req.tool_choice not in (None, "none"):
                raise bad_request("tool_choice is not supported yet in quanta (tool calling has not landed)",
                                  param="tool_choice")
            if req.functions or req.function_call not in (None, "none"):
                param = "functions" if req.functions else "function_call"
                raise bad_request("functions / function_call are not supported in quanta", param=param)
            for name in ("modalities", "audio", "prediction", "reasoning_effort", "web_search_options"):
                value = getattr(req, name)
                if value is not None and not (name == "modalities" and value == ["text"]):
                    raise bad_request(f"{name} is not supported in quanta", param=name)
        elif req.suffix:
            raise bad_request("suffix (fill-in-the-middle) is not supported yet in quanta", param="suffix")
        if req.stream_options is not None and not req.stream:
            raise bad_request("stream_options is only allowed with stream=true", param="stream_options")

    def sampling_params(self, req, *, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None,
                        param_names: dict[str, str]):
        from quanta.sampling_params import SamplingParams

        temperature = 1.0 if req.temperature is None else req.temperature
        if 0 < temperature < _TEMPERATURE_EPS:
            temperature = 0.0
        top_k = req.top_k
        if top_k is not None and (top_k == -1 or top_k > self.vocab_size):
            top_k = 0  # all tokens
        kw = dict(
            max_tokens=max_tokens, temperature=temperature, top_p=req.top_p, top_k=top_k, min_p=req.min_p,
            seed=req.seed, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty, min_tokens=req.min_tokens, ignore_eos=req.ignore_eos,
            stop=self._stops(req.stop), stop_token_ids=req.stop_token_ids,
            include_stop_str_in_output=req.include_stop_str_in_output, n=req.n, best_of=req.best_of,
            use_beam_search=req.use_beam_search, length_penalty=req.length_penalty, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, embedding_bias=self._logit_bias(req.logit_bias),
            skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
        )
        try:
            return SamplingParams(**kw)
        except ValueError as e:
            raise self._value_error(e, param_names) from None

    def _value_error(self, e: BaseException, param_names: dict[str, str]) -> APIError:
        msg = str(e)
        m = _SP_PARAM.search(msg)
        param = None
        if m:
            field = m.group(1)
            param = param_names.get(field, field)
            msg = msg.replace(f"SamplingParams.{field}", param)
        elif msg.startswith("prompt"):
            param = "prompt"
        code = "context_length_exceeded" if ("max_seq_len" in msg or "max_input_len" in msg
                                             or "max_num_tokens" in msg) else None
        return bad_request(msg, param=param, code=code)

    def resolve_max_tokens(self, asked: int | None, default: int | None, n_prompt: int, param: str) -> int:
        """The request's max_tokens after the context-length check (400 context_length_exceeded)."""
        max_seq_len, max_input_len = self.engine.max_seq_len, self.engine.max_input_len
        if n_prompt > max_input_len or n_prompt >= max_seq_len:
            raise bad_request(
                f"This model's maximum context length is {max_seq_len} tokens (max input {max_input_len}); "
                f"the prompt has {n_prompt} tokens. Shorten the prompt.", param="messages" if param ==
                "max_completion_tokens" else "prompt", code="context_length_exceeded")
        room = max_seq_len - n_prompt
        if asked is None:
            cap = self.cfg.max_tokens_cap
            want = default if default is not None else room
            if cap is not None:
                want = min(want, cap)
            return max(1, min(want, room))
        if n_prompt + asked > max_seq_len:
            raise bad_request(
                f"This model's maximum context length is {max_seq_len} tokens. However, you requested "
                f"{n_prompt + asked} tokens ({n_prompt} in the prompt, {asked} in the completion). Lower {param} "
                "or shorten the prompt.", param=param, code="context_length_exceeded")
        return asked

    # --- submission -----------------------------------------------------------------------------------
    async def submit(self, prompts: list[tuple[str | None, list[int]]], params, arrival: float,
                     param_names: dict[str, str], cache_salt: str | None = None) -> list[_Job]:
        self.check_engine()
        cap = self.cfg.max_queued_requests
        if self.queued + len(prompts) > cap:
            raise APIError(503, f"the server is overloaded ({self.queued} requests queued, limit {cap}, "
                                "--max-queued-requests): retry later", code="overloaded",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})
        if cache_salt is not None and not self.engine.accepts_cache_salt:
            raise bad_request("cache_salt is not supported by this engine", param="cache_salt")
        jobs: list[_Job] = []
        self.queued += len(prompts)  # reserved now: concurrent requests see them while we wait for acks
        try:
            for i, (text, ids) in enumerate(prompts):
                handle = await self.engine.generate(ids, params, cache_salt)
                jobs.append(_Job(handle, i, text, arrival))
        except BaseException as e:
            self.queued -= len(prompts) - len(jobs)
            for job in jobs:
                job.handle.abort()
                self._finish_job(job)
            if isinstance(e, ValueError):
                raise self._value_error(e, param_names) from None
            if isinstance(e, RuntimeError):  # the engine is gone (EngineDeadError, EngineGone)
                raise APIError(503, f"the engine cannot take requests: {e}", code="engine_unavailable") from None
            raise
        return jobs

    def _finish_job(self, job: _Job) -> None:
        if job.counted:
            return
        job.counted = True
        if job.queued:
            job.queued = False
            self.queued -= 1
        if not job.handle.done():
            job.handle.abort()
        outs = job.handle.outputs
        reason = outs[0].finish_reason if outs else None
        if job.error is not None:
            reason = "error"
        now = time.monotonic()
        self.metrics.request_finished(
            prompt_tokens=len(job.handle.prompt_token_ids), generation_tokens=sum(len(o.token_ids) for o in outs),
            reason=reason if job.handle.finished else "cancelled", e2e_s=now - job.arrival,
            ttft_s=None if job.first is None else job.first - job.arrival,
            last_token_s=None if job.last is None else job.last - job.arrival)

    def _note_progress(self, job: _Job) -> None:
        """TTFT / inter-token latency from the outputs' new tokens since the last look."""
        steps = 0
        for o in job.handle.outputs:
            n = len(o.token_ids)
            steps = max(steps, n - job.seen.get(o.index, 0))
            job.seen[o.index] = n
        if steps <= 0:
            return
        now = time.monotonic()
        if job.first is None:
            job.first = now
            self.metrics.observe_ttft(now - job.arrival)
            if job.queued:
                job.queued = False
                self.queued -= 1
            if steps > 1:
                self.metrics.observe_itl(0.0, steps - 1)
        else:
            self.metrics.observe_itl((now - job.last) / steps, steps)
        job.last = now

    async def updates(self, jobs: list[_Job]) -> AsyncIterator[_Job]:
        """Yield a job each time its outputs changed (several jobs: merged); sets job.done / job.error."""
        if len(jobs) == 1:
            job = jobs[0]
            it = job.handle.__aiter__()
            try:
                async for _ in it:
                    yield job
            except Exception as e:  # RequestError: the request failed (its own error, or the engine died)
                job.error = e
            finally:
                await it.aclose()
                job.done = True
            yield job
            return
        queue: asyncio.Queue[_Job] = asyncio.Queue()

        async def pump(job: _Job) -> None:
            try:
                async for _ in job.handle:
                    queue.put_nowait(job)
            except Exception as e:
                job.error = e
            finally:
                job.done = True
                queue.put_nowait(job)

        tasks = [asyncio.ensure_future(pump(j)) for j in jobs]
        reported: set[int] = set()
        try:
            while len(reported) < len(jobs):
                job = await queue.get()
                yield job
                if job.done:
                    reported.add(id(job))
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # --- tokens as text (logprobs) ---------------------------------------------------------------------
    def piece(self, tid: int) -> str:
        """A token's text as it reads inside a sequence (with its leading space)."""
        s = self._pieces.get(tid)
        if s is not None:
            return s
        tok = self.tokenizer
        try:
            if self._anchor is None:
                self._anchor = list(tok.encode("a", add_special_tokens=False))[-1:] or []
            if self._anchor:
                base = tok.decode(self._anchor)
                full = tok.decode(self._anchor + [tid])
                s = full[len(base):] if full.startswith(base) else tok.decode([tid])
            else:
                s = tok.decode([tid])
        except Exception:
            s = ""
        if len(self._pieces) < 1_000_000:
            self._pieces[tid] = s
        return s

    def completion_logprobs(self, token_ids: list[int], logprobs: list[dict], offset: int,
                            prompt_ids: list[int] | None = None, prompt_logprobs: list | None = None) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        if prompt_ids is not None:
            plps = prompt_logprobs or []
            for i, tid in enumerate(prompt_ids):
                s = self.piece(tid)
                d = plps[i] if i < len(plps) else None
                tokens.append(s)
                offsets.append(offset)
                offset += len(s)
                lp = d.get(tid) if d else None
                token_lps.append(None if lp is None else _finite_logprob(lp.logprob))
                tops.append(None if not d else {self.piece(t): _finite_logprob(v.logprob)
                                                for t, v in sorted(d.items(), key=_rank)})
        for tid, d in zip(token_ids, logprobs):
            s = self.piece(tid)
            tokens.append(s)
            offsets.append(offset)
            offset += len(s)
            lp = d.get(tid) if d else None
            token_lps.append(None if lp is None else _finite_logprob(lp.logprob))
            tops.append({self.piece(t): _finite_logprob(v.logprob) for t, v in sorted(d.items(), key=_rank)}
                        if d else None)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, token_ids: list[int], logprobs: list[dict], k: int) -> list[dict]:
        out = []
        for tid, d in zip(token_ids, logprobs):
            s = self.piece(tid)
            lp = d.get(tid) if d else None
            top = []
            for t, v in sorted(d.items(), key=_rank) if d else ():
                if len(top) >= k or (v.rank is not None and v.rank > k):
                    break
                ts = self.piece(t)
                top.append({"token": ts, "logprob": _finite_logprob(v.logprob), "bytes": _utf8(ts)})
            out.append({"token": s, "logprob": _LOGPROB_FLOOR if lp is None else _finite_logprob(lp.logprob),
                        "bytes": _utf8(s), "top_logprobs": top})
        return out

    # --- disconnect watching (non-streaming) -----------------------------------------------------------
    async def until_disconnect(self, request, coro):
        task = asyncio.ensure_future(coro)

        async def watch() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        if task.cancelled() or not task.done():
            await asyncio.gather(task, return_exceptions=True)
            raise _ClientGone()
        return task.result()

    def request_error(self, job: _Job) -> APIError:
        """The APIError for a job whose request failed inside the engine."""
        from quanta.engine.async_loop import EngineDeadError
        from quanta.serve.engine_client import EngineGone

        err = job.error
        cause = err.__cause__ if err is not None else None
        if self.engine_error() is not None or isinstance(cause, (EngineGone, EngineDeadError)):
            reason = self.engine_error() or str(cause)
            return APIError(503, f"the engine stopped while serving this request: {reason}",
                            code="engine_unavailable")
        if isinstance(cause, ValueError):
            return bad_request(str(cause)[:500])
        return APIError(500, f"the request failed inside the engine: {type(cause or err).__name__}: "
                             f"{str(cause or err)[:300]}", code="request_failed")

    # --- shared request plumbing -------------------------------------------------------------------------
    def _release(self, jobs: list[_Job], state: dict) -> None:
        """Once per HTTP request: abort what is left, record metrics, leave the in-flight count."""
        if state.get("released"):
            return
        state["released"] = True
        for job in jobs:
            self._finish_job(job)
        self.in_flight -= 1

    async def _drain(self, jobs: list[_Job]) -> None:
        async with contextlib.aclosing(self.updates(jobs)) as ups:
            async for job in ups:
                self._note_progress(job)

    async def _respond(self, request, jobs: list[_Job], stream_fn, build_fn):
        """Streaming: an SSE response; otherwise wait (aborting on disconnect) and build the JSON body."""
        state: dict = {}
        self.in_flight += 1
        release = partial(self._release, jobs, state)
        if stream_fn is not None:
            return SSEResponse(stream_fn(jobs, release), release)
        try:
            await self.until_disconnect(request, self._drain(jobs))
        except _ClientGone:
            return _json_response({}, 499)
        finally:
            release()
        for job in jobs:
            if job.error is not None:
                raise self.request_error(job)
        return _json_response(build_fn(jobs))

    def _usage(self, jobs: list[_Job]) -> dict:
        prompt = sum(len(j.handle.prompt_token_ids) for j in jobs)
        completion = sum(len(o.token_ids) for j in jobs for o in j.handle.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def _take(job: _Job, o) -> tuple[str, list[int], list, bool, bool] | None:
        """What output `o` has that was not streamed yet: (text, token ids, logprobs, finished, first)."""
        st = job.sent.get(o.index)
        if st is None:
            st = job.sent[o.index] = [0, 0, 0, False]
        if st[3]:
            return None
        text, toks, lps = o.text[st[0]:], o.token_ids[st[1]:], o.logprobs[st[2]:]
        fin = o.finish_reason is not None
        if not text and not toks and not fin:
            return None
        first = st[0] == 0 and st[1] == 0
        st[:] = [len(o.text), len(o.token_ids), len(o.logprobs), fin]
        return text, toks, lps, fin, first

    def _prompt_text(self, job: _Job) -> str:
        if job.prompt_text is None:
            try:
                job.prompt_text = self.tokenizer.decode(job.handle.prompt_token_ids)
            except Exception:
                job.prompt_text = ""
        return job.prompt_text

    def _error_event(self, job: _Job) -> bytes:
        err = self.request_error(job)
        self.metrics.http_error(err.status)
        return b"data: " + dumps(err.body()) + b"\n\n"

    # --- /v1/completions -------------------------------------------------------------------------------
    async def completions(self, request):
        arrival = time.monotonic()
        data = await self.read_json(request)
        self.check_model(data)
        req = self.parse(CompletionRequest, data)
        self._refuse_unsupported(req)
        self._check_caps(req, req.logprobs, "logprobs", req.max_tokens, "max_tokens")
        prompts = self._truncate(self.completion_prompts(req), req.truncate_prompt_tokens)
        longest = max(len(ids) for _, ids in prompts)
        max_tokens = self.resolve_max_tokens(req.max_tokens, 16, longest, "max_tokens")
        names = {"embedding_bias": "logit_bias", "beam_width": "use_beam_search", "prompt_logprobs": "logprobs"}
        echo_lp = req.logprobs if req.echo and req.logprobs is not None else None
        params = self.sampling_params(req, max_tokens=max_tokens, logprobs=req.logprobs, prompt_logprobs=echo_lp,
                                      param_names=names)
        jobs = await self.submit(prompts, params, arrival, names, req.cache_salt)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        stream_fn = partial(self._stream_completion, req, rid, created) if req.stream else None
        return await self._respond(request, jobs, stream_fn, partial(self._completion_body, req, rid, created))

    @staticmethod
    def _truncate(prompts, n: int | None):
        if n is None:
            return prompts
        if n < 1:
            raise bad_request(f"truncate_prompt_tokens must be >= 1, got {n}", param="truncate_prompt_tokens")
        return [(text if len(ids) <= n else None, ids[-n:]) for text, ids in prompts]

    def _completion_choice(self, req, job: _Job, o, text: str, toks, lps, fin: bool, first: bool,
                           offset: int) -> dict:
        logprobs = None
        if req.echo and first:
            prompt = self._prompt_text(job)
            if req.logprobs is not None:
                logprobs = self.completion_logprobs(toks, lps, 0, job.handle.prompt_token_ids,
                                                    o.prompt_logprobs or job.handle.prompt_logprobs)
            text = prompt + text
        elif req.logprobs is not None:
            logprobs = self.completion_logprobs(toks, lps, offset)
        return {"index": job.prompt_index * req.n + o.index, "text": text, "logprobs": logprobs,
                "finish_reason": _finish_reason(o.finish_reason) if fin else None,
                "stop_reason": o.stop_reason if fin else None}

    def _completion_body(self, req, rid: str, created: int, jobs: list[_Job]) -> dict:
        choices = []
        for job in jobs:
            for o in job.handle.outputs:
                choices.append(self._completion_choice(req, job, o, o.text, o.token_ids, o.logprobs, True, True, 0))
        choices.sort(key=lambda c: c["index"])
        return {"id": rid, "object": "text_completion", "created": created, "model": self.cfg.model_name,
                "choices": choices, "usage": self._usage(jobs), "system_fingerprint": None}

    async def _stream_completion(self, req, rid: str, created: int, jobs: list[_Job], release) -> AsyncIterator[bytes]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        name = self.cfg.model_name
        failed = False
        try:
            async with contextlib.aclosing(self.updates(jobs)) as ups:
                async for job in ups:
                    self._note_progress(job)
                    for o in job.handle.outputs:
                        before = job.sent.get(o.index, (0,))[0]
                        took = self._take(job, o)
                        if took is None:
                            continue
                        offset = before + (len(self._prompt_text(job)) if req.echo else 0)
                        choice = self._completion_choice(req, job, o, *took, offset)
                        chunk = {"id": rid, "object": "text_completion", "created": created, "model": name,
                                 "choices": [choice]}
                        if include_usage:
                            chunk["usage"] = self._usage(jobs) if continuous else None
                        yield b"data: " + dumps(chunk) + b"\n\n"
                    if job.done and job.error is not None:
                        yield self._error_event(job)
                        failed = True
                        break
            if include_usage and not failed:
                chunk = {"id": rid, "object": "text_completion", "created": created, "model": name, "choices": [],
                         "usage": self._usage(jobs)}
                yield b"data: " + dumps(chunk) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            release()

    # --- /v1/chat/completions --------------------------------------------------------------------------
    async def chat_completions(self, request):
        arrival = time.monotonic()
        data = await self.read_json(request)
        self.check_model(data)
        req = self.parse(ChatCompletionRequest, data)
        self._refuse_unsupported(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        asked, asked_name = ((req.max_completion_tokens, "max_completion_tokens")
                             if req.max_completion_tokens is not None else (req.max_tokens, "max_tokens"))
        self._check_caps(req, logprobs, "top_logprobs", asked, asked_name)
        text = self.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
        ids = self._encode(text, req.add_special_tokens, "messages")
        prompts = self._truncate([(text, ids)], req.truncate_prompt_tokens)
        self._check_ids(prompts[0][1], "messages")
        max_tokens = self.resolve_max_tokens(asked, None, len(prompts[0][1]), asked_name)
        names = {"max_tokens": asked_name, "embedding_bias": "logit_bias", "beam_width": "use_beam_search",
                 "logprobs": "top_logprobs"}
        params = self.sampling_params(req, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=None,
                                      param_names=names)
        jobs = await self.submit(prompts, params, arrival, names, req.cache_salt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        stream_fn = partial(self._stream_chat, req, rid, created, logprobs) if req.stream else None
        return await self._respond(request, jobs, stream_fn, partial(self._chat_body, req, rid, created, logprobs))

    def _chat_body(self, req, rid: str, created: int, k: int | None, jobs: list[_Job]) -> dict:
        choices = []
        for o in jobs[0].handle.outputs:
            lp = {"content": self.chat_logprobs(o.token_ids, o.logprobs, k)} if k is not None else None
            choices.append({"index": o.index, "message": {"role": "assistant", "content": o.text, "tool_calls": []},
                            "logprobs": lp, "finish_reason": _finish_reason(o.finish_reason),
                            "stop_reason": o.stop_reason})
        return {"id": rid, "object": "chat.completion", "created": created, "model": self.cfg.model_name,
                "choices": choices, "usage": self._usage(jobs), "system_fingerprint": None}

    async def _stream_chat(self, req, rid: str, created: int, k: int | None, jobs: list[_Job],
                           release) -> AsyncIterator[bytes]:
        opts = req.stream_options
        include_usage = bool(opts and opts.include_usage)
        continuous = bool(opts and opts.continuous_usage_stats)
        name = self.cfg.model_name

        def chunk(choices: list[dict], usage: Any = False) -> bytes:
            c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": choices}
            if include_usage:
                c["usage"] = self._usage(jobs) if (continuous or usage is True) else None
            return b"data: " + dumps(c) + b"\n\n"

        failed = False
        try:
            for i in range(req.n):
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])
            async with contextlib.aclosing(self.updates(jobs)) as ups:
                async for job in ups:
                    self._note_progress(job)
                    for o in job.handle.outputs:
                        took = self._take(job, o)
                        if took is None:
                            continue
                        text, toks, lps, fin, _ = took
                        lp = {"content": self.chat_logprobs(toks, lps, k)} if k is not None else None
                        delta = {"content": text} if text or not fin else {}
                        yield chunk([{"index": o.index, "delta": delta, "logprobs": lp,
                                      "finish_reason": _finish_reason(o.finish_reason) if fin else None,
                                      "stop_reason": o.stop_reason if fin else None}])
                    if job.done and job.error is not None:
                        yield self._error_event(job)
                        failed = True
                        break
            if include_usage and not failed:
                c = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name, "choices": [],
                     "usage": self._usage(jobs)}
                yield b"data: " + dumps(c) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            release()

    # --- small endpoints ---------------------------------------------------------------------------------
    def model_card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "quanta",
                "max_model_len": self.engine.max_seq_len, "vocab_size": self.vocab_size}

    async def tokenize(self, request):
        data = await self.read_json(request)
        self.check_model(data)
        req = self.parse(TokenizeRequest, data)
        if (req.prompt is None) == (req.messages is None):
            raise bad_request("give exactly one of prompt or messages", param="prompt")
        if req.prompt is not None:
            add = True if req.add_special_tokens is None else req.add_special_tokens
            ids = self._encode(req.prompt, add, "prompt")
        else:
            text = self.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message)
            ids = self._encode(text, bool(req.add_special_tokens), "messages")
        body = {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = [str(t) for t in self.tokenizer.convert_ids_to_tokens(ids)]
        return _json_response(body)

    async def detokenize(self, request):
        data = await self.read_json(request)
        self.check_model(data)
        req = self.parse(DetokenizeRequest, data)
        for t in req.tokens:
            if not 0 <= t < self.vocab_size:
                raise bad_request(f"tokens: token id {t} is out of range [0, {self.vocab_size})", param="tokens")
        if self.tokenizer is None:
            raise bad_request("this server has no tokenizer", param="tokens")
        try:
            text = self.tokenizer.decode(req.tokens)
        except Exception as e:
            raise bad_request(f"tokens could not be decoded: {str(e)[:200]}", param="tokens") from None
        return _json_response({"prompt": text})

    def check_key(self, scope) -> bool:
        if self._key_digest is None:
            return True
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                given = value
                break
        scheme, _, token = given.partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        digest = hashlib.sha256(token.strip()).digest()
        return hmac.compare_digest(digest, self._key_digest) and ok_scheme


# --- ASGI pieces ---------------------------------------------------------------------------------------


def _json_response(obj: Any, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _finish_reason(reason: str | None) -> str | None:
    if reason in ("cancelled", "timeout"):
        return "abort"
    return reason


def _sse_response_class():
    import anyio
    from starlette.responses import StreamingResponse

    class _SSEResponse(StreamingResponse):
        """Server-sent events that stop (cancelling the body, which aborts its requests) as soon as the client
        disconnects, whether or not a chunk is being sent; `cleanup` runs whatever happened."""

        def __init__(self, content, cleanup: Callable[[], None]):
            super().__init__(content, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            self._cleanup = cleanup

        async def __call__(self, scope, receive, send) -> None:
            try:
                async with anyio.create_task_group() as tg:
                    async def stream() -> None:
                        with contextlib.suppress(OSError):
                            await self.stream_response(send)
                        tg.cancel_scope.cancel()

                    async def watch() -> None:
                        await self.listen_for_disconnect(receive)
                        tg.cancel_scope.cancel()

                    tg.start_soon(stream)
                    tg.start_soon(watch)
            finally:
                with contextlib.suppress(Exception):
                    await self.body_iterator.aclose()
                self._cleanup()

    return _SSEResponse


_SSE = None


def SSEResponse(content, cleanup):  # noqa: N802 (a class, built lazily so that importing needs no starlette)
    global _SSE
    if _SSE is None:
        _SSE = _sse_response_class()
    return _SSE(content, cleanup)


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on every route but exactly /health (constant-time comparison). The path is
    the decoded one routing uses, so `//v1/...`, `/V1/...` and percent-encoded paths all need the key."""

    def __init__(self, app, server: OpenAIServer):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health" or self.server.check_key(scope):
            await self.app(scope, receive, send)
            return
        self.server.metrics.http_error(401)
        body = dumps(error_body("invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                "invalid_request_error", None, "invalid_api_key"))
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


def create_app(engine, config: ServeConfig):
    """The FastAPI app serving `engine`: an `LLM` (served in this process), or a LocalEngine / ProcessEngine
    from engine_client.py. The caller owns the engine and shuts it down after the app has stopped."""
    from fastapi import FastAPI
    from starlette.responses import Response

    import quanta
    from quanta.serve.engine_client import LocalEngine

    if not hasattr(engine, "generate") or not hasattr(engine, "error"):
        engine = LocalEngine(engine)
    server = OpenAIServer(engine, config)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await engine.start()
        watcher = asyncio.ensure_future(server.watch_engine())
        try:
            yield
        finally:
            server.stopping = True
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if hasattr(engine, "aclose"):
                await engine.aclose()

    app = FastAPI(title="quanta", version=quanta.__version__, docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    install_handlers(app, on_status=server.metrics.http_error)
    app.state.server = server

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.chat_completions(request)

    @app.get("/v1/models")
    async def models():
        return _json_response({"object": "list", "data": [server.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"The model `{model_id[:200]}` does not exist.", param="model",
                           code="model_not_found")
        return _json_response(server.model_card())

    @app.get("/health")
    async def health():
        err = server.engine_error()
        if err is not None:
            raise APIError(503, err, code="engine_unavailable")
        return _json_response({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await server.tokenize(request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await server.detokenize(request)

    @app.get("/version")
    async def version():
        return _json_response({"version": quanta.__version__})

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, server=server)
    return app


def _utf8(s: str) -> list[int]:
    return list(s.encode("utf-8", "surrogatepass"))
