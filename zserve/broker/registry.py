"""The broker's worker registry: pure state, no sockets, time passed in.

Every method that depends on time takes ``now`` (``time.monotonic()``
seconds) so expiry and dispatch are unit-tested without sockets or sleeps.

A worker may serve several brokers at once. Its capacity is its own, so a
broker counts what the others give it: at each HEARTBEAT, the worker's
queue length (everything it runs) less this broker's own in-flight count
is the load of the other brokers (``others``). Room and load are then
own in-flight + others. The estimate lags by up to one heartbeat; a
worker that is sent more than it can take refuses the extra request
(REFUSE), and the broker counts it full until its next heartbeat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zserve.protocol import WorkerInfo

RequestKey = tuple[bytes, bytes]  # (client routing id, request id)


@dataclass(eq=False)
class WorkerState:
    identity: bytes  # the worker's routing id on the backend socket
    info: WorkerInfo  # what it said in READY
    expiry: float  # monotonic deadline: dead if silent past it
    last_seen: float  # monotonic time of the last message from it
    # Silence allowed: max(broker interval, the worker's advertised interval)
    # x liveness; 0 means the registry's default.
    ttl: float = 0.0
    queue_length: int = 0  # what its last HEARTBEAT reported
    # Requests dispatched to it and not yet finished: the broker's own count,
    # updated at dispatch and at completion (not only by heartbeats).
    in_flight: set[RequestKey] = field(default_factory=set)
    dispatched: int = 0  # requests sent to it, ever
    # Requests other brokers give it, as of its last HEARTBEAT: its
    # queue_length less our in-flight count then, never below 0.
    others: int = 0
    # It refused a request since its last HEARTBEAT: send it nothing more
    # until it reports again.
    full: bool = False
    refused: int = 0  # requests it refused, ever
    peak_queue_length: int = 0  # the most it ran at once, as it last reported
    # It is draining (W_DRAIN, or its HEARTBEAT state says so): nothing more
    # is dispatched to it; what it runs goes on until it hands it over.
    draining: bool = False
    handed_over: int = 0  # streams it handed over at its drain deadline, as it last reported

    @property
    def load(self) -> float:
        """Requests it runs (ours in flight + the other brokers') per unit
        of speed: shortest_queue's measure."""
        return (len(self.in_flight) + self.others) / self.info.speed

    @property
    def has_room(self) -> bool:
        return (
            not self.full
            and not self.draining
            and len(self.in_flight) + self.others < self.info.capacity
        )

    @property
    def id_hex(self) -> str:
        return self.identity.hex()


class Registry:
    """Workers by routing id and by served model name."""

    def __init__(self, expiry_after: float) -> None:
        self.expiry_after = expiry_after  # interval x liveness
        self.workers: dict[bytes, WorkerState] = {}
        self.by_model: dict[str, list[WorkerState]] = {}

    def add(
        self, identity: bytes, info: WorkerInfo, now: float, ttl: float = 0.0
    ) -> WorkerState:
        """Register a worker (the caller removes any previous entry first);
        ``ttl``: how long it may stay silent (default: the registry's)."""
        ttl = ttl or self.expiry_after
        w = WorkerState(identity, info, now + ttl, now, ttl)
        self.workers[identity] = w
        for m in info.models:
            self.by_model.setdefault(m, []).append(w)
        return w

    def remove(self, identity: bytes) -> WorkerState | None:
        w = self.workers.pop(identity, None)
        if w is None:
            return None
        for m in w.info.models:
            ws = self.by_model.get(m)
            if ws is not None:
                ws.remove(w)
                if not ws:
                    del self.by_model[m]
        return w

    def get(self, identity: bytes) -> WorkerState | None:
        return self.workers.get(identity)

    def touch(self, w: WorkerState, now: float) -> None:
        """Any traffic from a worker counts as a heartbeat."""
        w.last_seen = now
        w.expiry = now + w.ttl

    def heartbeat(self, w: WorkerState, queue_length: int, peak: int = 0) -> None:
        """A HEARTBEAT's state: what it runs in all (``queue_length``, every
        broker's requests) sets the other brokers' share, and ends a
        refusal's hold."""
        w.queue_length = queue_length
        w.others = max(0, queue_length - len(w.in_flight))
        w.peak_queue_length = max(w.peak_queue_length, peak)
        w.full = False

    def refuse(self, w: WorkerState, key: RequestKey) -> None:
        """``w`` refused the request ``key`` (it is full, other brokers'
        requests included): it is no longer in flight there, and ``w`` gets
        nothing more until its next heartbeat."""
        w.in_flight.discard(key)
        w.full = True
        w.refused += 1

    def expired(self, now: float) -> list[WorkerState]:
        return [w for w in self.workers.values() if w.expiry < now]

    def serves(self, model: str) -> bool:
        return model in self.by_model

    def available(self, model: str) -> list[WorkerState]:
        """Workers serving ``model`` with a free slot: O(workers for that model)."""
        return [w for w in self.by_model.get(model, ()) if w.has_room]

    def models(self) -> list[str]:
        return sorted(self.by_model)
