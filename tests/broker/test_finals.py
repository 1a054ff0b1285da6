"""Exactly one final record per request, on the broker's rare paths.

The broker runs in-process on real ROUTER sockets over loopback, driven one
step at a time (read what arrived, handle it), so a client's pipe can be
filled to the brim at exactly the moment a test needs it. Clients and
workers are raw DEALERs speaking the wire protocol.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator

import pytest
import zmq

from zserve import protocol as p
from zserve._loopsock import recv_frames, send_frames
from zserve.broker.server import Broker, BrokerConfig
from zserve.launcher import wait_for
from zserve.protocol import WorkerInfo


class Rig:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.broker = Broker(
            BrokerConfig(
                frontend="tcp://127.0.0.1:*",
                backend="tcp://127.0.0.1:*",
                frontend_hwm=4,
                seed=1,
            ),
            self.ctx,
        )
        self.socks: list[zmq.Socket] = []

    def dealer(self, endpoint: str, **opts: int) -> zmq.Socket:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        for k, v in opts.items():
            s.setsockopt(getattr(zmq, k), v)
        s.connect(endpoint)
        self.socks.append(s)
        return s

    def client(self) -> zmq.Socket:
        # a tiny receive side, so that the broker's pipe to it fills quickly
        return self.dealer(self.broker.frontend_endpoint, RCVHWM=1, RCVBUF=4096)

    def worker(self, *models: str, capacity: int = 1) -> zmq.Socket:
        n = len(self.broker.registry.workers)
        w = self.dealer(self.broker.backend_endpoint)
        w.send_multipart([p.WORKER, p.W_READY, WorkerInfo(list(models), capacity).encode()])
        self.step_until(lambda: len(self.broker.registry.workers) == n + 1)
        return w

    def step(self) -> None:
        """Handle whatever has arrived on both sockets, then dispatch."""
        b = self.broker
        b._drain(b.backend, b._on_backend)
        b._drain(b.frontend, b._on_frontend)
        if b._dirty_models:
            b._dispatch_queued()

    def step_until(self, cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
        def go() -> bool:
            self.step()
            return bool(cond())

        wait_for(go, timeout, "the broker to handle what was sent")

    def fill(self, client_id: bytes) -> None:
        """Send the client junk until its pipe refuses more for a while."""
        junk = [client_id, p.CLIENT, p.C_HEARTBEAT, b"x" * 65536]
        refused_since = None
        while True:
            try:
                send_frames(self.broker.frontend, junk)
                refused_since = None
            except zmq.Again:
                now = time.monotonic()
                refused_since = refused_since or now
                if now - refused_since > 0.3:
                    return
                time.sleep(0.01)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
        self.broker.close()
        self.ctx.term()


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def drain_records(sock: zmq.Socket, idle: float = 0.3) -> list[list]:
    """Read every message until none comes for ``idle`` s; the TOKENS records."""
    out: list[list] = []
    while sock.poll(idle * 1000):
        frames = recv_frames(sock)
        if frames[1] == p.C_TOKENS:
            out.extend(p.decode_tokens(frames[2]))
    return out


def finals(records: list[list]) -> Counter[bytes]:
    return Counter(r[0] for r in records if r[3] is not None)


def request(client: zmq.Socket, rid: bytes, model: str = "m") -> None:
    body = p.encode_generate("hi", None, p.SamplingParams(max_tokens=5).encode())
    client.send_multipart([p.CLIENT, p.C_REQUEST, rid, model.encode(), body])


def received_request(worker: zmq.Socket) -> tuple[bytes, bytes]:
    assert worker.poll(5000)
    frames = worker.recv_multipart()
    while frames[1] != p.W_REQUEST:
        assert worker.poll(5000)
        frames = worker.recv_multipart()
    return frames[2], frames[3]  # client id, request id


def served(rig: Rig) -> tuple[zmq.Socket, zmq.Socket, bytes, bytes]:
    """A worker of "m", a client, and the client's request ``r1`` as the
    worker received it: (worker, client, client id, request id)."""
    w = rig.worker("m")
    c = rig.client()
    request(c, b"r1")
    rig.step_until(lambda: rig.broker.requests)
    cid, rid = received_request(w)
    return w, c, cid, rid


def tokens(worker: zmq.Socket, cid: bytes, rid: bytes, *, started=False, final=False) -> None:
    rec = p.Delta("t ", [1], p.FINISH_LENGTH if final else None).record(rid)
    header = p.encode_header([rid] if started else [], [rid] if final else [])
    worker.send_multipart([p.WORKER, p.W_TOKENS, cid, header, p.encode_tokens([rec])])


def test_a_final_that_meets_a_full_pipe_is_owed_not_lost(rig):
    """Defect 3: the final was booked (forgetting the client) before its send
    failed with EAGAIN, so nothing was owed and the request had no final."""
    b = rig.broker
    w, c, cid, rid = served(rig)
    rig.fill(cid)
    tokens(w, cid, rid, started=True, final=True)
    rig.step_until(lambda: not b.requests)
    recs = drain_records(c)
    b._tick(time.monotonic())  # retries what is owed, now that the pipe has room
    recs += drain_records(c)
    assert finals(recs) == {b"r1": 1}
    assert cid not in b.clients  # nothing left behind once delivered


def test_a_slow_client_whose_worker_dies_gets_one_final(rig):
    """Defect 7: a cancelled request of a slow client, its worker then lost,
    got ``cancelled`` on top of the ``overloaded`` it was already owed, and
    its id stayed in ``finalized`` for good."""
    b = rig.broker
    w, c, cid, rid = served(rig)
    tokens(w, cid, rid, started=True)
    rig.step_until(lambda: b.counters["token_messages"] == 1)
    rig.fill(cid)
    tokens(w, cid, rid)  # refused: the client is cut, its request cancelled
    rig.step_until(lambda: b.counters["slow_clients"] == 1)
    assert w.poll(5000) and w.recv_multipart()[1] == p.W_CANCEL
    recs = drain_records(c)  # the client catches up
    w.send_multipart([p.WORKER, p.W_DISCONNECT])  # and the worker goes away
    rig.step_until(lambda: not b.registry.workers)
    recs += drain_records(c)
    b._tick(time.monotonic())
    recs += drain_records(c)
    assert finals(recs) == {b"r1": 1}
    final = [r for r in recs if r[3] is not None][0]
    assert final[4]["error"]["code"] == "overloaded"
    assert cid not in b.clients


def test_a_final_from_a_worker_that_no_longer_runs_the_request_is_dropped(rig):
    """Defect 5 (broker side): a stale final freed another worker's slot and
    gave the client a second generation's final."""
    b = rig.broker
    wa = rig.worker("m")
    wb = rig.worker("m")
    c = rig.client()
    request(c, b"r1")
    rig.step_until(lambda: b.requests)
    first = wa if wa.poll(2000) else wb
    other = wb if first is wa else wa
    cid, rid = received_request(first)
    # The worker it went to comes back as a new registration (same routing
    # id) that no longer serves "m": the request is retried on the other one.
    first.send_multipart([p.WORKER, p.W_READY, WorkerInfo(["other"], 1).encode()])
    rig.step_until(lambda: b.counters["retried"] == 1)
    assert received_request(other) == (cid, rid)
    running = b.requests[(cid, rid)].worker
    assert running is not None and running.info.models == ["m"]
    # A record of the old generation arrives from the first worker.
    tokens(first, cid, rid, started=True, final=True)
    rig.step_until(lambda: b.counters["stale_messages"] or (cid, rid) not in b.requests)
    assert (cid, rid) in b.requests, "a stale final ended the request"
    assert (cid, rid) in running.in_flight  # its slot stays taken
    assert not c.poll(300), "a stale record reached the client"
    tokens(other, cid, rid, started=True, final=True)
    rig.step_until(lambda: not b.requests)
    assert finals(drain_records(c)) == {b"r1": 1}


def test_a_quiet_id_whose_final_is_on_its_way_gets_no_second_final(rig):
    """CI (test_two_vllm_workers_greedy): a client listed a request as quiet
    in its HEARTBEAT while that request's final was on the way to it; the
    broker, which had just forgotten it, answered ``broker_unreachable`` (a
    second final). A finished request is not one it "does not hold"; a
    request it never had still is, at once."""
    b = rig.broker
    w, c, cid, rid = served(rig)
    tokens(w, cid, rid, started=True, final=True)
    rig.step_until(lambda: not b.requests)
    # the heartbeat the client sent before the final reached it
    hb = [p.CLIENT, p.C_HEARTBEAT, p.encode_heartbeat_ms(1.0)]
    c.send_multipart([*hb, p.encode_request_ids([b"r1", b"never"])])
    rig.step_until(lambda: b.counters["unknown_requests"] >= 1)
    recs = drain_records(c)
    assert finals(recs) == {b"r1": 1, b"never": 1}
    (never,) = [r for r in recs if r[0] == b"never"]
    assert never[4]["error"]["code"] == "broker_unreachable"
    # Past RECENT_S, a finished id listed again is answered as not held (its
    # final may have been lost): the client is not left waiting for good.
    b._recent[(cid, b"r1")] -= 10.0
    c.send_multipart([*hb, p.encode_request_ids([b"r1"])])
    rig.step_until(lambda: b.counters["unknown_requests"] >= 2)
    assert finals(drain_records(c)) == {b"r1": 1}
