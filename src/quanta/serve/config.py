"""What the HTTP server enforces on top of the engine: one dataclass, filled from the CLI's server flags."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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
