"""zserve: serve LLMs to many clients from many workers through one ZeroMQ broker."""

from zserve._client_core import Completion, Embeddings
from zserve.client import AsyncClient, AsyncStream, Client, Stream
from zserve.errors import (
    BadRequest,
    BrokerUnreachable,
    Cancelled,
    ClientExpired,
    ContextOverflow,
    EngineError,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    Timeout,
    WorkerLost,
    ZServeError,
)
from zserve.protocol import Delta

__version__ = "0.1.0"

__all__ = [
    "AsyncClient",
    "AsyncStream",
    "BadRequest",
    "BrokerUnreachable",
    "Cancelled",
    "Client",
    "ClientExpired",
    "Completion",
    "ContextOverflow",
    "Delta",
    "EngineError",
    "Embeddings",
    "ModelNotFound",
    "Overloaded",
    "ProtocolError",
    "RateLimited",
    "Stream",
    "Timeout",
    "WorkerLost",
    "ZServeError",
]
