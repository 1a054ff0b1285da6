"""Errors in OpenAI's shape: the gateway's one mapping of zserve codes to HTTP.

Every error leaves as ``{"error": {"message", "type", "param", "code"}}``:

=================================  ======  ==========================
zserve code                        status  OpenAI type
=================================  ======  ==========================
bad_request, context_overflow      400     invalid_request_error
(bad or missing API key)           401     authentication_error
model_not_found, not_found         404     invalid_request_error
request_timeout (a slow client)    408     invalid_request_error
overloaded, rate_limited           429     rate_limit_error
headers_too_large                  431     invalid_request_error
worker_lost, broker_unreachable,   503     server_error
timeout (no free worker in time,
or a worker that went silent),
cancelled (gateway shutting down),
too_many_connections
anything else (engine_error, ...)  500     server_error
=================================  ======  ==========================

``timeout`` is 503, not 504: the broker sends it when no worker freed up for
a queued request in time, which is "no worker" from the caller's side.

A request that breaks a limit on the way out (an integer too large for the
wire, ``OverflowError``; nesting too deep, ``RecursionError``) is a 400 too,
never a 500.
"""

from __future__ import annotations

import json
from typing import Any

from zserve.errors import RateLimited, ZServeError
from zserve.gateway.tenants import rate_limit_headers
from zserve.protocol import SamplingParams

STATUS: dict[str, int] = {
    "bad_request": 400,
    "context_overflow": 400,
    "invalid_api_key": 401,
    "model_not_found": 404,
    "not_found": 404,  # a stored response (/v1/responses) that is not there
    "request_timeout": 408,
    "overloaded": 429,
    "rate_limited": 429,  # a tenant over its limits: with Retry-After and x-ratelimit-*
    "headers_too_large": 431,
    "worker_lost": 503,
    "broker_unreachable": 503,
    "client_expired": 503,  # the broker heard nothing from the gateway's client in time
    "timeout": 503,
    "cancelled": 503,  # the gateway is shutting down
    "too_many_connections": 503,
}

_TYPE: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    408: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
}


class APIError(Exception):
    """An error on its way to the HTTP client."""

    def __init__(self, message: str, code: str = "bad_request", param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param
        self.status = STATUS.get(code, 500)
        self.headers: list[tuple[bytes, bytes]] = []  # more response headers (a 429's)

    @property
    def type(self) -> str:
        return _TYPE.get(self.status, "server_error")

    def to_dict(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return json.dumps(self.to_dict(), ensure_ascii=False).encode()


# Words that start a SamplingParams validation message, to fill ``param``.
_PARAMS = frozenset(SamplingParams._FIELDS)


def to_api_error(e: BaseException) -> APIError:
    """The OpenAI-shaped twin of any exception (unexpected ones are 500s
    without a traceback)."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, OverflowError):
        return APIError(f"a number in the request is out of range ({e})", "bad_request")
    if isinstance(e, RecursionError):
        return APIError("the request is nested too deeply", "bad_request")
    if not isinstance(e, ZServeError):
        return APIError(f"internal error: {type(e).__name__}: {e}", "internal_error")
    param = None
    if e.code == "bad_request":
        word = e.message.split(" ", 1)[0]
        param = word if word in _PARAMS else None
    elif e.code == "model_not_found":
        param = "model"
    err = APIError(e.message, e.code, param)
    if isinstance(e, RateLimited):
        err.headers = rate_limit_headers(e)
    return err
