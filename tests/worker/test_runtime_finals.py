"""The worker runtime's promises about finals and sessions, with the test as
the broker: a real ROUTER on loopback, and the real ``Worker`` running an
engine written for the test in a thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
import zmq

from zserve import protocol as p
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.runtime import Worker, WorkerConfig


class FailingCleanup(Engine):
    """Ends every request at once, then fails while being closed."""

    name = "failing-cleanup"

    def __init__(self) -> None:
        super().__init__()
        self.models = ["m"]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[p.Delta]:
        try:
            yield p.Delta("a", [1], p.FINISH_LENGTH, usage={"prompt_tokens": 1})
        finally:
            await asyncio.sleep(0.01)
            raise RuntimeError("cleanup failed")


class SlowAbort(Engine):
    """A token every 50 ms, forever; aborting takes a second."""

    name = "slow-abort"

    def __init__(self) -> None:
        super().__init__()
        self.models = ["m"]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[p.Delta]:
        i = 0
        while True:
            await asyncio.sleep(0.05)
            yield p.Delta("t ", [i])
            i += 1

    async def abort(self, request_id: str) -> None:
        await asyncio.sleep(1.0)


class FakeBroker:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def recv(self, timeout: float = 5.0) -> list[bytes]:
        assert self.sock.poll(timeout * 1000), "nothing from the worker"
        return self.sock.recv_multipart()

    def ready(self, timeout: float = 10.0) -> bytes:
        """The routing id of the next worker session that says READY."""
        deadline = time.monotonic() + timeout
        while True:
            frames = self.recv(max(0.01, deadline - time.monotonic()))
            if frames[2] == p.W_READY:
                return frames[0]

    def request(self, wid: bytes, rid: bytes, max_tokens: int | None = None) -> None:
        body = p.encode_generate("x", None, p.SamplingParams(max_tokens=max_tokens).encode())
        self.sock.send_multipart([wid, p.WORKER, p.W_REQUEST, b"client", rid, b"m", body])

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture
def fake_broker() -> Iterator[FakeBroker]:
    b = FakeBroker()
    try:
        yield b
    finally:
        b.close()


def run_worker(engine: Engine, cfg: WorkerConfig) -> tuple[Worker, threading.Thread]:
    loop = asyncio.new_event_loop()
    worker: list[Worker] = []
    made = threading.Event()

    def main() -> None:
        async def go() -> None:
            worker.append(Worker(engine, cfg))
            made.set()
            await worker[0].run()

        loop.run_until_complete(go())
        loop.close()

    t = threading.Thread(target=main, daemon=True)
    t.start()
    made.wait(5)
    w = worker[0]
    w.loop = loop  # type: ignore[attr-defined]
    return w, t


def stop_worker(w: Worker, t: threading.Thread) -> None:
    w.loop.call_soon_threadsafe(w.stop)  # type: ignore[attr-defined]
    t.join(10)
    assert not t.is_alive()


def records(frames: list[bytes]) -> list[list]:
    return p.decode_tokens(frames[5]) if frames[2] == p.W_TOKENS else []


def test_an_engine_failing_after_its_final_adds_no_second_final(fake_broker):
    """Defect 7 (worker side): the runtime never checked ``finished``, so an
    error raised while the engine's generator was closed sent a second final."""
    w, t = run_worker(FailingCleanup(), WorkerConfig(broker=fake_broker.endpoint))
    try:
        wid = fake_broker.ready()
        fake_broker.request(wid, b"r1")
        seen: Counter[bytes] = Counter()
        deadline = time.monotonic() + 1.5  # the engine is done in ~10 ms
        while (left := deadline - time.monotonic()) > 0:
            if fake_broker.sock.poll(left * 1000):
                for r in records(fake_broker.recv()):
                    if r[3] is not None:
                        seen[r[0]] += 1
        assert seen == {b"r1": 1}
    finally:
        stop_worker(w, t)


def test_a_request_read_while_a_session_ends_never_runs_into_the_next(fake_broker):
    """Defect 5 (worker side): while the runtime aborted its requests after
    losing the broker, the old socket still read; a REQUEST read then kept
    running, unknown to anyone, and its tokens went out in the next session."""
    cfg = WorkerConfig(
        broker=fake_broker.endpoint,
        heartbeat_interval=0.1,
        heartbeat_liveness=3,
        reconnect_initial=0.2,
    )
    w, t = run_worker(SlowAbort(), cfg)
    try:
        first = fake_broker.ready()
        fake_broker.request(first, b"old")
        # Silence from us: the worker gives up on this session after 0.3 s
        # and spends a second aborting "old"; a REQUEST lands in that window.
        silent_from = time.monotonic()
        while time.monotonic() - silent_from < 0.6:
            if fake_broker.sock.poll(50):
                fake_broker.recv()
        fake_broker.request(first, b"stale")
        second = fake_broker.ready()
        assert second != first
        fake_broker.sock.send_multipart([second, p.WORKER, p.W_HEARTBEAT])
        # The new session: nothing of "stale" (which would stream a token
        # every 50 ms) may come from it.
        deadline = time.monotonic() + 1.5
        leaked = []
        while (left := deadline - time.monotonic()) > 0:
            if fake_broker.sock.poll(left * 1000):
                frames = fake_broker.recv()
                leaked += [r for r in records(frames) if r[0] == b"stale"]
        assert leaked == []
    finally:
        stop_worker(w, t)
