"""Errors the server answers with, each with an HTTP status and OpenAI's error body.

OpenAI's shape is `{"error": {"message", "type", "param", "code"}}`; clients (the `openai` package)
read `type` and `code`, so the values follow OpenAI's where one exists (model_not_found,
context_length_exceeded, invalid_api_key, rate_limit_exceeded).
"""

from __future__ import annotations


class ServeError(Exception):
    """An answer other than 200: status, message, and OpenAI's type/param/code."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.param = message, param
        self.code = code if code is not None else type(self).code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BadRequest(ServeError):
    status = 400


class Unauthorized(ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(ServeError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ServeError):
    status = 409
    code = "conflict"


class QueueFull(ServeError):
    """The engine's queue is full: the client should retry after a moment (Retry-After)."""

    status = 429
    type = "rate_limit_error"  # openai-python maps 429 to RateLimitError whatever the type
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class ServerFault(ServeError):
    """A bug or an accelerator failure while generating: answered, logged in one line, never fatal."""

    status = 500
    type = "server_error"
    code = "internal_error"
