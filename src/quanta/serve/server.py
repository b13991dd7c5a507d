"""`OpenAIServer`: the state one app shares across its routes (engine, config, metrics, the components that
check and translate requests) and the life of a generation request: submit its prompts to the engine, follow
their outputs (latency metrics, queue accounting), answer as JSON or SSE, abort on disconnect, release.

The routes (completions.py, chat.py, tokens.py) are functions of a server and a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from functools import partial

from quanta.serve.config import ServeConfig
from quanta.serve.errors import APIError, bad_request
from quanta.serve.jobs import ClientGone, Job, take, until_disconnect, updates
from quanta.serve.logprobs import LogprobFormatter
from quanta.serve.metrics import Metrics
from quanta.serve.prompts import PromptBuilder
from quanta.serve.responses import ChunkWriter, SSEResponse, json_response, sse_event
from quanta.serve.validation import RequestValidator, value_error

logger = logging.getLogger("quanta.serve")


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
        self.metrics = Metrics(config.model_name, engine.state, self._server_state)
        self.created = int(time.time())
        self.checks = RequestValidator(config, engine, self.vocab_size)
        self.prompts = PromptBuilder(self.tokenizer, self.vocab_size, config.chat_template)
        self.logprobs = LogprobFormatter(self.tokenizer)

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

    def model_card(self) -> dict:
        return {"id": self.cfg.model_name, "object": "model", "created": self.created, "owned_by": "quanta",
                "max_model_len": self.engine.max_seq_len, "vocab_size": self.vocab_size}

    # --- submission -----------------------------------------------------------------------------------
    async def submit(self, prompts: list[tuple[str | None, list[int]]], params, arrival: float,
                     param_names: dict[str, str], cache_salt: str | None = None) -> list[Job]:
        self.check_engine()
        cap = self.cfg.max_queued_requests
        if self.queued + len(prompts) > cap:
            raise APIError(503, f"the server is overloaded ({self.queued} requests queued, limit {cap}, "
                                "--max-queued-requests): retry later", code="overloaded",
                           headers={"Retry-After": str(self.cfg.retry_after_s)})
        if cache_salt is not None and not self.engine.accepts_cache_salt:
            raise bad_request("cache_salt is not supported by this engine", param="cache_salt")
        jobs: list[Job] = []
        self.queued += len(prompts)  # reserved now: concurrent requests see them while we wait for acks
        try:
            for i, (text, ids) in enumerate(prompts):
                handle = await self.engine.generate(ids, params, cache_salt)
                jobs.append(Job(handle, i, text, arrival))
        except BaseException as e:
            self.queued -= len(prompts) - len(jobs)
            for job in jobs:
                job.handle.abort()
                self._finish_job(job)
            if isinstance(e, ValueError):
                raise value_error(e, param_names) from None
            if isinstance(e, RuntimeError):  # the engine is gone (EngineDeadError, EngineGone)
                raise APIError(503, f"the engine cannot take requests: {e}", code="engine_unavailable") from None
            raise
        return jobs

    def _finish_job(self, job: Job) -> None:
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

    def _note_progress(self, job: Job) -> None:
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

    def request_error(self, job: Job) -> APIError:
        """The APIError for a job whose request failed inside the engine."""
        from quanta.engine.async_loop import EngineDeadError
        from quanta.serve.engine_ipc import EngineGone

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

    # --- answering ---------------------------------------------------------------------------------------
    def _release(self, jobs: list[Job], state: dict) -> None:
        """Once per HTTP request: abort what is left, record metrics, leave the in-flight count."""
        if state.get("released"):
            return
        state["released"] = True
        for job in jobs:
            self._finish_job(job)
        self.in_flight -= 1

    async def _drain(self, jobs: list[Job]) -> None:
        async with contextlib.aclosing(updates(jobs)) as ups:
            async for job in ups:
                self._note_progress(job)

    async def respond(self, request, jobs: list[Job], stream_fn, build_fn):
        """Streaming: an SSE response; otherwise wait (aborting on disconnect) and build the JSON body."""
        state: dict = {}
        self.in_flight += 1
        release = partial(self._release, jobs, state)
        if stream_fn is not None:
            return SSEResponse(stream_fn(jobs, release), release)
        try:
            await until_disconnect(request, self._drain(jobs))
        except ClientGone:
            return json_response({}, 499)
        finally:
            release()
        for job in jobs:
            if job.error is not None:
                raise self.request_error(job)
        return json_response(build_fn(jobs))

    async def stream(self, jobs: list[Job], release: Callable[[], None], chunks: ChunkWriter, choice,
                     first_choices: Iterable[dict] = ()) -> AsyncIterator[bytes]:
        """The SSE body of a generation request: `first_choices` (one chunk each), then a chunk per output
        update with `choice(job, output, taken, chars_sent_before)` (taken: jobs.take), then an error event
        or the usage chunk, then [DONE]. `release` runs however the stream ends."""
        failed = False
        try:
            for c in first_choices:
                yield chunks.chunk([c])
            async with contextlib.aclosing(updates(jobs)) as ups:
                async for job in ups:
                    self._note_progress(job)
                    for o in job.handle.outputs:
                        before = job.sent.get(o.index, (0,))[0]
                        took = take(job, o)
                        if took is None:
                            continue
                        yield chunks.chunk([choice(job, o, took, before)])
                    if job.done and job.error is not None:
                        yield self._error_event(job)
                        failed = True
                        break
            for event in chunks.tail(failed):
                yield event
        finally:
            release()

    def usage(self, jobs: list[Job]) -> dict:
        prompt = sum(len(j.handle.prompt_token_ids) for j in jobs)
        completion = sum(len(o.token_ids) for j in jobs for o in j.handle.outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def prompt_text(self, job: Job) -> str:
        if job.prompt_text is None:
            try:
                job.prompt_text = self.tokenizer.decode(job.handle.prompt_token_ids)
            except Exception:
                job.prompt_text = ""
        return job.prompt_text

    def _error_event(self, job: Job) -> bytes:
        err = self.request_error(job)
        self.metrics.http_error(err.status)
        return sse_event(err.body())
