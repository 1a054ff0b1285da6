"""One broker session of a worker: its socket, READY, heartbeats and reconnects.

A worker holds one ``BrokerSession`` per broker. Each owns its DEALER
(connected to that broker's backend ROUTER), its outbox and the requests
that broker gave it; the engine, the capacity and the count of running
requests are the worker's own, shared by every session (``Worker.admit``
decides whether a REQUEST runs or is refused).

A session says READY, heartbeats with the worker's real queue length (every
broker's requests), and hands each REQUEST to the worker. When its broker
goes silent for interval x liveness it closes the socket (reading nothing
more from it), aborts what that broker gave it (the broker has failed those
requests), backs off (1 s doubling to 32 s, reset once a broker answered)
and reconnects with a fresh READY. The other sessions go on meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from zserve import protocol as p
from zserve._loopsock import LoopSocket
from zserve.protocol import Delta
from zserve.worker.outbox import Message, Outbox, encode_message

if TYPE_CHECKING:
    from zserve.worker.runtime import Worker

log = logging.getLogger(__name__)

RequestKey = tuple[bytes, bytes]  # (client id, request id)
CANCEL_REASON = "cancelled by the client"
STOP_LINGER_MS = 1000  # a stopping worker's last frames may take this long to go out


class BrokerSession:
    def __init__(self, worker: Worker, endpoint: str) -> None:
        self.worker = worker
        self.endpoint = endpoint
        self.sock: LoopSocket | None = None  # None between connections
        self.outbox = Outbox()
        # (client id, request id) -> the task running it
        self.active: dict[RequestKey, asyncio.Task[None]] = {}
        # Requests of this broker that hold one of the worker's slots: from
        # admission until their final record is queued (the moment the
        # broker, reading that final, frees its own count).
        self.running: set[RequestKey] = set()
        # Requests being handed over at the worker's drain deadline (their
        # tasks are cancelled; see Worker._hand_over).
        self.handing_over: set[RequestKey] = set()
        # This broker has more for us than we took: the worker refused it a
        # request; until then the others keep to their share (Worker.admit).
        self.wanting_until = 0.0
        self.connections = 0  # connections made (READY sent)
        self._last_recv = 0.0  # monotonic time of the last broker message
        self._heard = False  # the broker has spoken in this connection

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff until the worker stops."""
        w = self.worker
        cfg = w.cfg
        delay = cfg.reconnect_initial
        while not w.stopping.is_set() and not w.draining:
            heard = await self._connection()
            if w.stopping.is_set() or w.draining or getattr(w.engine, "dead", False):
                break  # (a draining worker registers nowhere again)
            if heard:
                delay = cfg.reconnect_initial
            log.warning("broker lost: reconnecting in %.1f s (%s)", delay, self.endpoint)
            try:
                await asyncio.wait_for(w.stopping.wait(), delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, cfg.reconnect_max)

    async def _connection(self) -> bool:
        """One connection to the broker; returns whether the broker ever spoke."""
        w = self.worker
        raw = w.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        watch = w.curve.apply(raw) if w.curve is not None else None
        raw.connect(self.endpoint)
        self.connections += 1
        self._last_recv = time.monotonic()
        self._heard = False
        ended = asyncio.get_running_loop().create_future()

        def on_message(frames: list[bytes]) -> None:
            self._heard = True
            self._last_recv = time.monotonic()
            if not self._handle(frames) and not ended.done():
                # the broker told us to reconnect (it is stopping, or does
                # not know us: each message of ours may be answered so)
                log.warning("broker %s asked us to reconnect", self.endpoint)
                ended.set_result(None)

        sock = self.sock = LoopSocket(raw, on_message)
        sock.send([p.WORKER, p.W_READY, w.info().encode()])
        log.info("READY sent to %s: models=%s", self.endpoint, w.engine.models)

        def send(msg: Message) -> Any:
            fut = None
            for client, header, payload in encode_message(msg):
                # [ZSW1, TOKENS, client_id, header, payload]
                fut = sock.send([p.WORKER, p.W_TOKENS, client, header, payload])
            return fut

        self.outbox.attach(send)
        ticker = asyncio.create_task(self._heartbeats(sock))
        stopping = asyncio.create_task(w.stopping.wait())
        try:
            await asyncio.wait({ended, ticker, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ticker, stopping):
                t.cancel()
            if w.stopping.is_set():
                # DISCONNECT first: the broker dispatches nothing more to us
                # (and retries what had not started) while we drain.
                sock.send([p.WORKER, p.W_DISCONNECT])
                try:
                    await asyncio.wait_for(self._drain(), 2.0)
                except TimeoutError:
                    pass
            # Stop reading before anything else is awaited: a REQUEST read
            # now would run on into the next connection, unknown to its broker.
            self.outbox.attach(None)
            # The handshake watch first: an event the socket emits once the
            # monitor's reader is gone blocks ZeroMQ's I/O thread, and with
            # it every socket of the process (HandshakeWatch.close).
            if watch is not None:
                if not self._heard and not w.stopping.is_set():
                    log.warning("%s", watch.explain(self.endpoint))  # a refused key, say
                watch.close()
            # Stopping: what is still queued (the finals, DISCONNECT) is
            # handed to ZeroMQ to deliver (the CLI's exit waits it out).
            sock.close(STOP_LINGER_MS if w.stopping.is_set() else 0)
            self.sock = None
            await self._abort_all()
            # Every task of this connection has ended: none of its records
            # may reach the next one, and none holds a slot.
            self.outbox.drop_all()
            for key in list(self.running):
                self.release(key)
            self.wanting_until = 0.0
        return self._heard

    async def _drain(self) -> None:
        """On shutdown: cancel running requests and send their final frames."""
        for task in list(self.active.values()):
            task.cancel(CANCEL_REASON)
        if self.active:
            await asyncio.gather(*self.active.values(), return_exceptions=True)
        while not self.outbox.empty:
            await asyncio.sleep(0.001)

    async def _abort_all(self) -> None:
        tasks = list(self.active.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.active.clear()

    async def _heartbeats(self, sock: LoopSocket) -> None:
        """Send HEARTBEAT every interval; return when the broker is silent too long."""
        cfg = self.worker.cfg
        expiry = cfg.heartbeat_interval * cfg.heartbeat_liveness
        while True:
            await asyncio.sleep(cfg.heartbeat_interval)
            if time.monotonic() - self._last_recv > expiry:
                return
            self.send_state()
            if getattr(self.worker.engine, "dead", False):
                log.error("engine is dead: leaving")
                self.worker.stop()

    def send_state(self) -> None:
        """HEARTBEAT with the worker's state: every broker's requests count."""
        if self.sock is not None:
            # [ZSW1, HEARTBEAT, {queue_length, peak_queue_length}]
            self.sock.send_now([p.WORKER, p.W_HEARTBEAT, self.worker.state()])

    # ------------------------------------------------------------- messages

    def _handle(self, frames: list[bytes]) -> bool:
        if len(frames) < 2 or frames[0] != p.WORKER:
            log.warning("malformed message from broker ignored")
            return True
        cmd = frames[1]
        if cmd == p.W_REQUEST and len(frames) == 6:
            self.worker.admit(self, frames[2], frames[3], frames[4], frames[5])
        elif cmd == p.W_CANCEL and len(frames) == 4:
            task = self.active.get((frames[2], frames[3]))
            log.debug("CANCEL %r: %s", frames[3], "running" if task else "not running")
            if task is not None:
                task.cancel(CANCEL_REASON)
        elif cmd == p.W_HEARTBEAT:
            pass
        elif cmd == p.W_DISCONNECT:
            return False
        elif cmd == p.W_DRAIN:
            log.warning("broker %s asked us to drain", self.endpoint)
            self.worker.drain()
        else:
            log.warning("unknown or malformed command %r from broker ignored", cmd)
        return True

    def send_drain(self) -> None:
        """Tell the broker we drain: it dispatches nothing more to us."""
        if self.sock is not None:
            # [ZSW1, DRAIN]
            self.sock.send([p.WORKER, p.W_DRAIN])

    def send_refuse(self, client: bytes, rid: bytes) -> None:
        """Give a REQUEST back unstarted (draining): the broker sends it on."""
        if self.sock is not None:
            # [ZSW1, REFUSE, client_id, request_id]
            self.sock.send([p.WORKER, p.W_REFUSE, client, rid])

    def refuse(self, client: bytes, rid: bytes, now: float) -> None:
        """Give a REQUEST back unstarted: the worker is full."""
        # [ZSW1, REFUSE, client_id, request_id]
        if self.sock is not None:
            self.sock.send([p.WORKER, p.W_REFUSE, client, rid])
        cfg = self.worker.cfg
        self.wanting_until = now + cfg.heartbeat_interval * cfg.heartbeat_liveness

    def put_final(
        self, client: bytes, rid: bytes, d: Delta, first: bool, now: bool = False
    ) -> None:
        """Queue a request's final record; its slot is free from here on."""
        self.release((client, rid))
        self.outbox.put(client, rid, d, first, now)

    def release(self, key: RequestKey) -> None:
        if key in self.running:
            self.running.discard(key)
            self.worker.slot_freed()
