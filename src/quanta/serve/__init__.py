"""`quanta serve`: an OpenAI-compatible HTTP server over one LLM (FastAPI + uvicorn; `pip install quanta[server]`)."""

from __future__ import annotations

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name):
    if name in __all__:
        from quanta.serve import app

        return getattr(app, name)
    raise AttributeError(name)
