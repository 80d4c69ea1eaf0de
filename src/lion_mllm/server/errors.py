"""Errors a request can end with, in the OpenAI error shape `{"error": {"message", "type", "code"}}`."""

from __future__ import annotations

from typing import Any

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
               501: "not_implemented_error", 503: "server_error", 504: "timeout_error"}


class APIError(Exception):
    """An error with its HTTP status and a message meant for the client."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


class QueueFullError(APIError):
    def __init__(self, capacity: int):
        super().__init__(429, f"the server's queue is full ({capacity} requests waiting); retry shortly",
                         "queue_full", headers={"Retry-After": "1"})


class ServerStoppingError(APIError):
    def __init__(self) -> None:
        super().__init__(503, "the server is shutting down", "shutting_down")
