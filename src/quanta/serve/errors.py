"""The OpenAI error envelope `{"error": {"message", "type", "param", "code"}}` and the handlers that make
every failure use it: bad requests are 400 (never FastAPI's 422), unknown routes 404, and so on."""

from __future__ import annotations

import json
import logging
from typing import Any

logger = logging.getLogger("quanta.serve")

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error answered to the client in the OpenAI envelope."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def dumps(obj: Any) -> bytes:
    """JSON for the wire: ASCII-escaped (so lone surrogates from the request can never break encoding),
    no NaN/Infinity literals (they are not JSON)."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":")).encode()


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        if obj != obj:
            return None
        if obj in (float("inf"), float("-inf")):
            return 9999.0 if obj > 0 else -9999.0
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def pydantic_errors_to_api_error(errors: list[dict]) -> APIError:
    """The first pydantic error as a 400 naming the field (dotted path) and what was wrong."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if _is_field(p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    if kind == "extra_forbidden":
        message = f"unknown field {param!r}: quanta does not know this field (check its spelling)"
    elif kind == "missing":
        message = f"missing required field {param!r}"
    else:
        message = f"{param}: {msg}" if param else msg
        if "input" in first and kind not in ("missing",):
            shown = _short(first["input"])
            if shown is not None:
                message += f" (got {shown})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list", "body", "function-after", "function-before"}


def _is_field(part) -> bool:
    """Location parts that name a field or an index (not pydantic's union-member tags like 'list[int]')."""
    if isinstance(part, int):
        return True
    return isinstance(part, str) and "[" not in part and part not in _TYPE_TAGS and not part[:1].isupper()


def _short(value: Any) -> str | None:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        return None
    return text if len(text) <= 80 else text[:77] + "..."


def install_handlers(app, on_status=None) -> None:
    """Exception handlers on a FastAPI app: everything answers in the envelope (`on_status(code)` counts them)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import Response

    def respond(status: int, body: dict, headers: dict | None = None) -> Response:
        if on_status is not None:
            on_status(status)
        return Response(dumps(body), status_code=status, media_type="application/json", headers=headers)

    async def on_api_error(request, exc: APIError):
        return respond(exc.status, exc.body(), exc.headers)

    async def on_validation(request, exc: RequestValidationError):
        err = pydantic_errors_to_api_error(list(exc.errors()))
        return respond(400, err.body())

    async def on_http(request, exc: StarletteHTTPException):
        status = exc.status_code
        if status == 422:
            status = 400
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        return respond(status, error_body(detail, _TYPES.get(status, "invalid_request_error")),
                       getattr(exc, "headers", None))

    async def on_error(request, exc: Exception):
        logger.exception("quanta serve: internal error on %s %s", request.method, request.url.path)
        return respond(500, error_body(f"internal server error ({type(exc).__name__})", "server_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_error)
