"""The OpenAI-compatible HTTP server: a FastAPI app over one `LLM`. Translation only, no engine logic.

HTTP request -> pydantic model (protocol.py) -> checks (validation.py: caps, model name, context length;
prompts.py: token ids) -> SamplingParams -> `engine.generate(ids, params)` per prompt (server.py) -> OpenAI
response or SSE chunks (completions.py, chat.py; responses.py frames them).

Every error answers in the OpenAI envelope (errors.py). A client that disconnects aborts its requests
(streaming: the SSE response cancels its body on `http.disconnect`; non-streaming: a watcher task), which
frees their KV blocks at the engine's next step.

This module builds the app (routes, lifespan, middleware) and is the stable import path of `create_app` and
`ServeConfig`.
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request

from quanta.serve import chat as chat_api
from quanta.serve import completions as completions_api
from quanta.serve import tokens as tokens_api
from quanta.serve.auth import APIKeyMiddleware
from quanta.serve.config import ServeConfig
from quanta.serve.errors import APIError, install_handlers
from quanta.serve.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from quanta.serve.responses import SSEResponse, json_response
from quanta.serve.server import OpenAIServer

__all__ = ["APIKeyMiddleware", "OpenAIServer", "SSEResponse", "ServeConfig", "create_app"]


def create_app(engine, config: ServeConfig):
    """The FastAPI app serving `engine`: an `LLM` (served in this process), or a LocalEngine / ProcessEngine
    from engine_client.py. The caller owns the engine and shuts it down after the app has stopped."""
    from fastapi import FastAPI
    from starlette.responses import Response

    import quanta
    from quanta.serve.engine_local import LocalEngine

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
        return await completions_api.completions(server, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await chat_api.chat_completions(server, request)

    @app.get("/v1/models")
    async def models():
        return json_response({"object": "list", "data": [server.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise APIError(404, f"The model `{model_id[:200]}` does not exist.", param="model",
                           code="model_not_found")
        return json_response(server.model_card())

    @app.get("/health")
    async def health():
        err = server.engine_error()
        if err is not None:
            raise APIError(503, err, code="engine_unavailable")
        return json_response({"status": "ok"})

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.post("/tokenize")
    async def tokenize(request: Request):
        return await tokens_api.tokenize(server, request)

    @app.post("/detokenize")
    async def detokenize(request: Request):
        return await tokens_api.detokenize(server, request)

    @app.get("/version")
    async def version():
        return json_response({"version": quanta.__version__})

    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key, on_reject=server.metrics.http_error)
    return app
