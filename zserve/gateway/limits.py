"""What one HTTP request may cost: its body, its JSON, the streams it opens.

One request fans out into ``n`` x inputs streams, each a REQUEST that the
gateway sends, the broker forwards and a worker holds; its body is parsed on
the gateway's one event loop. So:

* ``MAX_BODY``: bytes of one request body, the broker's own request limit
  (``protocol.MAX_REQUEST_SIZE``); a ``Content-Length`` over it is refused
  before a byte of the body is read.
* JSON: at most ``MAX_JSON_DEPTH`` levels of nesting and ``MAX_JSON_VALUES``
  values. A body under ``OFF_LOOP_BODY`` bytes is parsed on the loop by the
  C decoder (a few milliseconds at worst); a larger one in a thread, by the
  Python-level scanner, which counts as it goes and lets the loop run
  between values (the C decoder holds the GIL for the whole body: about a
  second for 8 MiB of ``{}``).
* ``MAX_STREAMS``: streams (``n`` x prompts) per request.
* ``MAX_FANOUT_BYTES``: encoded request bytes x streams per request, what
  one request puts in flight through the broker to the workers. The body of
  the ``n`` streams of one input is encoded once and shared.

Each refusal is a 400 ``invalid_request_error`` naming the field (``param``)
where there is one.

The server's limits on slow and numerous clients (``server.py``, the
gateway's flags) have their defaults here too, so that the CLI can show
them without importing uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from json.decoder import JSONArray, JSONObject  # type: ignore[attr-defined]
from json.scanner import py_make_scanner  # type: ignore[attr-defined]
from typing import Any

from zserve import protocol as p
from zserve.gateway.errors import APIError
from zserve.gateway.sse import ClientGone

MAX_BODY = p.MAX_REQUEST_SIZE  # bytes of one HTTP request body
MAX_JSON_DEPTH = 100  # nesting levels of a request body
MAX_JSON_VALUES = 200_000  # values (strings, numbers, arrays, ...) in a request body
OFF_LOOP_BODY = 64 * 1024  # bodies from this size on are parsed in a thread
MAX_STREAMS = 128  # n x inputs (prompts) per request
MAX_FANOUT_BYTES = 16 * 1024 * 1024  # encoded request bytes x streams per request

# server.py: per connection
HEADER_TIMEOUT = 10.0  # seconds to send a request's line and headers (--header-timeout)
BODY_TIMEOUT = 30.0  # seconds to send a request's body, once its headers are in (--body-timeout)
MAX_HEADER_BYTES = 64 * 1024  # a request's line and headers
MAX_CONNECTIONS = 1024  # open HTTP connections; requests on more get 503 (--max-connections)
KEEP_ALIVE_TIMEOUT = 5  # idle seconds between the requests of a connection (uvicorn's default)


@dataclass(frozen=True, slots=True)
class ServerLimits:
    """What ``server.GuardedHttp`` allows each connection, and how many."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    max_connections: int = MAX_CONNECTIONS
    max_header_bytes: int = MAX_HEADER_BYTES

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.body_timeout <= 0:
            raise ValueError("--header-timeout and --body-timeout must be > 0")
        if self.max_connections < 1:
            raise ValueError("--max-connections must be >= 1")


# What a msgpack integer can hold (the wire format of every request).
_INT_MIN = -(1 << 63)
_INT_END = 1 << 64

Receive = Callable[[], Awaitable[dict[str, Any]]]


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(message, "bad_request", param)


def too_large() -> APIError:
    return _bad(f"the request body is larger than {MAX_BODY} bytes")


def check_length(headers: list[tuple[bytes, bytes]]) -> None:
    """Refuse a declared ``Content-Length`` over ``MAX_BODY`` before reading."""
    for name, value in headers:
        if name == b"content-length":
            if value.isdigit() and int(value) > MAX_BODY:
                raise too_large()
            return


async def read_body(receive: Receive) -> bytes:
    """The whole request body (at most ``MAX_BODY`` bytes); ``ClientGone``
    if the client left first. How long a client may take to send it is the
    server's business (``server.py``)."""
    msg = await receive()
    if msg["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = msg.get("body", b"")
    if msg.get("more_body"):
        parts = [body]
        size = len(body)
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                raise ClientGone
            parts.append(msg.get("body", b""))
            size += len(parts[-1])
            if size > MAX_BODY:
                raise too_large()
            if not msg.get("more_body"):
                break
        body = b"".join(parts)
    elif len(body) > MAX_BODY:
        raise too_large()
    return body


# ------------------------------------------------------------------ JSON


def _too_deep() -> APIError:
    return _bad(f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")


def _too_many() -> APIError:
    return _bad(f"the request body has more than {MAX_JSON_VALUES} JSON values")


def _not_json() -> APIError:
    return _bad("the request body is not valid JSON")


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether ``doc`` nests more than ``limit`` levels (no recursion)."""
    stack = [(doc, 1)]
    while stack:
        v, d = stack.pop()
        if d > limit:
            return True
        if type(v) is dict:
            v = v.values()
        elif type(v) is not list:
            continue
        stack.extend((x, d + 1) for x in v if type(x) is dict or type(x) is list)
    return False


class _Guarded(json.JSONDecoder):
    """The Python-level scanner with a depth and a value budget. Slower than
    the C decoder, but it lets go of the GIL between values (so the event
    loop runs while a thread parses) and stops as soon as a budget is spent."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.values = 0
        self.parse_object = self._object
        self.parse_array = self._array
        self.scan_once = py_make_scanner(self)
        self._counted: Any = None

    def _count(self, scan_once: Any) -> Any:
        if self._counted is None:

            def counted(s: str, idx: int) -> Any:
                self.values += 1
                if self.values > MAX_JSON_VALUES:
                    raise _too_many()
                return scan_once(s, idx)

            self._counted = counted
        return self._counted

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_JSON_DEPTH:
            raise _too_deep()

    def _object(self, s_and_end: Any, strict: bool, scan_once: Any, *args: Any) -> Any:
        self._enter()
        try:
            return JSONObject(s_and_end, strict, self._count(scan_once), *args)
        finally:
            self.depth -= 1

    def _array(self, s_and_end: Any, scan_once: Any) -> Any:
        self._enter()
        try:
            return JSONArray(s_and_end, self._count(scan_once))
        finally:
            self.depth -= 1


def _loads_guarded(raw: bytes) -> Any:
    return _Guarded().decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))


def _as_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise _bad("the request body must be a JSON object")
    return doc


async def load_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, within the depth and value limits."""
    try:
        if len(raw) >= OFF_LOOP_BODY:
            return _as_object(await asyncio.to_thread(_loads_guarded, raw))
        doc = json.loads(raw)
    except APIError:
        raise
    except RecursionError:
        raise _too_deep() from None
    except (ValueError, UnicodeDecodeError):
        raise _not_json() from None
    # Under OFF_LOOP_BODY bytes the value count is bounded; the depth is
    # checked only where there are enough brackets to exceed it.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(doc, MAX_JSON_DEPTH):
        raise _too_deep()
    return _as_object(doc)


# ------------------------------------------------------------ fan-out


def check_streams(inputs: int, n: int) -> None:
    """At most ``MAX_STREAMS`` streams (``n`` x inputs) per request."""
    if inputs * n > MAX_STREAMS:
        param = "n" if n > 1 else "prompt"
        raise _bad(
            f"{inputs} input(s) x n={n} = {inputs * n} choices; at most {MAX_STREAMS} per request",
            param,
        )


def check_fanout(body_bytes: int, streams: int, n: int) -> None:
    """At most ``MAX_FANOUT_BYTES`` of encoded requests in flight per request:
    ``body_bytes`` so far (each input's encoded request x ``n``), ``streams``."""
    if body_bytes > MAX_FANOUT_BYTES:
        param = "n" if n > 1 else None
        raise _bad(
            f"{streams} choices of these inputs put {body_bytes} bytes of requests in "
            f"flight; at most {MAX_FANOUT_BYTES} per request (fewer choices or shorter inputs)",
            param,
        )


def check_numbers(params: dict[str, Any]) -> None:
    """A 400 naming the first sampling field holding an integer that no
    request can carry (msgpack's 64 bits), itself or in a list: what would
    otherwise fail as ``OverflowError`` on the way out."""
    for name, v in params.items():
        t = type(v)
        if t is int:
            if not _INT_MIN <= v < _INT_END:
                raise _bad(f"{name} is out of range", name)
        elif t is list:
            for x in v:
                if type(x) is int and not _INT_MIN <= x < _INT_END:
                    raise _bad(f"{name} holds a number out of range", name)
