"""A ZeroMQ socket driven straight from the asyncio loop's reader callback.

pyzmq's ``zmq.asyncio`` wraps every call in futures and flag enums; on the
hot path of a worker or a client that carries thousands of messages a second
that costs more than the broker itself. Here incoming messages are pushed to
a plain callback, and sends are plain non-blocking sends; only a send that
finds the pipe full queues and hands back a future that resolves when the
queue has drained (backpressure).

A message that may wait a little (``send_later``: a stored response's
write, which wants no answer) rides with the next message sent on the
socket, or leaves alone after its delay: ZeroMQ hands messages queued
together to the peer in one write, which the peer reads in one wake-up, and
on a loaded machine a wake-up for a lone message costs the peer about as
much CPU as a whole stream's token frames.

ZeroMQ's FD is edge-triggered: it signals a change of ``ZMQ_EVENTS``, and a
send or receive can consume the edge. So after every send we schedule one
more look at ``ZMQ_EVENTS`` on the loop, and a batch that stops with messages
still waiting reschedules itself instead of waiting for an edge.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable

import zmq

_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)
_NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
_EVENTS = int(zmq.EVENTS)
BATCH = 512  # messages handled per loop turn before yielding (default)

# pyzmq's sugar send_multipart/recv_multipart spend more time on flag enums
# than ZeroMQ spends on small frames; these call the backend with plain ints.
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


def send_frames(sock: zmq.Socket, frames: list[bytes]) -> None:
    """Non-blocking multipart send; raises ``zmq.Again`` (nothing sent) when full.

    ZeroMQ accepts or refuses a multipart message on its first frame, so a
    refusal never leaves a partial message behind.
    """
    more = _NOBLOCK | _SNDMORE
    last = len(frames) - 1
    for i in range(last):
        _send(sock, frames[i], more)
    _send(sock, frames[last], _NOBLOCK)


def recv_frames(sock: zmq.Socket, flags: int = _NOBLOCK) -> list[bytes]:
    """Multipart receive, non-blocking by default (``zmq.Again`` when nothing
    waits); ``flags=0`` blocks for the first frame up to ``ZMQ_RCVTIMEO``."""
    parts = [_recv(sock, flags)]
    while _get(sock, _RCVMORE):
        parts.append(_recv(sock, _NOBLOCK))
    return parts


class LoopSocket:
    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop | None = None,
        batch: int = BATCH,
    ) -> None:
        self.sock = sock
        self.batch = batch  # messages handled per loop turn before yielding
        self.on_message = on_message
        self.loop = loop or asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._out: deque[list[bytes]] = deque()  # frames waiting for room
        self._drained: asyncio.Future[None] | None = None
        self._later: list[list[bytes]] = []  # messages waiting for company (send_later)
        self._later_timer: asyncio.TimerHandle | None = None
        self._scheduled = False
        self.closed = False
        self.loop.add_reader(self._fd, self._process)
        self._schedule()  # messages may be waiting already

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self._process)

    def _process(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        sock = self.sock
        for _ in range(self.batch):
            ev = _get(sock, _EVENTS)
            if self._out and ev & _POLLOUT:
                self._flush_out()
                ev = _get(sock, _EVENTS)
            if not ev & _POLLIN:
                return
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            self.on_message(frames)
            if self.closed:
                return
        self._schedule()  # more waiting: give others a turn first

    def read_now(self) -> None:
        """Handle what waits now (a batch at most), without waiting for the
        loop to notice: after a stalled loop, before judging a peer silent."""
        self._process()

    def _flush_out(self) -> None:
        out = self._out
        sock = self.sock
        while out:
            try:
                send_frames(sock, out[0])
            except zmq.Again:
                return
            out.popleft()
        if self._drained is not None:
            if not self._drained.done():
                self._drained.set_result(None)
            self._drained = None

    def send_later(self, frames: list[bytes], delay: float) -> None:
        """Send with the next message, or alone within ``delay`` seconds,
        in order with everything sent meanwhile (never dropped: queued when
        the pipe is full, as ``send``)."""
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket closed")
        self._later.append(frames)
        if self._later_timer is None:
            self._later_timer = self.loop.call_later(delay, self.flush_later)

    def flush_later(self) -> None:
        """Send what ``send_later`` holds, now."""
        if self._later_timer is not None:
            self._later_timer.cancel()
            self._later_timer = None
        later, self._later = self._later, []
        if not self.closed:
            for frames in later:
                self._send(frames)

    def send(self, frames: list[bytes]) -> asyncio.Future[None] | None:
        """Send now; if the pipe is full, queue and return a future for the drain."""
        if self.closed:
            raise zmq.ZMQError(zmq.ENOTSOCK, "socket closed")
        if self._later:
            self.flush_later()
        return self._send(frames)

    def _send(self, frames: list[bytes]) -> asyncio.Future[None] | None:
        if not self._out:
            try:
                send_frames(self.sock, frames)
            except zmq.Again:
                pass
            else:
                self._schedule()  # the send may have eaten a POLLIN edge
                return None
        self._out.append(frames)
        self._schedule()
        if self._drained is None:
            self._drained = self.loop.create_future()
        return self._drained

    def unsend(self, frames: list[bytes]) -> bool:
        """Take back a queued message that has not left yet."""
        for i, f in enumerate(self._out):
            if f is frames:
                del self._out[i]
                return True
        return False

    def send_now(self, frames: list[bytes]) -> bool:
        """Send if there is room at once, else drop; for best-effort control frames."""
        if self._later and not self.closed:
            self.flush_later()
        if self.closed or self._out:
            return False
        try:
            send_frames(self.sock, frames)
        except zmq.ZMQError:
            return False
        self._schedule()
        return True

    def close(self, linger_ms: int = 0) -> None:
        """Close; with ``linger_ms``, what waits is handed to ZeroMQ first (as
        far as there is room) and may go on being delivered that long."""
        if self.closed:
            return
        if linger_ms and self._later:
            self.flush_later()
        if self._later_timer is not None:
            self._later_timer.cancel()
        self.closed = True
        self.loop.remove_reader(self._fd)
        if linger_ms and self._out:
            self._flush_out()
        if self._drained is not None and not self._drained.done():
            self._drained.cancel()
        self._out.clear()
        self.sock.close(linger_ms)


class LockedLoopSocket(LoopSocket):
    """A ``LoopSocket`` that one other thread may also send on (a client's
    heartbeats while its event loop is stalled, see ``client._keepalive``).

    A ZeroMQ socket is not thread-safe, but may pass between threads through
    a full memory barrier: every use of the socket here holds ``lock`` (the
    loop's own uses, in a ``with``; the other thread's, only when it gets the
    lock at once, so it never waits on the loop).
    """

    def __init__(
        self,
        sock: zmq.Socket,
        on_message: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop | None = None,
        batch: int = BATCH,
    ) -> None:
        self.lock = threading.RLock()  # before the first look at the socket
        super().__init__(sock, on_message, loop, batch)

    def _process(self) -> None:
        with self.lock:
            super()._process()

    def send(self, frames: list[bytes]) -> asyncio.Future[None] | None:
        with self.lock:
            return super().send(frames)

    def flush_later(self) -> None:
        with self.lock:
            super().flush_later()

    def unsend(self, frames: list[bytes]) -> bool:
        with self.lock:
            return super().unsend(frames)

    def send_now(self, frames: list[bytes]) -> bool:
        with self.lock:
            return super().send_now(frames)

    def close(self, linger_ms: int = 0) -> None:
        with self.lock:
            super().close(linger_ms)

    def send_from_thread(self, frames: list[bytes]) -> bool:
        """From another thread: send if the socket is free and has room at
        once, else do nothing. The loop then takes one more look at the
        socket (the send may have eaten the edge of its FD)."""
        if not self.lock.acquire(blocking=False):
            return False
        try:
            if self.closed or self._out:
                return False
            try:
                send_frames(self.sock, frames)
            except zmq.ZMQError:
                return False
        finally:
            self.lock.release()
        try:
            self.loop.call_soon_threadsafe(self._schedule)
        except RuntimeError:  # the loop is closed
            pass
        return True
