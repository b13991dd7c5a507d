"""The engine requests of one HTTP request (`Job`) and how the server follows them: their output updates
(several jobs merged into one stream), what an output has that was not sent yet, and the disconnect watch
of a non-streaming request."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class Job:
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


async def updates(jobs: list[Job]) -> AsyncIterator[Job]:
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
    queue: asyncio.Queue[Job] = asyncio.Queue()

    async def pump(job: Job) -> None:
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


def take(job: Job, o) -> tuple[str, list[int], list, bool, bool] | None:
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


async def until_disconnect(request, coro):
    """Run `coro` to its result, or cancel it and raise ClientGone when the client disconnects first."""
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
        raise ClientGone()
    return task.result()
