"""Errors shared across layers."""


class RequestFailure(Exception):
    """An error that belongs to one request (its logits processor, its tokenizer ...): only it fails."""

    def __init__(self, request_id: int, cause: BaseException):
        super().__init__(f"request {request_id} failed: {type(cause).__name__}: {cause}")
        self.request_id = request_id
        self.cause = cause
