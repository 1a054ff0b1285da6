"""The HTTP server around the gateway's app: uvicorn, guarded against slow
and numerous clients.

uvicorn bounds the idle time between the requests of a kept-alive connection
(``timeout_keep_alive``), not the time a client takes to send a request: a
connection that sends half its headers, or its headers and half its body,
and then nothing, stays open for ever. ``GuardedHttp`` (uvicorn's httptools
protocol) adds, per connection:

* a header deadline: ``header_timeout`` seconds from the connection's start,
  or from the first byte of each later request, to the end of the headers,
  which may take at most ``MAX_HEADER_BYTES`` (431 past it);
* a body deadline: ``body_timeout`` seconds from the end of the headers to
  the end of the body, armed only when the body did not come with them (no
  timer at all for the usual small request);
* a connection cap: a request on a connection past ``max_connections`` open
  ones is answered 503 ``too_many_connections``, ``Connection: close``; the
  connections already open (their streams) carry on.

A missed deadline is answered 408 ``request_timeout`` where no response has
begun, and the connection closed. Each refusal is an OpenAI-shaped error.

``DrainingServer`` is the planned stop: on SIGTERM (or SIGINT) the gateway
fails ``/ready`` at once (``/health`` stays), serves on for ``drain_delay``
seconds (a load balancer's time to notice; each response closes its
connection), then closes its listener (new connections are refused) and
lets the open responses finish within ``drain_timeout``; a second signal
ends them at once.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from zserve.gateway.errors import APIError
from zserve.gateway.limits import ServerLimits

log = logging.getLogger(__name__)

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def _raw_response(status: int, err: APIError) -> bytes:
    body = err.body()
    head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
    head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
    return head + b"connection: close\r\n\r\n" + body


async def _busy(scope: Any, receive: Any, send: Any) -> None:
    """The app for a request over the connection cap."""
    body = APIError("the gateway is at its connection limit", "too_many_connections").body()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline and size cap, a
    body deadline and a connection cap (the module's docstring)."""

    def __init__(
        self,
        *args: Any,
        limits: ServerLimits,
        draining: Callable[[], bool] = lambda: False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.draining = draining  # the gateway is stopping: no keep-alive
        self._app = self.app
        self._deadline: asyncio.TimerHandle | None = None
        # Bytes of the current request's headers so far; -1: not reading headers.
        self._header_bytes = -1

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _await_headers(self) -> None:
        self._header_bytes = 0
        self._arm(self.limits.header_timeout)

    def _refuse(self, status: int, err: APIError) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(_raw_response(status, err))
            self.transport.close()

    def _expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._header_bytes >= 0:  # headers: a response in progress is an earlier request's
            what, seconds = "headers", self.limits.header_timeout
            answered = cycle is not None and not cycle.response_complete
        else:
            what, seconds = "body", self.limits.body_timeout
            answered = cycle is not None and cycle.response_started
        if answered:
            self.transport.close()
            return
        msg = f"the request's {what} did not arrive within {seconds:g} s"
        self._refuse(408, APIError(msg, "request_timeout"))

    # ------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._await_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        in_headers = self._header_bytes >= 0
        super().data_received(data)
        if self.transport.is_closing():
            return
        if in_headers and self._header_bytes >= 0:  # still in the headers
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                msg = f"the request's headers are larger than {self.limits.max_header_bytes} bytes"
                self._refuse(431, APIError(msg, "headers_too_large"))
        elif self._deadline is None and self._header_bytes < 0:
            cycle = self.cycle
            if cycle is not None and cycle.more_body:
                self._arm(self.limits.body_timeout)  # the body did not come with its headers

    # --------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_bytes < 0:  # a later request on a kept-alive connection
            self._await_headers()

    def on_headers_complete(self) -> None:
        self._header_bytes = -1
        self._disarm()
        over = len(self.connections) > self.limits.max_connections
        self.app = _busy if over else self._app
        super().on_headers_complete()
        if self.draining() and self.cycle is not None:
            self.cycle.keep_alive = False  # its next request goes elsewhere

    def on_message_complete(self) -> None:
        if self._header_bytes < 0:
            self._disarm()  # the body's deadline
            cycle = self.cycle
            if cycle is not None and cycle.response_complete:
                # Answered before its body ended: uvicorn's keep-alive timer
                # was armed then and cancelled by the body's bytes since.
                self._await_headers()
        super().on_message_complete()


def protocol(limits: ServerLimits, draining: Callable[[], bool] = lambda: False) -> Any:
    """The ``http`` protocol factory for ``uvicorn.Config``; ``draining``:
    whether the gateway is stopping (responses then close their connection)."""
    return functools.partial(GuardedHttp, limits=limits, draining=draining)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the gateway's drain (the module's docstring).
    ``on_drain`` is called at the first signal (the app fails ``/ready``
    from then on); the drain's grace is the config's
    ``timeout_graceful_shutdown``."""

    def __init__(
        self, config: uvicorn.Config, on_drain: Callable[[], None], drain_delay: float
    ) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.drain_delay = drain_delay
        self._close_at: float | None = None  # when the listener closes

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._close_at is None and not self.should_exit:
            self._close_at = time.monotonic() + self.drain_delay
            self.on_drain()
            log.info(
                "draining: /ready fails now, the listener closes in %g s, open responses "
                "then have %g s", self.drain_delay, self.config.timeout_graceful_shutdown,
            )  # fmt: skip
            return
        log.info("stopping now")
        self.should_exit = self.force_exit = True  # again: now

    async def on_tick(self, counter: int) -> bool:
        if self._close_at is not None and time.monotonic() >= self._close_at:
            self.should_exit = True
        return await super().on_tick(counter)
