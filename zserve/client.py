"""The Python client: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Socket role: one DEALER per client, connected to the broker's frontend
ROUTER (``ZMQ_IMMEDIATE``, so a broker that is not there is an error, not a
silent queue). Many requests share the socket; each has a request id and
ends with exactly one final record. While requests are in flight the client
heartbeats and expects the broker's heartbeats back: a broker silent for
interval x liveness ends them with ``BrokerUnreachable``.

Closing a stream early (``close``/``aclose``, leaving its ``with`` block, or
dropping it) cancels its request on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq

from zserve import protocol as p
from zserve._client_core import (
    MAX_RESUMES,
    Accumulator,
    ClientCore,
    Completion,
    Embeddings,
    StreamState,
    to_delta,
    wake,
)
from zserve._loopsock import LoopSocket, recv_frames, send_frames
from zserve.errors import BrokerUnreachable, Cancelled, Timeout, ZServeError
from zserve.protocol import Delta
from zserve.security import ClientCurve, HandshakeWatch, KeySource

__all__ = ["AsyncClient", "AsyncStream", "Client", "Completion", "Embeddings", "Stream"]


# The backend's plain calls (pyzmq's sugar converts flags to enums on each call).
_get = zmq.backend.Socket.get
_set = zmq.backend.Socket.set
_RCVTIMEO = int(zmq.RCVTIMEO)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


# Broker messages read per loop turn before the streams' readers run. A TOKENS
# message can carry hundreds of records; reading a few at a time lets the
# readers consume them while they are young, so the records never pile up in
# Python (where the garbage collector would keep walking them: reading 512
# messages a turn cost more CPU in collections than in decoding).
READ_BATCH = 16


# On close, how long ZeroMQ may go on delivering what was sent (the CANCELs
# of requests still running) after the socket is gone.
CLOSE_LINGER_MS = 1000


def _close(sock: zmq.Socket, sent: bool) -> None:
    sock.close(CLOSE_LINGER_MS if sent else 0)


def _dealer(
    ctx: zmq.Context, address: str, curve: ClientCurve | None = None
) -> tuple[zmq.Socket, HandshakeWatch | None]:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)  # the broker bounds what it sends us
    # CURVE: with ZMQ_IMMEDIATE a refused handshake means sends block, so
    # the watch is what tells "refused" from "not there".
    watch = curve.apply(s) if curve is not None else None
    s.connect(address)
    return s, watch


class _Base:
    def __init__(
        self,
        address: str,
        timeout: float,
        heartbeat_interval: float,
        heartbeat_liveness: int,
        connect_timeout: float,
        max_resumes: int = MAX_RESUMES,
    ) -> None:
        self.address = address
        self.timeout = timeout  # seconds without progress before Timeout
        self.heartbeat_interval = heartbeat_interval
        self.expiry = heartbeat_interval * heartbeat_liveness
        self.connect_timeout = connect_timeout
        self._core = ClientCore(heartbeat_interval, max_resumes)
        self._last_send = 0.0
        self._closed = False

    @property
    def resumes(self) -> int:
        """Streams continued on another worker after theirs died, so far."""
        return self._core.resumes

    _watch: HandshakeWatch | None = None  # CURVE handshakes, where CURVE is on

    def _unreachable(self) -> BrokerUnreachable:
        """Nothing could be sent within ``connect_timeout``."""
        if self._watch is not None:
            return BrokerUnreachable(self._watch.explain(self.address))
        return BrokerUnreachable(f"no broker at {self.address}")

    def _silent_error(self) -> BrokerUnreachable:
        return BrokerUnreachable(
            f"broker at {self.address} went silent for {self.expiry:g} s"
        )


# ---------------------------------------------------------------- sync


class Stream:
    """An iterator of ``Delta`` for one request."""

    def __init__(self, client: Client, rid: bytes, state: StreamState) -> None:
        self._client = client
        self._rid = rid
        self._state = state
        self._finished = False

    def __iter__(self) -> Iterator[Delta]:
        return self

    def __next__(self) -> Delta:
        if self._finished:
            raise StopIteration
        st = self._state
        c = self._client
        deadline = time.monotonic() + c.timeout
        while not st.records:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise Timeout(f"no reply within {c.timeout} s")
            c._pump(min(remaining, c.heartbeat_interval))
        rec = st.records.popleft()
        try:
            d = to_delta(rec)
        except ZServeError:
            self._finished = True
            raise
        if d.finish_reason is not None:
            self._finished = True
        return d

    def close(self) -> None:
        """Stop reading; cancels the request if it is still running."""
        if not self._finished:
            self._finished = True
            rid = self._state.rid  # the current attempt's (a resume takes a new id)
            if self._client._core.forget(rid) and not self._client._closed:
                self._client._send_cancel(rid)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Client(_Base):
    """Blocking client. ``with Client(address) as c: c.generate(model, prompt)``."""

    def __init__(
        self,
        address: str = p.DEFAULT_FRONTEND,
        *,
        timeout: float = 60.0,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        connect_timeout: float = 5.0,
        curve_secret: KeySource | None = None,
        curve_server: KeySource | None = None,
        max_resumes: int = MAX_RESUMES,
    ) -> None:
        super().__init__(
            address, timeout, heartbeat_interval, heartbeat_liveness, connect_timeout, max_resumes
        )
        # CURVE: our .key_secret file and the broker's .key file (or z85 keys)
        curve = ClientCurve.load(curve_secret, curve_server)
        self._sock, self._watch = _dealer(zmq.Context.instance(), address, curve)
        self._rcvtimeo = -1  # ZMQ_RCVTIMEO as last set
        # CANCELs that found the pipe full: sent before anything else, so a
        # cancel is never lost while the request it names can still run.
        self._backlog: deque[list[bytes]] = deque()

    def _flush_backlog(self) -> bool:
        """Send what waits; True once nothing does."""
        while self._backlog:
            try:
                send_frames(self._sock, self._backlog[0])
            except zmq.Again:
                return False
            self._backlog.popleft()
        return True

    def _send(self, frames: list[bytes], quiet: bool = False) -> None:
        """Send, waiting up to ``connect_timeout`` for room; ``quiet``: a
        heartbeat, dropped if there is no room at once."""
        if not self._flush_backlog():
            if quiet:
                return
            deadline = time.monotonic() + self.connect_timeout
            while not self._flush_backlog():
                left = deadline - time.monotonic()
                if left <= 0 or not self._sock.poll(left * 1000, zmq.POLLOUT):
                    raise self._unreachable()
        try:
            send_frames(self._sock, frames)
        except zmq.Again:
            if quiet or not self._sock.poll(self.connect_timeout * 1000, zmq.POLLOUT):
                if quiet:
                    return
                raise self._unreachable() from None
            send_frames(self._sock, frames)
        self._last_send = time.monotonic()

    def _send_cancel(self, rid: bytes) -> None:
        """A CANCEL goes out now or, if the pipe is full, before the next send."""
        frames = self._core.cancel_frames(rid)
        if not self._flush_backlog():
            self._backlog.append(frames)
            return
        try:
            send_frames(self._sock, frames)
        except zmq.Again:
            self._backlog.append(frames)

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for broker messages and route them.

        A blocking receive with ``ZMQ_RCVTIMEO`` (set only when it changes)
        costs less than a poll then a receive; then whatever else is waiting
        is read without blocking, checking ``ZMQ_EVENTS`` rather than
        provoking ``zmq.Again``.
        """
        sock = self._sock
        if self._backlog:
            self._flush_backlog()
        ms = max(0, int(timeout * 1000))
        if ms != self._rcvtimeo:
            _set(sock, _RCVTIMEO, ms)
            self._rcvtimeo = ms
        try:
            frames = recv_frames(sock, 0)  # blocks up to RCVTIMEO
        except zmq.Again:
            pass
        else:
            now = time.monotonic()
            core = self._core
            while True:
                try:
                    core.on_message(frames, now)
                except (ValueError, TypeError):
                    pass  # malformed: ignore
                if not _get(sock, _EVENTS) & _POLLIN:
                    break
                frames = recv_frames(sock)
        now = time.monotonic()
        core = self._core
        if core.resends:
            for frames in core.take_resends():
                try:
                    self._send(frames)
                except BrokerUnreachable as e:
                    st = core.fail(frames[2], e.code, e.message)
                    if st is not None:
                        self._send_cancel(frames[2])
        if core.streams and now - self._last_send >= self.heartbeat_interval:
            self._send(core.heartbeat_frames(now), quiet=True)
        if core.broker_silent(now, self.expiry):
            for rid, _ in core.fail_all(self._silent_error()):
                self._send_cancel(rid)  # delivered if the broker was only slow

    def _open(self, rid: bytes, frames: list[bytes]) -> StreamState:
        st = self._core.streams[rid]
        try:
            self._send(frames)
        except BrokerUnreachable:
            self._core.forget(rid)
            raise
        self._core.mark_sent(rid, time.monotonic())
        return st

    def stream(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool | None = None,
        resume: bool | None = None,
        **params: Any,
    ) -> Stream:
        """``resume=False``: a worker lost mid-stream ends it with
        ``WorkerLost`` instead of continuing it on another worker."""
        args = (max_tokens, temperature, top_p, top_k, stop, seed, ignore_eos)
        rid, frames = self._core.request_frames(model, prompt, messages, args, params, resume)
        return Stream(self, rid, self._open(rid, frames))

    def generate(self, model: str, prompt: str | None = None, **kwargs: Any) -> Completion:
        acc = Accumulator()
        with self.stream(model, prompt, **kwargs) as s:
            for d in s:
                acc.add(d)
        return acc.result()

    def _final(self, rid: bytes, frames: list[bytes]) -> Delta:
        with Stream(self, rid, self._open(rid, frames)) as s:
            return next(s)

    def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """One unit vector per text."""
        return self.embed_with_usage(model, texts).embeddings

    def embed_with_usage(self, model: str, texts: list[str]) -> Embeddings:
        """The vectors and the usage (``prompt_tokens``) the worker reported."""
        rid, frames = self._core.embed_frames(model, texts)
        with Stream(self, rid, self._open(rid, frames)) as s:
            return Embeddings.from_deltas(list(s))

    def models(self) -> list[str]:
        return list(self._final(*self._core.query_frames(p.SERVICE_MODELS)).result)

    def status(self) -> dict[str, Any]:
        return dict(self._final(*self._core.query_frames(p.SERVICE_STATUS)).result)

    def close(self) -> None:
        if self._closed:
            return
        for rid, st in list(self._core.streams.items()):
            if st.last:
                self._send_cancel(rid)
        self._core.fail_all(Cancelled("client closed"))
        self._closed = True
        self._flush_backlog()
        _close(self._sock, self._last_send > 0)
        if self._watch is not None:
            self._watch.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------- async


class AsyncStream:
    """An async iterator of ``Delta`` for one request; the request goes out on
    first iteration (or on ``async with``)."""

    def __init__(self, client: AsyncClient, rid: bytes, frames: list[bytes]) -> None:
        self._client = client
        self._rid = rid
        self._frames: list[bytes] | None = frames
        self._state = client._core.streams[rid]
        self._finished = False

    async def start(self) -> None:
        if self._frames is not None:
            frames, self._frames = self._frames, None
            await self._client._open(self._rid, frames)

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        if self._finished:
            raise StopAsyncIteration
        records = self._state.records
        if not records:
            await self._wait()
        rec = records.popleft()
        if rec[3] is None and rec[4] is None:  # a partial record: the hot path
            return Delta(rec[1], rec[2])
        self._finished = rec[3] is not None
        return to_delta(rec)

    async def _wait(self) -> None:
        """Until a record is there (sending the request first if not yet sent)."""
        if self._frames is not None:
            await self.start()
        st = self._state
        while not st.records:
            fut = self._client._loop.create_future()
            st.waiter = fut  # the reader resolves and clears it
            try:
                await fut
            finally:
                st.waiter = None

    async def next_batch(self) -> list[Delta]:
        """Every delta received so far and not yet read (waiting for at least
        one), in order; ``[]`` once the stream has ended. An error record
        raises its exception, after the deltas before it have been returned."""
        if self._finished:
            return []
        records = self._state.records
        if not records:
            await self._wait()
        out: list[Delta] = []
        while records:
            if out and records[0][3] in (p.FINISH_ERROR, p.FINISH_CANCELLED):
                break  # deliver what came before; the next call raises
            try:
                d = to_delta(records.popleft())
            except ZServeError:
                self._finished = True
                raise
            out.append(d)
            if d.finish_reason is not None:
                self._finished = True
                break
        return out

    async def aclose(self) -> None:
        """Stop reading; cancels the request if it is still running."""
        self._cancel()

    def _cancel(self) -> None:
        if not self._finished:
            self._finished = True
            c = self._client
            rid = self._state.rid  # the current attempt's (a resume takes a new id)
            if c._core.forget(rid) and self._frames is None and not c._closed:
                c._send_cancel(rid)

    async def __aenter__(self) -> AsyncStream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._cancel()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._cancel()


class AsyncClient(_Base):
    """asyncio client: ``async with AsyncClient(address) as c: ...``.

    Many concurrent streams share one socket. Records are routed from the
    loop's reader callback (no task per message); one ticker task heartbeats,
    times out silent requests and notices a silent broker.
    """

    def __init__(
        self,
        address: str = p.DEFAULT_FRONTEND,
        *,
        timeout: float = 60.0,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        connect_timeout: float = 5.0,
        curve_secret: KeySource | None = None,
        curve_server: KeySource | None = None,
        max_resumes: int = MAX_RESUMES,
    ) -> None:
        super().__init__(
            address, timeout, heartbeat_interval, heartbeat_liveness, connect_timeout, max_resumes
        )
        curve = ClientCurve.load(curve_secret, curve_server)  # as on Client
        self._raw, self._watch = _dealer(zmq.Context.instance(), address, curve)
        self._sock: LoopSocket | None = None  # bound to the loop on first use
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _loop_sock(self) -> LoopSocket:
        if self._sock is None:
            if self._closed:
                raise Cancelled("client closed")
            self._loop = asyncio.get_running_loop()
            self._sock = LoopSocket(self._raw, self._on_message, self._loop, READ_BATCH)
            self._ticker = asyncio.create_task(self._tick())
        return self._sock

    async def _send(self, frames: list[bytes]) -> None:
        sock = self._loop_sock()
        drained = sock.send(frames)
        if drained is not None:
            try:
                await asyncio.wait_for(asyncio.shield(drained), self.connect_timeout)
            except TimeoutError:
                sock.unsend(frames)
                raise self._unreachable() from None
        self._last_send = time.monotonic()

    def _send_nowait(self, frames: list[bytes]) -> None:
        """Best effort (heartbeats): dropped if the pipe has no room."""
        if self._sock is not None:
            self._sock.send_now(frames)

    def _send_cancel(self, rid: bytes) -> None:
        """Never dropped: queued behind anything not yet sent (the REQUEST
        it names, if that still waits) and sent when there is room."""
        if self._sock is not None and not self._sock.closed:
            self._sock.send(self._core.cancel_frames(rid))

    async def _open(self, rid: bytes, frames: list[bytes]) -> None:
        # its timeout, and the broker's liveness if nothing else was in
        # flight, count from here
        self._core.mark_sent(rid, time.monotonic())
        try:
            await self._send(frames)
        except BrokerUnreachable:
            self._core.forget(rid)
            raise

    def _on_message(self, frames: list[bytes]) -> None:
        core = self._core
        try:
            core.on_message(frames, time.monotonic())
        except (ValueError, TypeError):
            return  # malformed: ignore
        if core.resends and self._sock is not None:
            for f in core.take_resends():
                self._sock.send(f)  # queued if there is no room: never dropped

    async def _tick(self) -> None:
        core = self._core
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            now = time.monotonic()
            if not core.streams:
                continue
            self._send_nowait(core.heartbeat_frames(now))
            if core.broker_silent(now, self.expiry):
                ended = core.fail_all(self._silent_error())
                for rid, st in ended:
                    if st.last:
                        self._send_cancel(rid)  # delivered if the broker was only slow
                self._wake([st for _, st in ended])
                continue
            stale = now - self.timeout
            late = [rid for rid, st in core.streams.items() if 0.0 < st.last < stale]
            for rid in late:
                st = core.fail(rid, "timeout", f"no reply in {self.timeout} s")
                if st is not None:
                    self._send_cancel(rid)
                    self._wake([st])

    @staticmethod
    def _wake(states: list[StreamState]) -> None:
        for st in states:
            if st.waiter is not None:
                wake(st)

    def stream(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        ignore_eos: bool | None = None,
        resume: bool | None = None,
        **params: Any,
    ) -> AsyncStream:
        """``resume=False``: a worker lost mid-stream ends it with
        ``WorkerLost`` instead of continuing it on another worker."""
        args = (max_tokens, temperature, top_p, top_k, stop, seed, ignore_eos)
        rid, frames = self._core.request_frames(model, prompt, messages, args, params, resume)
        return AsyncStream(self, rid, frames)

    async def generate(self, model: str, prompt: str | None = None, **kwargs: Any) -> Completion:
        acc = Accumulator()
        async with self.stream(model, prompt, **kwargs) as s:
            async for d in s:
                acc.add(d)
        return acc.result()

    async def _final(self, rid: bytes, frames: list[bytes]) -> Delta:
        async with AsyncStream(self, rid, frames) as s:
            return await s.__anext__()

    async def embed(self, model: str, texts: list[str]) -> list[list[float]]:
        """One unit vector per text."""
        return (await self.embed_with_usage(model, texts)).embeddings

    async def embed_with_usage(self, model: str, texts: list[str]) -> Embeddings:
        """The vectors and the usage (``prompt_tokens``) the worker reported."""
        rid, frames = self._core.embed_frames(model, texts)
        async with AsyncStream(self, rid, frames) as s:
            return Embeddings.from_deltas([d async for d in s])

    async def models(self) -> list[str]:
        return list((await self._final(*self._core.query_frames(p.SERVICE_MODELS))).result)

    async def status(self) -> dict[str, Any]:
        return dict((await self._final(*self._core.query_frames(p.SERVICE_STATUS))).result)

    async def aclose(self) -> None:
        if self._closed:
            return
        for rid, st in list(self._core.streams.items()):
            if st.last:
                self._send_cancel(rid)
        self._wake([st for _, st in self._core.fail_all(Cancelled("client closed"))])
        self._closed = True
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._sock is not None:
            self._sock.close(CLOSE_LINGER_MS)
        else:
            self._raw.close(0)
        if self._watch is not None:
            self._watch.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
