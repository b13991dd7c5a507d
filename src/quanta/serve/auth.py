"""`--api-key`: an ASGI middleware that answers 401 (in the OpenAI envelope) to a request without the key."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from quanta.serve.errors import dumps, error_body


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on every route but exactly /health (constant-time comparison). The path is
    the decoded one routing uses, so `//v1/...`, `/V1/...` and percent-encoded paths all need the key."""

    def __init__(self, app, api_key: str | None, on_reject: Callable[[int], None] | None = None):
        self.app = app
        self._key_digest = hashlib.sha256(api_key.encode()).digest() if api_key else None
        self.on_reject = on_reject  # called with 401 (the server counts it in its metrics)

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

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("path") == "/health" or self.check_key(scope):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject(401)
        body = dumps(error_body("invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                                "invalid_request_error", None, "invalid_api_key"))
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
