"""zserve's error tree. Every error has a stable ``code`` that travels on the wire.

::

    ZServeError (code "error")
    ├── BadRequest          "bad_request"
    │   └── ContextOverflow "context_overflow"
    ├── ModelNotFound       "model_not_found"
    ├── Overloaded          "overloaded"
    ├── RateLimited         "rate_limited"
    ├── WorkerLost          "worker_lost"
    ├── Timeout             "timeout"
    ├── Cancelled           "cancelled"
    ├── BrokerUnreachable   "broker_unreachable"
    ├── ClientExpired       "client_expired"
    ├── EngineError         "engine_error"
    └── ProtocolError       "protocol_error"

``from_code`` is the one place a wire code becomes an exception.
"""

from __future__ import annotations

from typing import Any


class ZServeError(Exception):
    code = "error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__name__)
        self.message = message or self.__class__.__name__
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class BadRequest(ZServeError):
    code = "bad_request"


class ContextOverflow(BadRequest):
    code = "context_overflow"


class ModelNotFound(ZServeError):
    code = "model_not_found"


class Overloaded(ZServeError):
    code = "overloaded"


class RateLimited(ZServeError):
    """The request's tenant is over one of its limits. ``retry_after``:
    seconds after which it may pass; ``limit``: which one
    (``max_inflight``, ``requests_per_minute``, ``tokens_per_minute``), its
    value, and what was left of it (None where the broker did not say)."""

    code = "rate_limited"

    def __init__(
        self,
        message: str = "",
        *,
        retry_after: float | None = None,
        limit: str | None = None,
        limit_value: float | None = None,
        remaining: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit
        self.limit_value = limit_value
        self.remaining = remaining

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        for k in ("retry_after", "limit", "limit_value", "remaining"):
            if getattr(self, k) is not None:
                d[k] = getattr(self, k)
        return d


class WorkerLost(ZServeError):
    code = "worker_lost"


class Timeout(ZServeError):
    code = "timeout"


class Cancelled(ZServeError):
    code = "cancelled"


class BrokerUnreachable(ZServeError):
    code = "broker_unreachable"


class ClientExpired(ZServeError):
    """The broker heard nothing from this client for its expiry and ended its
    requests (the client's process or its link stalled that long)."""

    code = "client_expired"


class EngineError(ZServeError):
    code = "engine_error"


class ProtocolError(ZServeError):
    code = "protocol_error"


_BY_CODE: dict[str, type[ZServeError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        ContextOverflow,
        ModelNotFound,
        Overloaded,
        RateLimited,
        WorkerLost,
        Timeout,
        Cancelled,
        BrokerUnreachable,
        ClientExpired,
        EngineError,
        ProtocolError,
    )
}


def from_code(code: str, message: str, details: dict[str, Any] | None = None) -> ZServeError:
    """Build the exception for a wire error code (unknown codes keep their code);
    ``details``: the record's whole error map (``rate_limited`` reads its
    ``retry_after``, ``limit``, ``limit_value`` and ``remaining``)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ZServeError(message, code=code)
    if cls is RateLimited:
        d = details or {}
        lim = d.get("limit")
        return RateLimited(
            message,
            retry_after=_number(d.get("retry_after")),
            limit=lim if isinstance(lim, str) else None,
            limit_value=_number(d.get("limit_value")),
            remaining=_number(d.get("remaining")),
        )
    return cls(message)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


__all__ = [
    "BadRequest",
    "BrokerUnreachable",
    "Cancelled",
    "ClientExpired",
    "ContextOverflow",
    "EngineError",
    "ModelNotFound",
    "Overloaded",
    "ProtocolError",
    "RateLimited",
    "Timeout",
    "WorkerLost",
    "ZServeError",
    "from_code",
]
