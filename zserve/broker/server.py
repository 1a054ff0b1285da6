"""The broker: a ROUTER frontend for clients, a ROUTER backend for workers.

Socket roles: the broker binds both; clients and workers connect as DEALERs.
The main loop always runs in the same order: poll until the next heartbeat
deadline, handle what arrived, dispatch queued requests, purge the expired,
send heartbeats.

The broker reads routing frames only; request bodies and token payloads pass
through undecoded (the small TOKENS header says which requests started and
finished). Both ROUTERs run with ROUTER_MANDATORY so a message to a vanished
or full peer raises instead of vanishing: a token frame is never dropped
silently.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import random
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from zserve import protocol as p
from zserve._loopsock import recv_frames, send_frames
from zserve.broker.admission import Admission
from zserve.broker.dispatch import (
    CACHE_MAP_SIZE,
    CACHE_THRESHOLD_ABS,
    CACHE_THRESHOLD_REL,
    SESSION_BALANCE,
    CacheAware,
    make_policy,
)
from zserve.broker.registry import Registry, RequestKey, WorkerState
from zserve.broker.store import DEFAULT_MAX_BYTES as STORE_MAX_BYTES
from zserve.broker.store import DEFAULT_MAX_COUNT as STORE_MAX_COUNT
from zserve.broker.store import DEFAULT_WAIT_S as STORE_WAIT_S
from zserve.broker.store import WAITING, BoundedStore
from zserve.broker.tenants import Rejection
from zserve.protocol import WorkerInfo
from zserve.security import DOMAIN_CLIENTS, DOMAIN_WORKERS, BrokerAuth

log = logging.getLogger(__name__)

DRAIN_BATCH = 256  # messages read from one socket before looking at the other
# After GOODBYE, how long closing sockets may go on delivering it (ms).
GOODBYE_LINGER_MS = 1000
# After GOODBYE, how long the connections stay up at least (s): clients
# set ZMQ_IMMEDIATE, under which ZeroMQ drops what a connection had delivered
# but the client had not yet read when it ends, so the news must be read
# while the connection lives (a streaming client reads within milliseconds).
GOODBYE_GRACE_S = 0.2
# After GOODBYE the broker is *leaving*: it answers status queries (state
# ``leaving``) and sends every new request elsewhere until each client it
# told has said DISCONNECT (it moved its streams), and at most this long.
LEAVE_TIMEOUT_S = 2.0
# A finished request listed as quiet in a client's HEARTBEAT within this long
# is not answered "not held": its final is on the way (or was lost, and then
# the client hears so this much later). At most RECENT_MAX are remembered.
RECENT_S = 5.0
RECENT_MAX = 65536
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)


def _expired(q: Any, now: float) -> Any:
    """Take the requests past their queue deadline out of ``q``: from the
    front of a FIFO deque; from anywhere in a FairQueue."""
    if isinstance(q, deque):
        while q and q[0].deadline < now:
            yield q.popleft()
    else:
        yield from q.expired(now)


@dataclass(eq=False)
class PendingRequest:
    client: bytes  # client routing id
    request_id: bytes  # the client's id for it
    model: str
    body: bytes  # msgpack, forwarded as is
    deadline: float  # queue timeout (monotonic)
    worker: WorkerState | None = None  # where it runs, None while queued
    started: bool = False  # a token has been sent to the client
    attempts: int = 0  # dispatches so far
    cancelled: bool = False  # the client asked to cancel (or vanished)
    # Routing keys (cache_aware dispatch only): a session key, and the
    # prompt's prefix hashes.
    session: bytes | None = None
    chain: list[bytes] | None = None
    # Tenants (--tenants only): its tenant (tenants.TenantState), what it
    # holds from it (tenants.Reserve), when it first entered a queue.
    tenant: Any = None
    reserve: Any = None
    queued_at: float = 0.0

    @property
    def key(self) -> RequestKey:
        return (self.client, self.request_id)


@dataclass(eq=False)
class ClientState:
    expiry: float  # cancel its requests if silent past it
    # Silence allowed: max(broker interval, the interval the client
    # advertised) x liveness, so a client that heartbeats slower than the
    # broker is not taken for vanished.
    ttl: float
    requests: set[RequestKey] = field(default_factory=set)
    # Requests the broker has already ended with its own final frame
    # (slow client, ...): their later records from the worker are dropped.
    finalized: set[bytes] = field(default_factory=set)
    # Final error records not yet delivered because the client's pipe was
    # full; bounded by the client's request count, retried every tick.
    undelivered: list[list[Any]] = field(default_factory=list)
    # Silent past its expiry once: its requests were ended with
    # ``client_expired`` finals, owed until it speaks or stays silent as long
    # again (then it is forgotten).
    expired: bool = False


@dataclass
class BrokerConfig:
    frontend: str = p.DEFAULT_FRONTEND
    backend: str = p.DEFAULT_BACKEND
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS
    dispatch: str = "shortest_queue"
    max_queue: int = p.MAX_QUEUE  # per model
    queue_timeout: float = p.QUEUE_TIMEOUT
    max_message_size: int = p.MAX_MESSAGE_SIZE
    max_retries: int = p.MAX_RETRIES
    frontend_hwm: int = p.FRONTEND_HWM
    max_inflight_per_client: int = 0  # requests one client may have in flight; 0: no limit
    seed: int | None = None
    # The response store the gateways share (broker/store.py): its bounds.
    store_max_count: int = STORE_MAX_COUNT
    store_max_bytes: int = STORE_MAX_BYTES
    store_wait: float = STORE_WAIT_S  # a read of a missing key waits this long for its write
    # cache_aware dispatch (see broker/dispatch.py CacheAware)
    cache_map_size: int = CACHE_MAP_SIZE
    cache_threshold_abs: float = CACHE_THRESHOLD_ABS
    cache_threshold_rel: float = CACHE_THRESHOLD_REL
    session_balance: float = SESSION_BALANCE
    # CURVE (all three or none): the broker's .key_secret file, and the
    # directories of public .key files allowed on the backend / frontend.
    curve_secret: str | None = None
    curve_allow_workers: str | None = None
    curve_allow_clients: str | None = None
    # Tenants (broker/admission.py): the tenants file; where this broker
    # reports its usage, and its peer brokers' report endpoints.
    tenants: str | None = None
    peer_bind: str | None = None
    peers: list[str] = field(default_factory=list)

    @property
    def expiry(self) -> float:
        return self.heartbeat_interval * self.heartbeat_liveness


class Broker:
    def __init__(self, config: BrokerConfig, context: zmq.Context | None = None) -> None:
        self.cfg = config
        self.ctx = context or zmq.Context.instance()
        self.registry = Registry(config.expiry)
        self.rng = random.Random(config.seed)
        self.counters: Counter[str] = Counter()
        # The gateways' stored responses (opaque values; QUERY store.*).
        self.store = BoundedStore(config.store_max_count, config.store_max_bytes, config.store_wait)
        options = None
        if config.dispatch == "cache_aware":
            options = {
                "max_entries": config.cache_map_size,
                "threshold_abs": config.cache_threshold_abs,
                "threshold_rel": config.cache_threshold_rel,
                "session_balance": config.session_balance,
                "counters": self.counters,
            }
        self.policy = make_policy(config.dispatch, options)
        # The policy reads routing keys (None: the REQUEST routing frame is ignored).
        self.cache: CacheAware | None = (
            self.policy if isinstance(self.policy, CacheAware) else None
        )
        self._malformed_logged_at = -1e9  # monotonic time of the last malformed-message log line
        self._malformed_unreported = 0  # malformed messages since that line
        self.requests: dict[RequestKey, PendingRequest] = {}
        # Requests finished lately (key -> monotonic time), oldest first: a
        # client's HEARTBEAT can list one as quiet while its final is on the
        # way to it; such a request is not one we "do not hold" (bounded:
        # RECENT_MAX entries, each good for RECENT_S).
        self._recent: OrderedDict[RequestKey, float] = OrderedDict()
        self.queues: dict[str, deque[PendingRequest]] = {}  # model -> waiting
        self.clients: dict[bytes, ClientState] = {}
        self.started_at = time.monotonic()
        self._dirty_models: set[str] = set()  # models whose queue may now dispatch
        self._running = False
        self._goodbye = False  # stopping on purpose: say GOODBYE before closing
        self.leaving = False  # GOODBYE said; waiting for the told clients to move
        self._told: set[bytes] = set()  # clients told GOODBYE, not yet DISCONNECTed
        self._left_at = 0.0  # when GOODBYE was said
        # stop() wakes the loop through this pipe (a signal handler may call it)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.auth = self._start_auth()  # None: no CURVE
        try:
            # Tenants (None: every caller alike); with CURVE, its peer link
            # shares the ZAP authenticator.
            self.admission: Admission | None = (
                Admission(config.tenants, self.ctx, self.auth, config.peer_bind, config.peers)
                if config.tenants
                else None
            )
            # A client keeps its routing id across reconnections (a TCP reset):
            # its new connection takes the id over from the old one, which
            # the broker may not have seen die yet.
            self.frontend = self._router(
                config.frontend, config.frontend_hwm, DOMAIN_CLIENTS, handover=True
            )
            self.backend = self._router(config.backend, 0, DOMAIN_WORKERS)
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
            raise
        self.frontend_endpoint = self.frontend.getsockopt_string(zmq.LAST_ENDPOINT)
        self.backend_endpoint = self.backend.getsockopt_string(zmq.LAST_ENDPOINT)

    def _start_auth(self) -> BrokerAuth | None:
        cfg = self.cfg
        paths = (cfg.curve_secret, cfg.curve_allow_workers, cfg.curve_allow_clients)
        if not any(paths):
            return None
        if not all(paths):
            raise ValueError(
                "CURVE needs curve_secret, curve_allow_workers and curve_allow_clients together"
            )
        return BrokerAuth(self.ctx, *paths)  # type: ignore[arg-type]

    def _router(
        self, endpoint: str, hwm: int, zap_domain: str, handover: bool = False
    ) -> zmq.Socket:
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if handover:
            s.setsockopt(zmq.ROUTER_HANDOVER, 1)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.cfg.max_message_size)
        if hwm:
            s.setsockopt(zmq.SNDHWM, hwm)
        if self.auth is not None:
            self.auth.apply(s, zap_domain)  # CURVE server; ZAP checks the domain's list
        s.bind(endpoint)
        return s

    def reload_keys(self) -> None:
        """Read the CURVE allow lists again (the CLI calls it on SIGHUP)."""
        if self.auth is not None:
            self.auth.reload()

    def reload_tenants(self) -> None:
        """Read the tenants file again (the CLI calls it on SIGHUP)."""
        if self.admission is not None:
            self.admission.reload()

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        self._running = True
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        adm = self.admission
        peers = adm.sockets() if adm is not None else []  # SUBs to peer brokers
        for s in peers:
            poller.register(s, zmq.POLLIN)
        # With tenants, a frontend message is read with its connection's CURVE key.
        recv_front = adm.recv if adm is not None else recv_frames
        interval = self.cfg.heartbeat_interval
        next_tick = time.monotonic() + interval
        next_sync = adm.sync(time.monotonic()) if adm is not None else math.inf
        # The start-up heap is frozen out of the collector: its full passes
        # (33 ms each on a slow 2-core machine) would stall every stream.
        gc.collect()
        gc.freeze()
        log.info("broker frontend=%s backend=%s", self.frontend_endpoint, self.backend_endpoint)
        while self._running or (self._goodbye and self._still_leaving()):
            if not self._running and not self.leaving:
                self._say_goodbye()  # a planned stop: the leaving phase begins
                next_tick = next_sync = math.inf  # no heartbeats, no dispatch, no sync
            wake = min(next_tick, next_sync, self.store.next_deadline or math.inf)
            timeout_ms = max(0.0, (wake - time.monotonic()) * 1000)
            if self.leaving:
                timeout_ms = min(timeout_ms, 20.0)  # (the phase's end is checked)
            events = dict(poller.poll(timeout_ms))
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 64)
                except BlockingIOError:
                    pass
            if self.backend in events:
                self._drain(self.backend, self._on_backend)
            if self.frontend in events:
                self._drain(self.frontend, self._on_frontend, recv_front)
            for s in peers:
                if s in events:
                    adm.on_peer(s)  # type: ignore[union-attr]
            if self._dirty_models and not self.leaving:
                self._dispatch_queued()
            now = time.monotonic()
            deadline = self.store.next_deadline
            if deadline is not None and now >= deadline:
                self.store.expire(now)
                self._store_answers()
            if now >= next_sync:
                next_sync = adm.sync(now)  # type: ignore[union-attr]
            if now >= next_tick:
                self._tick(now)
                next_tick = now + interval

    def _still_leaving(self) -> bool:
        """The leaving phase goes on while a client told GOODBYE has not
        moved (said DISCONNECT), for at least ``GOODBYE_GRACE_S`` (the
        workers' DISCONNECT delivered) and at most ``LEAVE_TIMEOUT_S``."""
        if not self.leaving:
            return True  # it begins now
        waited = time.monotonic() - self._left_at
        if waited >= LEAVE_TIMEOUT_S:
            if self._told:
                log.info("leaving: %d clients did not move in time", len(self._told))
            return False
        return bool(self._told) or waited < GOODBYE_GRACE_S

    @property
    def stopping(self) -> bool:
        """A planned stop is under way (``stop(goodbye=True)`` was called)."""
        return self._goodbye

    def stop(self, goodbye: bool = False) -> None:
        """End ``run`` (safe from a signal handler or another thread).
        ``goodbye``: a planned stop; before ``run`` returns, every worker and
        every client with requests here is told (``_say_goodbye``)."""
        self._goodbye = self._goodbye or goodbye
        self._running = False
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # full (it will wake anyway) or closed

    def _say_goodbye(self) -> None:
        """A planned stop: DISCONNECT to every worker (it ends what we gave
        it and reconnects with backoff, to us restarted or to nobody) and
        GOODBYE to every client we hold requests for (it moves them to
        another broker at once, from what it received, instead of waiting
        out our liveness). Then the broker is leaving (``_still_leaving``)."""
        workers = list(self.registry.workers.values())
        for w in workers:
            # [worker, ZSW1, DISCONNECT]
            self._send_worker(w.identity, [p.WORKER, p.W_DISCONNECT])
        clients = list(self.clients)
        for cid in clients:
            # [client, ZSC1, GOODBYE]
            self._send_client(cid, [p.CLIENT, p.C_GOODBYE])
        self.leaving = True
        self._told = set(clients)
        self._left_at = time.monotonic()
        log.info(
            "goodbye: %d workers, %d clients with %d requests told",
            len(workers), len(clients), len(self.requests),
        )  # fmt: skip

    def close(self) -> None:
        # after a GOODBYE, let ZeroMQ deliver it: the closing sockets linger
        # (the leaving phase in ``run`` kept the connections up meanwhile)
        linger = GOODBYE_LINGER_MS if self._goodbye else 0
        self.frontend.close(linger)
        self.backend.close(linger)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.admission is not None:
            self.admission.close()
        if self.auth is not None:
            self.auth.stop()

    def _drain(self, sock: zmq.Socket, handler: Any, recv: Any = recv_frames) -> None:
        for _ in range(DRAIN_BATCH):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                return
            frames = recv(sock)
            try:
                handler(frames)
            except (ValueError, TypeError, KeyError, UnicodeDecodeError, IndexError) as e:
                self.counters["malformed"] += 1
                self._report_malformed(e)
            except Exception:  # a bug of ours, not the peer's: log it, keep serving
                self.counters["internal_error"] += 1
                log.exception("internal error handling a message; message dropped")

    def _report_malformed(self, e: Exception) -> None:
        """At most one log line a second: a peer sending garbage must not flood the log."""
        now = time.monotonic()
        self._malformed_unreported += 1
        if now - self._malformed_logged_at >= 1.0:
            more = self._malformed_unreported - 1
            log.warning(
                "malformed message ignored: %s%s", e, f" (and {more} more since the last report)"
                if more else "",
            )  # fmt: skip
            self._malformed_logged_at = now
            self._malformed_unreported = 0

    def _tick(self, now: float) -> None:
        self._purge_workers(now)
        self._purge_clients(now)
        self._purge_queues(now)
        for w in list(self.registry.workers.values()):
            self._send_worker(w.identity, [p.WORKER, p.W_HEARTBEAT])
        for cid, c in list(self.clients.items()):
            if c.undelivered:
                self._retry_undelivered(cid, c)
            if c.requests:
                self._send_client(cid, [p.CLIENT, p.C_HEARTBEAT])

    # ------------------------------------------------------------- frontend

    def _on_frontend(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[1] != p.CLIENT:
            raise ValueError("frontend: bad version tag or too few frames")
        client, cmd = frames[0], frames[2]
        c = self.clients.get(client)
        if c is not None:
            c.expiry = time.monotonic() + c.ttl
            c.expired = False
        if cmd == p.C_REQUEST:
            self._handle_client_request(client, frames, c)
        elif cmd == p.C_CANCEL:
            self._handle_client_cancel(client, frames)
        elif cmd == p.C_HEARTBEAT:
            self._handle_client_heartbeat(client, frames, c)
        elif cmd == p.C_QUERY:
            self._handle_client_query(client, frames)
        elif cmd == p.C_DISCONNECT:
            self._forget_client(client)
            self._told.discard(client)  # (leaving: it moved its streams)
        else:
            raise ValueError(f"frontend: unknown command {cmd!r}")

    def _handle_client_heartbeat(
        self, client: bytes, frames: list[bytes], c: ClientState | None
    ) -> None:
        # [client, ZSC1, HEARTBEAT, heartbeat_ms?, quiet_request_ids?]; any traffic counts
        if len(frames) > 5:
            raise ValueError("HEARTBEAT has at most 5 frames")
        quiet = p.decode_request_ids(frames[4]) if len(frames) == 5 else []
        if c is not None and len(frames) >= 4:
            c.ttl = self._client_ttl(frames[3])
            c.expiry = time.monotonic() + c.ttl
        held = c.requests if c is not None else None
        if (held or self.store.waits_of(client)) and not self.leaving:
            # (leaving: it is told nothing more) Answered at once: a client
            # that heartbeats faster than we do hears from us at its own
            # pace, so it does not take our slower ticks for a dead broker.
            self._send_client(client, [p.CLIENT, p.C_HEARTBEAT])
        if quiet and not self.leaving:
            # Requests the client waits on that we do not hold (we restarted,
            # or never got them): end them now, not at the client's timeout.
            owed = {r[0] for r in c.undelivered} if c is not None else set()
            now = time.monotonic()
            recent = self._recent
            unknown = [
                rid
                for rid in quiet
                if (client, rid) not in self.requests
                and rid not in owed
                and not self.store.is_waiting((client, rid))  # a store read waiting for its write
                and now - recent.get((client, rid), -RECENT_S) >= RECENT_S
            ]
            if unknown:
                self.counters["unknown_requests"] += len(unknown)
                why = "the broker does not hold this request (it restarted or never got it)"
                recs = [p.error_record(rid, "broker_unreachable", why) for rid in unknown]
                self._send_client(client, [p.CLIENT, p.C_TOKENS, p.encode_tokens(recs)])

    def _client_ttl(self, heartbeat_ms: bytes | None) -> float:
        """How long a client may stay silent, from the interval it advertised."""
        cfg = self.cfg
        if heartbeat_ms is None:
            return cfg.expiry
        interval = max(cfg.heartbeat_interval, p.decode_heartbeat_ms(heartbeat_ms))
        return interval * cfg.heartbeat_liveness

    @staticmethod
    def _check_request(rid: bytes, model_b: bytes) -> str:
        """The model name; ValueError for an id or a name past its limit (a
        worker would carry them in every TOKENS header and record)."""
        if len(rid) > p.MAX_REQUEST_ID:
            raise ValueError(
                f"request id of {len(rid)} bytes: at most {p.MAX_REQUEST_ID} bytes"
            )
        if len(model_b) > p.MAX_MODEL_NAME:
            raise ValueError(
                f"model name of {len(model_b)} bytes: at most {p.MAX_MODEL_NAME} bytes"
            )
        try:
            return model_b.decode()
        except UnicodeDecodeError:
            raise ValueError("model name is not UTF-8") from None

    def _handle_client_request(
        self, client: bytes, frames: list[bytes], c: ClientState | None
    ) -> None:
        # [client, ZSC1, REQUEST, request_id, model, body, heartbeat_ms?, routing?, tenant?]
        if not 6 <= len(frames) <= 9:
            raise ValueError("REQUEST needs 6 to 9 frames")
        rid, model_b, body = frames[3], frames[4], frames[5]
        if not rid:
            raise ValueError("REQUEST with an empty request id")
        self.counters["requests"] += 1
        if self.leaving:  # the client sends it through another broker
            why = "the broker is stopping (it said goodbye): send it elsewhere"
            self._reply_error(client, rid, "broker_unreachable", why)
            return
        try:
            model = self._check_request(rid, model_b)
        except ValueError as e:  # malformed, and the client is told
            self.counters["malformed"] += 1
            self._report_malformed(e)
            self._reply_error(client, rid, "bad_request", str(e))
            return
        try:
            # The interval the client advertises, on every REQUEST (routing
            # frame or not): it may heartbeat slower than we do.
            ttl = self._client_ttl(frames[6] if len(frames) >= 7 else None)
        except ValueError as e:
            self._reply_error(client, rid, "bad_request", str(e))
            return
        if c is not None and len(frames) >= 7:
            c.ttl = ttl
            c.expiry = time.monotonic() + ttl
        key = (client, rid)
        if key in self.requests:
            self._reply_error(client, rid, "bad_request", "duplicate request id in flight")
            return
        limit = self.cfg.max_inflight_per_client
        if limit and c is not None and len(c.requests) >= limit:
            self.counters["overloaded"] += 1
            self._reply_error(
                client, rid, "overloaded", f"{limit} requests of this client already in flight"
            )
            return
        if not self.registry.serves(model):
            self.counters["model_not_found"] += 1
            self._reply_error(
                client, rid, "model_not_found", f"no worker serves model {model!r}"
            )
            return
        now = time.monotonic()
        req = PendingRequest(client, rid, model, body, now + self.cfg.queue_timeout)
        if len(frames) >= 8 and self.cache is not None and frames[7]:
            try:
                req.session, req.chain = p.decode_routing(frames[7])
            except ValueError as e:
                self.counters["malformed"] += 1
                self._report_malformed(e)
                self._reply_error(client, rid, "bad_request", str(e))
                return
        ws = self.registry.available(model)
        if not ws:
            q = self._queue(model)
            if len(q) >= self.cfg.max_queue:
                self.counters["overloaded"] += 1
                self._reply_error(
                    client, rid, "overloaded", f"queue for {model!r} is full ({len(q)} waiting)"
                )
                return
        if self.admission is not None:
            # the tenant's limits: admitted (and its reservation held until
            # the final), or refused at once, never queued
            req.tenant, got = self.admission.admit(frames)
            if isinstance(got, Rejection):
                self.counters[f"error.{p.RATE_LIMITED}"] += 1
                rec = p.error_record(rid, p.RATE_LIMITED, got.message, got.details())
                self._send_client(client, [p.CLIENT, p.C_TOKENS, p.encode_tokens([rec])])
                return
            req.reserve = got
        if not ws:
            q.append(req)
        if c is None:
            c = self.clients[client] = ClientState(now + ttl, ttl)
        c.requests.add(key)
        self.requests[key] = req
        if ws:
            self._send_to_worker(req, self._choose(req, ws))

    def _handle_client_cancel(self, client: bytes, frames: list[bytes]) -> None:
        # [client, ZSC1, CANCEL, request_id]
        if len(frames) != 4:
            raise ValueError("CANCEL needs 4 frames")
        req = self.requests.get((client, frames[3]))
        if req is None:
            return  # already finished: nothing to do
        self.counters["cancels"] += 1
        self._cancel(req, notify_client=True)

    def _handle_client_query(self, client: bytes, frames: list[bytes]) -> None:
        # [client, ZSC1, QUERY, request_id, service, args...]
        if len(frames) < 5:
            raise ValueError("QUERY needs at least 5 frames")
        rid, service = frames[3], frames[4]
        if service == p.SERVICE_MODELS:
            result: Any = self.registry.models()
        elif service == p.SERVICE_STATUS:
            result = self.status()
        elif service == p.SERVICE_DRAIN:
            try:
                result = self._drain_workers(frames[5:])
            except ValueError as e:
                self._reply_error(client, rid, "bad_request", str(e))
                return
        elif service in p.STORE_SERVICES:
            who = (client, rid) if rid else None
            try:
                result = self.store.handle(service, frames[5:], who, time.monotonic())
            except ValueError as e:
                if rid:
                    self._reply_error(client, rid, "bad_request", str(e))
                else:
                    self.counters["malformed"] += 1
                return
            self._store_answers()  # reads a write released
            if not rid or result is WAITING:
                return  # a write that wants no answer (an empty request id), a read that waits
        else:
            self._reply_error(client, rid, "bad_request", f"unknown service {service!r}")
            return
        self._reply_query(client, rid, result)

    def _store_answers(self) -> None:
        """Answer the store reads that waited for a write (or in vain)."""
        for (client, rid), result in self.store.take_answers():
            self._reply_query(client, rid, result)

    def _reply_query(self, client: bytes, rid: bytes, result: Any) -> None:
        rec = p.Delta(finish_reason=p.FINISH_STOP, result=result).record(rid)
        self._send_client(client, [p.CLIENT, p.C_TOKENS, p.encode_tokens([rec])])

    def _drain_workers(self, args: list[bytes]) -> dict[str, Any]:
        """QUERY drain [worker]: tell the worker (its worker_id, or its
        routing id here, in hex) to drain, as SIGTERM would; dispatch to it
        stops at once. ValueError: no such worker here."""
        if len(args) != 1:
            raise ValueError("drain takes one worker id")
        name = args[0].decode("utf-8", "replace").strip().lower()
        found = [
            w for w in self.registry.workers.values()
            if name and name in (w.info.worker_id.lower(), w.id_hex)
        ]  # fmt: skip
        if not found:
            raise ValueError(f"no worker {name!r} at this broker (zserve status lists them)")
        for w in found:
            # [worker, ZSW1, DRAIN]
            self._send_worker(w.identity, [p.WORKER, p.W_DRAIN])
            self._handle_worker_drain(w)
        return {"draining": [w.info.worker_id or w.id_hex for w in found]}

    # -------------------------------------------------------------- backend

    def _on_backend(self, frames: list[bytes]) -> None:
        if len(frames) < 3 or frames[1] != p.WORKER:
            raise ValueError("backend: bad version tag or too few frames")
        wid, cmd = frames[0], frames[2]
        w = self.registry.get(wid)
        if cmd == p.W_READY:
            if self.leaving:  # (back too soon: it is told again)
                self._send_worker(wid, [p.WORKER, p.W_DISCONNECT])
                return
            self._handle_worker_ready(wid, frames, w)
            return
        if w is None:
            # Not registered (expired, or the broker restarted): make it
            # reconnect with a fresh READY, as Majordomo does.
            self._send_worker(wid, [p.WORKER, p.W_DISCONNECT])
            return
        self.registry.touch(w, time.monotonic())
        if cmd == p.W_TOKENS:
            self._handle_worker_tokens(w, frames)
        elif cmd == p.W_HEARTBEAT:
            self._handle_worker_heartbeat(w, frames)
        elif cmd == p.W_REFUSE:
            self._handle_worker_refuse(w, frames)
        elif cmd == p.W_DISCONNECT:
            self._remove_worker(w, "worker disconnected")
        elif cmd == p.W_DRAIN:
            self._handle_worker_drain(w)
        else:
            raise ValueError(f"backend: unknown command {cmd!r}")

    def _handle_worker_drain(self, w: WorkerState) -> None:
        # [worker, ZSW1, DRAIN]: it was told to stop. Nothing more is
        # dispatched to it; what it runs goes on (it hands over what is
        # left at its deadline, and REFUSEs what crossed this on the wire).
        if not w.draining:
            w.draining = True
            self.counters["drains"] += 1
            log.info("worker %s draining (%d in flight)", w.id_hex, len(w.in_flight))

    def _handle_worker_heartbeat(self, w: WorkerState, frames: list[bytes]) -> None:
        # [worker, ZSW1, HEARTBEAT, state?]
        if len(frames) == 4:
            state = p.unpack(frames[3])
            if isinstance(state, dict):
                ql = state.get("queue_length")
                peak = state.get("peak_queue_length", 0)
                if state.get("draining") is True:
                    self._handle_worker_drain(w)
                handed = state.get("handed_over", 0)
                if isinstance(handed, int) and handed > w.handed_over:
                    self.counters["handovers"] += handed - w.handed_over
                    w.handed_over = handed
                if isinstance(ql, int) and not isinstance(ql, bool) and ql >= 0:
                    self.registry.heartbeat(w, ql, peak if isinstance(peak, int) else 0)
                    if w.has_room:
                        # Room again (others finished, or a refusal's hold
                        # ended): what waits for its models may go now.
                        self._dirty_models.update(w.info.models)
        if w.info.heartbeat_interval < self.cfg.heartbeat_interval:
            # A worker that heartbeats faster than we do judges us by
            # its own interval: answer it at its pace.
            self._send_worker(w.identity, [p.WORKER, p.W_HEARTBEAT])

    def _handle_worker_refuse(self, w: WorkerState, frames: list[bytes]) -> None:
        # [worker, ZSW1, REFUSE, client_id, request_id]: other brokers keep
        # it full. It never started the request: dispatch it elsewhere, or
        # queue it ahead of newer requests; it is not a retry.
        if len(frames) != 5:
            raise ValueError("REFUSE needs 5 frames")
        key = (frames[3], frames[4])
        req = self.requests.get(key)
        if req is None or req.worker is not w or req.started:
            self.counters["stale_refusals"] += 1
            return
        self.counters["refused"] += 1
        self.registry.refuse(w, key)
        req.worker = None
        req.attempts -= 1
        if req.cancelled:  # the CANCEL we sent found nothing running there
            self._end_cancelled(req)
            return
        self._queue(req.model).appendleft(req)
        self._dirty_models.add(req.model)

    def _handle_worker_ready(
        self, wid: bytes, frames: list[bytes], old: WorkerState | None
    ) -> None:
        # [worker, ZSW1, READY, info]
        if len(frames) != 4:
            raise ValueError("READY needs 4 frames")
        info = WorkerInfo.decode(frames[3])
        if old is not None:
            self._remove_worker(old, "worker re-registered")
        interval = max(self.cfg.heartbeat_interval, info.heartbeat_interval)
        self.registry.add(wid, info, time.monotonic(), interval * self.cfg.heartbeat_liveness)
        self._dirty_models.update(info.models)
        self.counters["workers_registered"] += 1
        log.info(
            "worker %s ready: models=%s capacity=%d engine=%s",
            wid.hex(), info.models, info.capacity, info.engine,
        )

    def _handle_worker_tokens(self, w: WorkerState, frames: list[bytes]) -> None:
        # [worker, ZSW1, TOKENS, client_id, header, payload]
        if len(frames) != 6:
            raise ValueError("TOKENS needs 6 frames")
        client, header, payload = frames[3], frames[4], frames[5]
        started, finished = p.decode_header(header)
        requests = self.requests
        stale: set[bytes] | None = None
        for rid in started:
            req = requests.get((client, rid))
            if req is not None:
                if req.worker is w:
                    req.started = True
                else:
                    stale = stale or set()
                    stale.add(rid)
        for rid in finished:
            req = requests.get((client, rid))
            if req is not None and req.worker is not w:
                stale = stale or set()
                stale.add(rid)
        if stale:
            self.counters["stale_messages"] += 1
        c = self.clients.get(client)
        if c is None:
            self.counters["frames_for_gone_clients"] += 1
        else:
            drop = c.finalized | stale if stale else c.finalized
            if drop:
                payload = self._filter(payload, drop)
            if payload is not None:
                self.counters["token_messages"] += 1
                # Sent before the finals are booked: if the send fails, the
                # client state (and the finals it is owed) still exists.
                self._send_client(client, [p.CLIENT, p.C_TOKENS, payload])
        # With tenants, each final's usage settles its tenant's reservation.
        usage = self.admission.usage(frames[5], finished) if self.admission and finished else None
        for rid in finished:
            if stale is None or rid not in stale:
                self._finish((client, rid), w, usage.get(rid) if usage else None)

    def _filter(self, payload: bytes, drop: set[bytes]) -> bytes | None:
        """Drop records of requests the broker already ended, or that another
        worker (or another session of this one) now runs (rare path: decodes)."""
        recs = p.decode_tokens(payload)
        keep = [r for r in recs if r[0] not in drop]
        self.counters["records_dropped"] += len(recs) - len(keep)
        return p.encode_tokens(keep) if keep else None

    # ------------------------------------------------------------ bookkeeping

    def _send_to_worker(self, req: PendingRequest, w: WorkerState) -> None:
        # [worker, ZSW1, REQUEST, client_id, request_id, model, body]
        req.worker = w
        req.attempts += 1
        w.in_flight.add(req.key)
        w.dispatched += 1
        self.counters["dispatched"] += 1
        if req.tenant is not None:  # its expected tokens on its fair-share counter
            self.admission.dispatched(req.tenant, req.reserve)  # type: ignore[union-attr]
        self._send_worker(
            w.identity,
            [p.WORKER, p.W_REQUEST, req.client, req.request_id, req.model.encode(), req.body],
        )

    def _finish(
        self, key: RequestKey, w: WorkerState | None, usage: dict[str, Any] | None = None
    ) -> None:
        """Forget a finished request. ``w``: the worker whose final it was
        (None: the broker ended it); a final from any other worker is stale
        and changes nothing. ``usage``: the final's (tenants settle with it)."""
        req = self.requests.get(key)
        if req is None:
            return
        if w is not None and req.worker is not w:
            self.counters["stale_finals"] += 1
            return
        del self.requests[key]
        recent = self._recent
        recent[key] = time.monotonic()
        if len(recent) > RECENT_MAX:
            recent.popitem(last=False)
        if req.tenant is not None:
            self.admission.finished(req.tenant, req.reserve, usage, req.started)  # type: ignore[union-attr]
        if req.worker is not None:
            req.worker.in_flight.discard(key)
            self._dirty_models.update(req.worker.info.models)
        c = self.clients.get(req.client)
        if c is not None:
            c.requests.discard(key)
            c.finalized.discard(key[1])  # nothing more can come for it
            self._gc_client(req.client, c)

    def _gc_client(self, client: bytes, c: ClientState) -> None:
        """Forget a client with nothing in flight and nothing owed."""
        if not c.requests and not c.undelivered:
            self.clients.pop(client, None)

    def _cancel(self, req: PendingRequest, notify_client: bool) -> None:
        """Cancel wherever the request is; the worker answers with its final frame."""
        if req.cancelled:
            return
        req.cancelled = True
        if req.worker is None:
            q = self.queues.get(req.model)
            if q is not None:
                try:
                    q.remove(req)
                except ValueError:
                    pass
            if notify_client:
                self._reply_final(req.client, req.request_id, p.FINISH_CANCELLED)
            self._finish(req.key, None)
        else:
            self._send_worker(
                req.worker.identity, [p.WORKER, p.W_CANCEL, req.client, req.request_id]
            )

    def _end_cancelled(self, req: PendingRequest) -> None:
        """A cancelled request no worker will answer: the broker sends its
        ``cancelled`` final."""
        c = self.clients.get(req.client)
        if c is not None and req.request_id not in c.finalized:
            # (a slow client already owes its ``overloaded`` final)
            self._reply_final(req.client, req.request_id, p.FINISH_CANCELLED)
        self._finish(req.key, None)

    def _dispatch_queued(self) -> None:
        models, self._dirty_models = self._dirty_models, set()
        for model in models:
            q = self.queues.get(model)
            while q:
                ws = self.registry.available(model)
                if not ws:
                    break
                req = q.popleft()
                self._send_to_worker(req, self._choose(req, ws))
            if q is not None and not q:
                del self.queues[model]

    def _queue(self, model: str) -> Any:
        """The wait queue of ``model``, made if missing: with tenants a
        ``FairQueue`` (priority, fair share, aging), else a FIFO deque."""
        q = self.queues.get(model)
        if q is None:
            adm = self.admission
            q = self.queues[model] = adm.new_queue() if adm is not None else deque()
        return q

    def _choose(self, req: PendingRequest, ws: list[WorkerState]) -> WorkerState:
        if self.cache is not None:
            return self.cache(req.model, ws, self.rng, req.session, req.chain)
        return self.policy(req.model, ws, self.rng)

    def _remove_worker(self, w: WorkerState, why: str) -> None:
        """A dead worker: retry what had not started, end the rest with worker_lost."""
        self.registry.remove(w.identity)
        if self.cache is not None:
            self.cache.forget_worker(w.identity)
        self.counters["workers_lost"] += 1
        log.warning("worker %s removed: %s (%d in flight)", w.id_hex, why, len(w.in_flight))
        retry: list[PendingRequest] = []
        for key in list(w.in_flight):
            req = self.requests.get(key)
            if req is None:
                continue
            req.worker = None
            w.in_flight.discard(key)
            if req.cancelled:
                self._end_cancelled(req)
            elif (
                not req.started
                and req.attempts <= self.cfg.max_retries
                and self.registry.serves(req.model)
            ):
                retry.append(req)
            else:
                self.counters["worker_lost"] += 1
                what = "mid-stream" if req.started else "and no other worker could take it"
                self._reply_error(
                    req.client, req.request_id, "worker_lost", f"worker died {what} ({why})"
                )
                self._finish(key, None)
        for req in reversed(retry):  # keep their order, ahead of newer requests
            self.counters["retried"] += 1
            self._queue(req.model).appendleft(req)
            self._dirty_models.add(req.model)

    def _purge_workers(self, now: float) -> None:
        for w in self.registry.expired(now):
            self._remove_worker(w, "heartbeat expired")

    def _purge_clients(self, now: float) -> None:
        for cid, c in list(self.clients.items()):
            if c.expiry < now:
                if c.requests and not c.expired:
                    self._expire_client(cid, c, now)
                else:  # nothing running, or silent on past its owed finals
                    c.undelivered.clear()
                    self._forget_client(cid)

    def _expire_client(self, cid: bytes, c: ClientState, now: float) -> None:
        """A client silent past its expiry: cancel its requests on the workers
        and end each with a ``client_expired`` final (it did not cancel them),
        owed for one more expiry in case it was only stalled."""
        self.counters["clients_expired"] += 1
        log.info("client %s silent: cancelling %d requests", cid.hex(), len(c.requests))
        why = f"no word from this client for {c.ttl:g} s: the broker ended its requests"
        for key in list(c.requests):
            req = self.requests.get(key)
            if req is None:
                continue
            if key[1] not in c.finalized:
                c.finalized.add(key[1])  # what the worker still sends is dropped
                c.undelivered.append(p.error_record(key[1], p.CLIENT_EXPIRED, why))
            self._cancel(req, notify_client=False)
        c.expired = True
        c.expiry = now + c.ttl
        if c.undelivered:
            self._retry_undelivered(cid, c)

    def _purge_queues(self, now: float) -> None:
        for model, q in list(self.queues.items()):
            for req in _expired(q, now):
                self.counters["queue_timeouts"] += 1
                self._reply_error(
                    req.client, req.request_id, "timeout", f"no free worker for {model!r} in time"
                )
                self._finish(req.key, None)
            if not q:
                del self.queues[model]

    def _forget_client(self, client: bytes) -> None:
        c = self.clients.get(client)
        if c is None:
            return
        for key in list(c.requests):
            req = self.requests.get(key)
            if req is not None:
                # Nothing more of it reaches the client: should it come back
                # (a reconnection keeps its routing id), it resumes the
                # stream from what it got, with no gap and no ``cancelled``.
                c.finalized.add(key[1])
                self._cancel(req, notify_client=False)
        c.undelivered.clear()
        self._gc_client(client, c)

    # --------------------------------------------------------------- sending

    def _send_worker(self, wid: bytes, frames: list[bytes]) -> None:
        try:
            send_frames(self.backend, [wid, *frames])
        except zmq.ZMQError as e:  # EHOSTUNREACH (gone) or EAGAIN (full)
            self.counters["worker_send_failed"] += 1
            w = self.registry.get(wid)
            if w is not None:
                self._remove_worker(w, f"unreachable ({e.strerror})")

    def _send_client(self, client: bytes, frames: list[bytes]) -> bool:
        try:
            send_frames(self.frontend, [client, *frames])
            return True
        except zmq.ZMQError as e:
            self._client_unreachable(client, frames, e)
            return False

    def _client_unreachable(self, client: bytes, frames: list[bytes], e: zmq.ZMQError) -> None:
        """The client vanished (EHOSTUNREACH) or stopped reading (EAGAIN).

        Either way its requests are cancelled on the workers; a slow client
        is told why with an ``overloaded`` final frame per request, retried
        until its pipe drains or it expires. Nothing is buffered beyond that.
        """
        c = self.clients.get(client)
        self.counters["client_send_failed"] += 1
        if e.errno == zmq.EHOSTUNREACH:
            if c is not None:
                self._forget_client(client)
            return
        if c is None:
            # Nothing in flight, but a final (an error reply, a query's
            # answer) did not fit: owe it as it is until the client drains
            # its pipe or goes silent past its expiry.
            if frames[1] == p.C_TOKENS:
                finals = [r for r in p.decode_tokens(frames[2]) if r[3] is not None]
                if finals:
                    now = time.monotonic()
                    c = self.clients[client] = ClientState(now + self.cfg.expiry, self.cfg.expiry)
                    c.undelivered.extend(finals)
            return
        self.counters["slow_clients"] += 1
        log.warning("client %s cannot keep up: cancelling its requests", client.hex())
        rids = {key[1] for key in c.requests}
        if frames[1] == p.C_TOKENS:  # the dropped message's own requests end here too
            rids.update(r[0] for r in p.decode_tokens(frames[2]))
        for rid in rids - c.finalized:
            c.finalized.add(rid)
            c.undelivered.append(
                p.error_record(rid, "overloaded", "client did not read its stream fast enough")
            )
        for key in list(c.requests):
            req = self.requests.get(key)
            if req is not None:
                self._cancel(req, notify_client=False)
        # Only requests still running can send more records to filter out.
        c.finalized.intersection_update({key[1] for key in c.requests})

    def _retry_undelivered(self, client: bytes, c: ClientState) -> None:
        payload = p.encode_tokens(c.undelivered)
        try:
            send_frames(self.frontend, [client, p.CLIENT, p.C_TOKENS, payload])
        except zmq.ZMQError as e:
            if e.errno == zmq.EHOSTUNREACH:
                c.undelivered.clear()
                self._forget_client(client)
            return
        c.undelivered.clear()
        self._gc_client(client, c)

    def _reply_error(self, client: bytes, rid: bytes, code: str, message: str) -> None:
        self.counters[f"error.{code}"] += 1
        payload = p.encode_tokens([p.error_record(rid, code, message)])
        self._send_client(client, [p.CLIENT, p.C_TOKENS, payload])

    def _reply_final(self, client: bytes, rid: bytes, reason: str) -> None:
        payload = p.encode_tokens([p.Delta(finish_reason=reason).record(rid)])
        self._send_client(client, [p.CLIENT, p.C_TOKENS, payload])

    # --------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "workers": [
                {
                    "id": w.id_hex,
                    "worker_id": w.info.worker_id,
                    "models": w.info.models,
                    "capacity": w.info.capacity,
                    "queue_length": w.queue_length,
                    "peak_queue_length": w.peak_queue_length,
                    "in_flight": len(w.in_flight),
                    "others": w.others,
                    "refused": w.refused,
                    "draining": w.draining,
                    "handed_over": w.handed_over,
                    "dispatched": w.dispatched,
                    "speed": w.info.speed,
                    "engine": w.info.engine,
                    "context_length": w.info.context_length,
                    "pid": w.info.pid,
                    "last_seen_s": round(now - w.last_seen, 3),
                }
                for w in self.registry.workers.values()
            ],
            "models": self.registry.models(),
            "queued": {m: len(q) for m, q in self.queues.items()},
            "requests_in_flight": len(self.requests),
            "clients": len(self.clients),
            # leaving: stopping on purpose, GOODBYE said, its clients moving away
            "state": "leaving" if self.leaving else "serving",
            "counters": {
                **self.counters,
                **(self.auth.counters() if self.auth else {}),
                **(self.admission.counters() if self.admission else {}),
            },
            "curve": self.auth.status() if self.auth is not None else None,
            "dispatch": self.cfg.dispatch,
            "prefix_map": self.cache.stats() if self.cache is not None else None,
            # {tenants: {name: {...}}, peers: [...], peer_endpoint}; None without --tenants
            "tenants": self.admission.status() if self.admission is not None else None,
            "store": self.store.stats(),  # the gateways' stored responses
            "uptime_s": round(now - self.started_at, 3),
        }
