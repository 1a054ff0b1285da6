"""zserve's error tree. Every error has a stable ``code`` that travels on the wire.

::

    ZServeError (code "error")
    ├── BadRequest          "bad_request"
    │   └── ContextOverflow "context_overflow"
    ├── ModelNotFound       "model_not_found"
    ├── Overloaded          "overloaded"
    ├── WorkerLost          "worker_lost"
    ├── Timeout             "timeout"
    ├── Cancelled           "cancelled"
    ├── BrokerUnreachable   "broker_unreachable"
    ├── EngineError         "engine_error"
    └── ProtocolError       "protocol_error"

``from_code`` is the one place a wire code becomes an exception.
"""

from __future__ import annotations


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


class WorkerLost(ZServeError):
    code = "worker_lost"


class Timeout(ZServeError):
    code = "timeout"


class Cancelled(ZServeError):
    code = "cancelled"


class BrokerUnreachable(ZServeError):
    code = "broker_unreachable"


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
        WorkerLost,
        Timeout,
        Cancelled,
        BrokerUnreachable,
        EngineError,
        ProtocolError,
    )
}


def from_code(code: str, message: str) -> ZServeError:
    """Build the exception for a wire error code (unknown codes keep their code)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        return ZServeError(message, code=code)
    return cls(message)


__all__ = [
    "BadRequest",
    "BrokerUnreachable",
    "Cancelled",
    "ContextOverflow",
    "EngineError",
    "ModelNotFound",
    "Overloaded",
    "ProtocolError",
    "Timeout",
    "WorkerLost",
    "ZServeError",
    "from_code",
]
