"""What goes on the wire: JSON responses, server-sent events (`data: {...}` chunks ending in `data: [DONE]`)
and the SSE response that aborts its requests as soon as the client disconnects."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from quanta.serve.errors import dumps

SSE_DONE = b"data: [DONE]\n\n"


def json_response(obj: Any, status: int = 200, headers: dict | None = None):
    from starlette.responses import Response

    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def finish_reason(reason: str | None) -> str | None:
    """quanta's finish reason as OpenAI's."""
    if reason in ("cancelled", "timeout"):
        return "abort"
    return reason


def sse_event(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


class ChunkWriter:
    """The chunks of one streamed response. Each carries id / object / created / model; with
    stream_options.include_usage each also has `usage`: null, or the running totals with
    continuous_usage_stats; the last chunk (no choices) has the final usage."""

    def __init__(self, rid: str, object_name: str, created: int, model: str, stream_options,
                 usage: Callable[[], dict]):
        self.rid, self.object_name, self.created, self.model = rid, object_name, created, model
        self.include_usage = bool(stream_options and stream_options.include_usage)
        self.continuous = bool(stream_options and stream_options.continuous_usage_stats)
        self._usage = usage

    def chunk(self, choices: list[dict], final: bool = False) -> bytes:
        c = {"id": self.rid, "object": self.object_name, "created": self.created, "model": self.model,
             "choices": choices}
        if self.include_usage:
            c["usage"] = self._usage() if (self.continuous or final) else None
        return sse_event(c)

    def tail(self, failed: bool) -> list[bytes]:
        """The end of the stream: the usage chunk (when asked for and the stream did not fail), then [DONE]."""
        if self.include_usage and not failed:
            return [self.chunk([], final=True), SSE_DONE]
        return [SSE_DONE]


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
