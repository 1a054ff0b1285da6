"""The Python client: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Socket role: one DEALER per broker, connected to the broker's frontend
ROUTER (``ZMQ_IMMEDIATE``, so a broker that is not there is an error, not a
silent queue). Many requests share the socket; each has a request id and
ends with exactly one final record. While requests are in flight the client
heartbeats and expects the broker's heartbeats back.

Several brokers (``Client("tcp://a:5555,tcp://b:5555")`` or a list): new
requests go to this client's primary broker (``primary=``, an index; by
default picked at random, so clients spread) while it lives, else to the
next live one. A broker silent for interval x liveness is skipped, and
probed every interval until it answers;
its streams continue through another broker by exact resumption (the
prompt plus the ids received), so the caller sees one unbroken stream. With
one broker, or none left, they end with ``BrokerUnreachable``.

Closing a stream early (``close``/``aclose``, leaving its ``with`` block, or
dropping it) cancels its request on the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
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
from zserve._loopsock import LockedLoopSocket, recv_frames, send_frames
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

# ZeroMQ reconnects a broken connection after this (its default, set here
# because the client counts on it), and the client looks for ended
# connections at least every LINK_CHECK seconds while it routes messages: so
# it always learns of the old connection's end before it routes anything
# that came through the new one (see ``_Base._due_link_check``).
RECONNECT_IVL_MS = 100
LINK_CHECK = RECONNECT_IVL_MS / 4000


def _close(sock: zmq.Socket, sent: bool) -> None:
    sock.close(CLOSE_LINGER_MS if sent else 0)


def broker_addresses(address: str | Sequence[str]) -> list[str]:
    """One address, a comma-separated list, or a sequence of them."""
    items = [address] if isinstance(address, str) else list(address)
    out = [a.strip() for item in items for a in item.split(",") if a.strip()]
    if not out:
        raise ValueError("no broker address given")
    return out


def _probe(core: ClientCore) -> list[bytes]:
    """A QUERY for a broker thought dead: any answer shows it lives again
    (its id, unknown to the core, makes the answer itself ignored)."""
    return [p.CLIENT, p.C_QUERY, b"~" + core.next_id(), p.SERVICE_MODELS]


def _dealer(
    ctx: zmq.Context, address: str, routing_id: bytes, curve: ClientCurve | None = None
) -> tuple[zmq.Socket, HandshakeWatch | None, HandshakeWatch]:
    """A DEALER to one broker, its CURVE handshake watch (None without
    CURVE), and the monitor that counts its connections that ended."""
    s = ctx.socket(zmq.DEALER)
    # One routing id on every connection: after a TCP reset, ZeroMQ's
    # reconnection is the same peer to the broker, not a new one.
    s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.setsockopt(zmq.IMMEDIATE, 1)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 0)  # the broker bounds what it sends us
    s.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
    # CURVE: with ZMQ_IMMEDIATE a refused handshake means sends block, so
    # the watch is what tells "refused" from "not there". One monitor per
    # socket: the same one counts the connections that end (a reset may
    # have lost what was on the wire, both ways).
    if curve is not None:
        watch = mon = curve.apply(s, zmq.EVENT_DISCONNECTED)
    else:
        watch, mon = None, HandshakeWatch(s, zmq.EVENT_DISCONNECTED)
    s.connect(address)
    return s, watch, mon


def _keepalive(ref: weakref.ref[_Base], period: float, stop: threading.Event) -> None:
    """A client's heartbeat thread: it speaks for the client while the
    caller (a slow reader) or the event loop (stalled) is away, so that the
    broker does not take it for gone. It holds the client weakly."""
    while not stop.wait(period):
        c = ref()
        if c is None:
            return
        c._keepalive(time.monotonic())
        del c


class _Base:
    def __init__(
        self,
        address: str | Sequence[str],
        timeout: float,
        heartbeat_interval: float,
        heartbeat_liveness: int,
        connect_timeout: float,
        max_resumes: int = MAX_RESUMES,
        primary: int | None = None,
        curve_secret: KeySource | None = None,
        curve_server: KeySource | None = None,
    ) -> None:
        self.addresses = broker_addresses(address)
        self.address = ",".join(self.addresses)
        self.timeout = timeout  # seconds without progress before Timeout
        self.heartbeat_interval = heartbeat_interval
        self.expiry = heartbeat_interval * heartbeat_liveness
        self.connect_timeout = connect_timeout
        n = len(self.addresses)
        if primary is None:
            primary = random.randrange(n)  # clients spread over the brokers
        elif not 0 <= primary < n:
            raise ValueError(f"primary must index one of the {n} brokers")
        self._core = ClientCore(heartbeat_interval, max_resumes, n, primary)
        self._last_send = 0.0
        self._sent_at = [0.0] * n  # last send, per broker
        self._closed = False
        self._last_probe = 0.0
        # One DEALER per broker, all with this client's routing id. CURVE:
        # our .key_secret file and the broker's .key file (or z85 keys); the
        # watch tells a refused handshake apart.
        curve = ClientCurve.load(curve_secret, curve_server)
        ctx = zmq.Context.instance()
        self.routing_id = p.new_client_id()
        self._dealers: list[zmq.Socket] = []
        self._watches: list[HandshakeWatch | None] = []  # CURVE handshakes, per broker
        self._monitors: list[HandshakeWatch] = []  # connections ended, per broker
        for a in self.addresses:
            sock, watch, mon = _dealer(ctx, a, self.routing_id, curve)
            self._dealers.append(sock)
            self._watches.append(watch)
            self._monitors.append(mon)
        self._mon_socks = [m.socket for m in self._monitors]
        self._link_checked = 0.0  # monotonic time the monitors were last looked at
        self._keepalive_stop = threading.Event()
        self._keepalive_thread: threading.Thread | None = None

    def _start_keepalive(self) -> None:
        if self._keepalive_thread is None:
            t = self._keepalive_thread = threading.Thread(
                target=_keepalive,
                args=(weakref.ref(self), self.heartbeat_interval / 4, self._keepalive_stop),
                name="zserve-client-heartbeat",
                daemon=True,
            )
            t.start()

    def _keepalive(self, now: float) -> None:
        raise NotImplementedError

    def _due_link_check(self, now: float) -> None:
        """Called before routing a message (and on each turn of the client's
        loop): at most every LINK_CHECK seconds, see whether a connection to
        a broker ended. A monitor's news reaches us within a moment, and a
        reconnection takes RECONNECT_IVL_MS, four LINK_CHECKs: so no message
        of a new connection is routed before the old one's end is handled
        (a look at ZMQ_EVENTS costs a system call: not one per message)."""
        if now - self._link_checked >= LINK_CHECK:
            self._link_checked = now
            for mon in self._mon_socks:
                if _get(mon, _EVENTS) & _POLLIN:
                    self._check_links()
                    return

    def _check_links(self) -> None:
        raise NotImplementedError

    def _links_reset(self) -> list[int]:
        """The brokers whose connection ended since we last looked."""
        return [i for i, m in enumerate(self._monitors) if m.take_disconnects()]

    def _close_monitors(self) -> None:
        self._keepalive_stop.set()
        for mon in self._monitors:
            mon.close()

    def _links_to_try(self) -> list[int]:
        """The broker for a new request first, then the others."""
        first = self._core.choose_link()
        n = len(self.addresses)
        return [first] + [i for i in range(n) if i != first]

    @property
    def resumes(self) -> int:
        """Streams continued on another worker after theirs died, so far."""
        return self._core.resumes

    @property
    def handovers(self) -> int:
        """Streams moved on purpose so far: handed over by a draining worker,
        or away from a broker that said goodbye (it was stopping)."""
        return self._core.handovers

    def watch_moves(self, callback: Callable[[float], None] | None) -> None:
        """Call ``callback(seconds)`` for every stream that moves (resumed,
        handed over, or away from a broker lost or stopping): the seconds
        from the move to its next token (the gateway's metrics)."""
        self._core.on_stall = callback

    def _unreachable(self, link: int = 0) -> BrokerUnreachable:
        """Nothing could be sent within ``connect_timeout``."""
        address = self.addresses[link]
        watch = self._watches[link] if link < len(self._watches) else None
        if watch is not None:
            return BrokerUnreachable(watch.explain(address))
        return BrokerUnreachable(f"no broker at {address}")

    def _silent_error(self, link: int = 0) -> BrokerUnreachable:
        return BrokerUnreachable(
            f"broker at {self.addresses[link]} went silent for {self.expiry:g} s"
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
            # (a quarter interval: a silent broker is noticed soon after expiry)
            c._pump(min(remaining, c.heartbeat_interval / 4))
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
            st = self._state  # the current attempt's id and broker (a resume moves them)
            rid = st.rid
            if self._client._core.forget(rid) and not self._client._closed:
                self._client._send_cancel(rid, st.link)

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
        address: str | Sequence[str] = p.DEFAULT_FRONTEND,
        *,
        timeout: float = 60.0,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        connect_timeout: float = 5.0,
        curve_secret: KeySource | None = None,
        curve_server: KeySource | None = None,
        max_resumes: int = MAX_RESUMES,
        primary: int | None = None,
    ) -> None:
        super().__init__(
            address, timeout, heartbeat_interval, heartbeat_liveness, connect_timeout,
            max_resumes, primary, curve_secret, curve_server,
        )  # fmt: skip
        self._socks = self._dealers
        self._sock = self._socks[0]  # the one socket of a one-broker client
        self._poller: zmq.Poller | None = None
        if len(self._socks) > 1:
            self._poller = zmq.Poller()
            for sock in self._socks:
                self._poller.register(sock, zmq.POLLIN)
        self._rcvtimeos = [-1] * len(self._socks)  # ZMQ_RCVTIMEO as last set, per socket
        # CANCELs that found the pipe full, per broker: sent before anything
        # else, so a cancel is never lost while the request it names can run.
        self._backlogs: list[deque[list[bytes]]] = [deque() for _ in self._socks]
        # Held by whichever thread uses the sockets or the core: the caller's
        # (in every call into the client), or the heartbeat thread (only
        # when it gets it at once: a caller inside the client heartbeats).
        self._lock = threading.RLock()

    def _keepalive(self, now: float) -> None:
        """The heartbeat thread's turn: while the caller is away (a slow
        reader), heartbeat each broker with requests in flight."""
        if not self._lock.acquire(blocking=False):
            return  # the caller is in the client, which heartbeats as it reads
        try:
            if self._closed:
                return
            core = self._core
            for link, lk in enumerate(core.links):
                if lk.in_flight and now - self._sent_at[link] >= self.heartbeat_interval:
                    self._send(core.HEARTBEAT, quiet=True, link=link)
        finally:
            self._lock.release()

    def _flush_backlog(self, link: int = 0) -> bool:
        """Send what waits; True once nothing does."""
        backlog = self._backlogs[link]
        if not backlog:
            return True
        sock = self._socks[link]
        while backlog:
            try:
                send_frames(sock, backlog[0])
            except zmq.Again:
                return False
            backlog.popleft()
            self._sent_at[link] = time.monotonic()
        return True

    def _send(self, frames: list[bytes], quiet: bool = False, link: int = 0) -> None:
        """Send, waiting up to ``connect_timeout`` for room; ``quiet``: a
        heartbeat, dropped if there is no room at once."""
        sock = self._socks[link]
        if not self._flush_backlog(link):
            if quiet:
                return
            deadline = time.monotonic() + self.connect_timeout
            while not self._flush_backlog(link):
                left = deadline - time.monotonic()
                if left <= 0 or not sock.poll(left * 1000, zmq.POLLOUT):
                    raise self._unreachable(link)
        try:
            send_frames(sock, frames)
        except zmq.Again:
            if quiet or not sock.poll(self.connect_timeout * 1000, zmq.POLLOUT):
                if quiet:
                    return
                raise self._unreachable(link) from None
            send_frames(sock, frames)
        self._last_send = self._sent_at[link] = time.monotonic()

    def _send_cancel(self, rid: bytes, link: int = 0) -> None:
        """A CANCEL goes out now or, if the pipe is full, before the next send."""
        frames = self._core.cancel_frames(rid)
        with self._lock:
            if not self._flush_backlog(link):
                self._backlogs[link].append(frames)
                return
            try:
                send_frames(self._socks[link], frames)
            except zmq.Again:
                self._backlogs[link].append(frames)

    def _read(self, timeout: float) -> None:
        """Wait up to ``timeout`` for broker messages and route them."""
        links = self._core.links
        if self._poller is None:
            self._read_one(0, timeout)
            return
        busy = [i for i, lk in enumerate(links) if lk.in_flight]
        if len(busy) == 1:
            # The usual case: everything in flight is on one broker (the
            # primary). Wait on it alone, as with one broker; whatever the
            # others sent meanwhile (probe answers) is read without waiting.
            self._read_one(busy[0], timeout)
            for link in range(len(links)):
                if link != busy[0]:
                    self._read_ready(link, time.monotonic())
            return
        ready = dict(self._poller.poll(max(0, int(timeout * 1000))))
        now = time.monotonic()
        for link, sock in enumerate(self._socks):
            if sock in ready:
                self._read_ready(link, now)

    def _read_one(self, link: int, timeout: float) -> None:
        """One broker's socket: a blocking receive with ZMQ_RCVTIMEO (set only
        when it changes) costs less than a poll then a receive; then whatever
        else waits is read without blocking."""
        sock = self._socks[link]
        ms = max(0, int(timeout * 1000))
        if ms != self._rcvtimeos[link]:
            _set(sock, _RCVTIMEO, ms)
            self._rcvtimeos[link] = ms
        try:
            frames = recv_frames(sock, 0)  # blocks up to RCVTIMEO
        except zmq.Again:
            return
        now = time.monotonic()
        self._due_link_check(now)
        try:
            self._core.on_message(frames, now, link)
        except (ValueError, TypeError):
            pass  # malformed: ignore
        self._read_ready(link, now)

    def _read_ready(self, link: int, now: float) -> None:
        """Route what already waits on one broker's socket (checking
        ZMQ_EVENTS rather than provoking zmq.Again)."""
        sock = self._socks[link]
        core = self._core
        while _get(sock, _EVENTS) & _POLLIN:
            frames = recv_frames(sock)
            now = time.monotonic()
            self._due_link_check(now)
            try:
                core.on_message(frames, now, link)
            except (ValueError, TypeError):
                pass  # malformed: ignore

    def _check_links(self) -> None:
        """Before routing anything more: did a connection to a broker end?
        What was on the wire may be lost both ways, so its streams go again
        from what they received (ZeroMQ reconnects by itself; a broker that
        stays silent moves them on as usual). Checked before each message is
        routed: a reconnection takes ZeroMQ's reconnect interval (0.1 s), so
        the news of the old connection's end is always there first."""
        core = self._core
        for link in self._links_reset():
            # What came before the end is routed first (a GOODBYE, tokens).
            self._read_ready(link, time.monotonic())
            ended, left = core.link_reset(link, time.monotonic())
            for rid in left:
                self._send_cancel(rid, link)  # it may still run there
            self._resend()

    def _pump(self, timeout: float) -> None:
        """Wait up to ``timeout`` for broker messages and route them; then
        send what is owed (continuations, heartbeats, probes) and judge the
        brokers' silence."""
        with self._lock:
            self._pump_locked(timeout)

    def _pump_locked(self, timeout: float) -> None:
        for link, backlog in enumerate(self._backlogs):
            if backlog:
                self._flush_backlog(link)
        self._read(timeout)
        now = time.monotonic()
        self._due_link_check(now)
        core = self._core
        for link, lk in enumerate(core.links):
            if lk.in_flight and now - self._sent_at[link] >= self.heartbeat_interval:
                self._send(core.heartbeat_frames(now, link), quiet=True, link=link)
        silent = core.silent_links(now, self.expiry)
        if silent:
            # This thread may not have run for a while (a loaded machine):
            # what the broker sent meanwhile is read before its silence is
            # judged, as the asyncio client does.
            for link in silent:
                self._read_ready(link, now)
            silent = core.silent_links(now, self.expiry)
        for link in silent:
            ended, left = core.broker_lost(link, self._silent_error(link), now)
            for rid in left:
                self._send_cancel(rid, link)  # delivered if the broker was only slow
        self._resend()
        if now - self._last_probe >= self.heartbeat_interval:
            self._last_probe = now
            for link, lk in enumerate(core.links):
                if not lk.alive:
                    self._send(_probe(core), quiet=True, link=link)

    def _resend(self) -> None:
        """Send the continuations the core queued (worker, broker or link
        lost), behind what already waits for that broker: never dropped, and
        never waited on here (a broker that stays silent moves them on)."""
        for link, frames in self._core.take_resends():
            self._backlogs[link].append(frames)
            self._flush_backlog(link)

    def _open(self, rid: bytes, frames: list[bytes]) -> StreamState:
        with self._lock:
            self._start_keepalive()
            # a connection that ended while we were idle (a broker stopped):
            # its broker is passed over until it answers again
            self._due_link_check(time.monotonic())
            st = self._core.streams[rid]
            err: BrokerUnreachable | None = None
            for link in self._links_to_try():
                try:
                    self._send(frames, link=link)
                except BrokerUnreachable as e:
                    err = err or e
                    self._core.links[link].alive = False  # probed until it answers
                    continue
                self._core.mark_sent(rid, time.monotonic(), link)
                return st
            self._core.forget(rid)
            assert err is not None
            raise err

    def stream(
        self,
        model: str,
        prompt: str | list[int] | None = None,
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
        session_id: str | None = None,
        tenant: str | None = None,
        **params: Any,
    ) -> Stream:
        """``resume=False``: a worker lost mid-stream ends it with
        ``WorkerLost`` instead of continuing it on another worker.
        ``session_id``: a conversation's key; a ``cache_aware`` broker keeps
        the requests that share it on one worker while its load allows (the
        prompt's prefix hashes are sent with every request regardless).
        ``tenant``: run it as this tenant, for a caller this client (a
        gateway) authenticated; honoured only from a trusted gateway's key."""
        args = (max_tokens, temperature, top_p, top_k, stop, seed, ignore_eos)
        rid, frames = self._core.request_frames(
            model, prompt, messages, args, params, resume, session_id, tenant
        )
        return Stream(self, rid, self._open(rid, frames))

    def generate(
        self,
        model: str,
        prompt: str | list[int] | None = None,
        *,
        session_id: str | None = None,
        **kwargs: Any,
    ) -> Completion:
        acc = Accumulator()
        with self.stream(model, prompt, session_id=session_id, **kwargs) as s:
            for d in s:
                acc.add(d)
        return acc.result()

    def _final(self, rid: bytes, frames: list[bytes]) -> Delta:
        with Stream(self, rid, self._open(rid, frames)) as s:
            return next(s)

    def embed(self, model: str, texts: list[str], tenant: str | None = None) -> list[list[float]]:
        """One unit vector per text (``tenant``: as ``stream`` takes it)."""
        return self.embed_with_usage(model, texts, tenant).embeddings

    def embed_with_usage(
        self, model: str, texts: list[str], tenant: str | None = None
    ) -> Embeddings:
        """The vectors and the usage (``prompt_tokens``) the worker reported."""
        rid, frames = self._core.embed_frames(model, texts, tenant)
        with Stream(self, rid, self._open(rid, frames)) as s:
            return Embeddings.from_deltas(list(s))

    def models(self) -> list[str]:
        return list(self._final(*self._core.query_frames(p.SERVICE_MODELS)).result)

    def status(self) -> dict[str, Any]:
        return dict(self._final(*self._core.query_frames(p.SERVICE_STATUS)).result)

    def query(self, service: bytes, *args: bytes) -> Any:
        """A broker service's answer (``protocol.SERVICES``; ``args``: the
        store services' key and value)."""
        return self._final(*self._core.query_frames(service, *args)).result

    def tokenize(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        tenant: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """``{tokens, count, max_model_len, token_strs?}`` from a worker that
        serves ``model``, as it would tokenize the prompt (or the messages,
        chat template and ``tools`` included); ``options``:
        ``add_special_tokens``, ``add_generation_prompt``, ``tools``,
        ``return_token_strs``. ``tenant``: as ``stream`` takes it."""
        rid, frames = self._core.tokenize_frames(model, prompt, messages, options, tenant)
        return dict(self._final(rid, frames).result)

    def detokenize(self, model: str, ids: list[int], tenant: str | None = None) -> str:
        """The text of token ids (special tokens included), from a worker."""
        d = self._final(*self._core.detokenize_frames(model, ids, tenant))
        return str(d.result["prompt"])

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for rid, st in list(self._core.streams.items()):
                if st.last:
                    self._send_cancel(rid, st.link)
            self._core.fail_all(Cancelled("client closed"))
            self._closed = True
            self._close_monitors()  # (before the sockets: see HandshakeWatch.close)
            for link, sock in enumerate(self._socks):
                self._flush_backlog(link)
                _close(sock, self._sent_at[link] > 0)

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
            st = self._state  # the current attempt's id and broker (a resume moves them)
            rid = st.rid
            if c._core.forget(rid) and self._frames is None and not c._closed:
                c._send_cancel(rid, st.link)

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
        address: str | Sequence[str] = p.DEFAULT_FRONTEND,
        *,
        timeout: float = 60.0,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        connect_timeout: float = 5.0,
        curve_secret: KeySource | None = None,
        curve_server: KeySource | None = None,
        max_resumes: int = MAX_RESUMES,
        primary: int | None = None,
    ) -> None:
        super().__init__(
            address, timeout, heartbeat_interval, heartbeat_liveness, connect_timeout,
            max_resumes, primary, curve_secret, curve_server,
        )  # fmt: skip
        self._raws = self._dealers
        # Bound to the loop on first use. Locked: the heartbeat thread sends
        # on them too while the loop is stalled (see _keepalive).
        self._socks: list[LockedLoopSocket] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _loop_socks(self) -> list[LockedLoopSocket]:
        if self._socks is None:
            if self._closed:
                raise Cancelled("client closed")
            loop = self._loop = asyncio.get_running_loop()
            self._socks = [
                LockedLoopSocket(raw, self._reader(link), loop, READ_BATCH)
                for link, raw in enumerate(self._raws)
            ]
            for mon in self._mon_socks:
                loop.add_reader(mon.getsockopt(zmq.FD), self._check_links)
            self._ticker = asyncio.create_task(self._tick())
            self._start_keepalive()
        return self._socks

    def _keepalive(self, now: float) -> None:
        """The heartbeat thread's turn: heartbeat a broker that has heard
        nothing from us for longer than the ticker's beat (the loop is
        stalled: a long callback, a blocking call, a busy gateway)."""
        socks = self._socks
        if socks is None or self._closed:
            return
        late = self.heartbeat_interval * 1.5
        for link, lk in enumerate(self._core.links):
            if lk.in_flight and now - self._sent_at[link] >= late:
                if socks[link].send_from_thread(self._core.HEARTBEAT):
                    self._sent_at[link] = now

    def _check_links(self) -> None:
        """Did a connection to a broker end? What was on the wire may be
        lost both ways, so its streams go again from what they received
        (ZeroMQ reconnects by itself; a broker that stays silent moves them
        on as usual). Also checked before each message is routed: a
        reconnection takes ZeroMQ's reconnect interval (0.1 s), so the news
        of the old connection's end is always there first."""
        if self._closed:
            return
        core = self._core
        for link in self._links_reset():
            # What came before the end is routed first (a GOODBYE, tokens).
            if self._socks is not None:
                sock = self._socks[link]
                for _ in range(64):
                    if sock.closed or not _get(sock.sock, _EVENTS) & _POLLIN:
                        break
                    sock.read_now()
            ended, left = core.link_reset(link, time.monotonic())
            for rid in left:
                self._send_cancel(rid, link)  # it may still run there
            self._wake(ended)
            self._resend()

    def _reader(self, link: int) -> Any:
        if link == 0:
            return self._on_message
        return lambda frames: self._on_message(frames, link)

    async def _send(self, frames: list[bytes], link: int = 0) -> None:
        sock = self._loop_socks()[link]
        drained = sock.send(frames)
        if drained is not None:
            try:
                await asyncio.wait_for(asyncio.shield(drained), self.connect_timeout)
            except TimeoutError:
                sock.unsend(frames)
                raise self._unreachable(link) from None
        self._last_send = self._sent_at[link] = time.monotonic()

    def _send_nowait(self, frames: list[bytes], link: int = 0) -> None:
        """Best effort (heartbeats): dropped if the pipe has no room."""
        if self._socks is not None and self._socks[link].send_now(frames):
            self._sent_at[link] = time.monotonic()

    def _send_cancel(self, rid: bytes, link: int = 0) -> None:
        """Never dropped: queued behind anything not yet sent (the REQUEST
        it names, if that still waits) and sent when there is room."""
        if self._socks is not None and not self._socks[link].closed:
            self._socks[link].send(self._core.cancel_frames(rid))

    async def _open(self, rid: bytes, frames: list[bytes]) -> None:
        core = self._core
        err: BrokerUnreachable | None = None
        for link in self._links_to_try():
            # its timeout, and the broker's liveness if nothing else was in
            # flight there, count from here
            core.mark_sent(rid, time.monotonic(), link)
            try:
                await self._send(frames, link)
                return
            except BrokerUnreachable as e:
                err = err or e
                core.unmark_sent(rid)
                core.links[link].alive = False  # probed until it answers
        core.forget(rid)
        assert err is not None
        raise err

    def _on_message(self, frames: list[bytes], link: int = 0) -> None:
        core = self._core
        now = time.monotonic()
        self._due_link_check(now)
        try:
            core.on_message(frames, now, link)
        except (ValueError, TypeError):
            return  # malformed: ignore
        if core.resends:
            self._resend()

    def _resend(self) -> None:
        """Send the continuations the core queued (worker or broker lost):
        queued if there is no room, never dropped."""
        socks = self._socks
        if socks is not None:
            for link, frames in self._core.take_resends():
                socks[link].send(frames)

    async def _tick(self) -> None:
        """Every interval: heartbeats, probes of dead brokers, timeouts. And a
        broker's silence is judged the moment it passes expiry, not at the
        next interval, so a stream moves on within interval x liveness."""
        core = self._core
        interval = self.heartbeat_interval
        beat = time.monotonic()
        while True:
            wake = beat + interval
            for lk in core.links:
                if lk.in_flight:
                    wake = min(wake, lk.heard + self.expiry + 0.001)
            await asyncio.sleep(max(0.0, wake - time.monotonic()))
            if self._socks is not None:
                # After a stalled loop, what the brokers sent meanwhile is
                # read before their silence is judged.
                for link, lk in enumerate(core.links):
                    if lk.in_flight:
                        self._socks[link].read_now()
            now = time.monotonic()
            silent = core.silent_links(now, self.expiry)
            if now < beat + interval:
                if silent:
                    self._lost(silent, now)
                continue
            beat = now
            for link, lk in enumerate(core.links):
                if not lk.alive:
                    self._send_nowait(_probe(core), link)  # any answer: alive again
            if not core.streams:
                continue
            for link, lk in enumerate(core.links):
                if lk.in_flight:
                    self._send_nowait(core.heartbeat_frames(now, link), link)
            if silent:
                self._lost(silent, now)
                continue
            stale = now - self.timeout
            late = [rid for rid, st in core.streams.items() if 0.0 < st.last < stale]
            for rid in late:
                st = core.fail(rid, "timeout", f"no reply in {self.timeout} s")
                if st is not None:
                    self._send_cancel(rid, st.link)
                    self._wake([st])

    def _lost(self, silent: list[int], now: float) -> None:
        """Brokers gone silent: their streams move on (or end)."""
        core = self._core
        for link in silent:
            ended, left = core.broker_lost(link, self._silent_error(link), now)
            for rid in left:
                self._send_cancel(rid, link)  # delivered if the broker was only slow
            self._wake(ended)
        if core.resends:
            self._resend()

    @staticmethod
    def _wake(states: list[StreamState]) -> None:
        for st in states:
            if st.waiter is not None:
                wake(st)

    def stream(
        self,
        model: str,
        prompt: str | list[int] | None = None,
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
        session_id: str | None = None,
        tenant: str | None = None,
        **params: Any,
    ) -> AsyncStream:
        """``resume=False``: a worker lost mid-stream ends it with
        ``WorkerLost`` instead of continuing it on another worker.
        ``session_id``: a conversation's key; a ``cache_aware`` broker keeps
        the requests that share it on one worker while its load allows (the
        prompt's prefix hashes are sent with every request regardless).
        ``tenant``: run it as this tenant, for a caller this client (a
        gateway) authenticated; honoured only from a trusted gateway's key."""
        args = (max_tokens, temperature, top_p, top_k, stop, seed, ignore_eos)
        rid, frames = self._core.request_frames(
            model, prompt, messages, args, params, resume, session_id, tenant
        )
        return AsyncStream(self, rid, frames)

    async def generate(
        self,
        model: str,
        prompt: str | list[int] | None = None,
        *,
        session_id: str | None = None,
        **kwargs: Any,
    ) -> Completion:
        acc = Accumulator()
        async with self.stream(model, prompt, session_id=session_id, **kwargs) as s:
            async for d in s:
                acc.add(d)
        return acc.result()

    async def _final(self, rid: bytes, frames: list[bytes]) -> Delta:
        async with AsyncStream(self, rid, frames) as s:
            return await s.__anext__()

    async def embed(
        self, model: str, texts: list[str], tenant: str | None = None
    ) -> list[list[float]]:
        """One unit vector per text (``tenant``: as ``stream`` takes it)."""
        return (await self.embed_with_usage(model, texts, tenant)).embeddings

    async def embed_with_usage(
        self, model: str, texts: list[str], tenant: str | None = None
    ) -> Embeddings:
        """The vectors and the usage (``prompt_tokens``) the worker reported."""
        rid, frames = self._core.embed_frames(model, texts, tenant)
        async with AsyncStream(self, rid, frames) as s:
            return Embeddings.from_deltas([d async for d in s])

    async def models(self) -> list[str]:
        return list((await self._final(*self._core.query_frames(p.SERVICE_MODELS))).result)

    async def status(self) -> dict[str, Any]:
        return dict((await self._final(*self._core.query_frames(p.SERVICE_STATUS))).result)

    async def query(self, service: bytes, *args: bytes, link: int | None = None) -> Any:
        """A broker service's answer (``protocol.SERVICES``; ``args``: the
        store services' key and value). ``link``: ask that broker (an index
        into ``addresses``), not the one new requests go to."""
        rid, frames = self._core.query_frames(service, *args)
        if link is None:
            return (await self._final(rid, frames)).result
        core = self._core
        core.mark_sent(rid, time.monotonic(), link)
        try:
            await self._send(frames, link)
        except BaseException:
            core.forget(rid)
            raise
        async with AsyncStream(self, rid, None) as s:  # type: ignore[arg-type]  # sent
            return (await s.__anext__()).result

    def tell(self, service: bytes, *args: bytes, link: int = 0, within: float = 0.0) -> bool:
        """Send broker ``link`` a QUERY that wants no answer (an empty request
        id: a store write). Queued behind what waits for that broker while
        it is alive; while it is taken for dead, sent only if there is room
        at once. False: dropped. ``within`` (seconds): it may wait that long
        to leave with the next message to that broker (``send_later``), in
        order with everything sent meanwhile."""
        frames = [p.CLIENT, p.C_QUERY, b"", service, *args]
        sock = self._loop_socks()[link]
        if not self._core.links[link].alive:
            return sock.send_now(frames)
        if within > 0:
            sock.send_later(frames, within)
            return True
        sock.send(frames)
        self._sent_at[link] = time.monotonic()
        return True

    async def tokenize(
        self,
        model: str,
        prompt: str | None = None,
        *,
        messages: list[dict[str, Any]] | None = None,
        tenant: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """As ``Client.tokenize``."""
        rid, frames = self._core.tokenize_frames(model, prompt, messages, options, tenant)
        return dict((await self._final(rid, frames)).result)

    async def detokenize(self, model: str, ids: list[int], tenant: str | None = None) -> str:
        """As ``Client.detokenize``."""
        d = await self._final(*self._core.detokenize_frames(model, ids, tenant))
        return str(d.result["prompt"])

    async def aclose(self) -> None:
        if self._closed:
            return
        for rid, st in list(self._core.streams.items()):
            if st.last:
                self._send_cancel(rid, st.link)
        self._wake([st for _, st in self._core.fail_all(Cancelled("client closed"))])
        self._closed = True
        self._keepalive_stop.set()
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._socks is not None:
            assert self._loop is not None
            for mon in self._mon_socks:
                self._loop.remove_reader(mon.getsockopt(zmq.FD))
        self._close_monitors()  # (before the sockets: see HandshakeWatch.close)
        if self._socks is not None:
            for sock in self._socks:
                sock.close(CLOSE_LINGER_MS)
        else:
            for raw in self._raws:
                raw.close(0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
