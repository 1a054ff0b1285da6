"""The gateway under test: broker, null workers and ``zserve gateway`` as real
processes on ephemeral ports, one stack per test module.

Served models (all on the null engine, whose token i is ``t{i} ``):

* ``m``: capacity 16, instant tokens: the everyday model.
* ``slow``: capacity 1, 50 ms per token: disconnects must free its one slot.
* ``wide``: capacity 4, 20 ms per token: ``n`` choices must run at once.
* ``busy``: capacity 1, 50 ms per token, and the broker queues at most one
  request per model: the third concurrent request is turned away (429).

The gateway wants an API key (``KEY`` or ``KEY2``) on ``/v1/*``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import zmq

from tests.conftest import FAST_HB
from zserve import protocol as p
from zserve.client import Client
from zserve.launcher import (
    Proc,
    free_port,
    start_broker,
    start_worker,
    wait_for,
    wait_models,
    zserve_cmd,
)

KEY = "sk-test-1"
KEY2 = "sk-test-2"
MODELS = ["m", "slow", "wide", "busy"]


@dataclass
class GatewayStack:
    frontend: str
    backend: str
    root: str  # http://127.0.0.1:PORT
    procs: list[Proc] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def status(self) -> dict[str, Any]:
        with Client(self.frontend, timeout=10) as c:
            return c.status()

    def in_flight(self, model: str) -> int:
        return sum(w["in_flight"] for w in self.status()["workers"] if model in w["models"])

    def wait_idle(self, model: str, timeout: float = 15) -> None:
        wait_for(lambda: self.in_flight(model) == 0, timeout, f"{model} to have no request")

    def stop(self) -> None:
        for pr in reversed(self.procs):
            pr.stop()


def start_gateway(frontend: str, *args: str) -> tuple[Proc, str]:
    """``zserve gateway`` on a free port; returns it and its root URL once it
    answers HTTP (any status)."""
    port = free_port()
    proc = Proc(
        zserve_cmd(
            "gateway", "--broker", frontend, "--port", str(port), "--log-level", "warning", *args
        ),
        name="gateway",
    )
    root = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if not proc.alive():
            raise RuntimeError(f"gateway exited with {proc.popen.returncode}")
        try:
            httpx.get(root + "/health", timeout=10)
        except httpx.HTTPError:
            return False
        return True

    try:
        wait_for(answers, 30, "the gateway to listen")
    except BaseException:
        proc.stop()
        raise
    return proc, root


@pytest.fixture(scope="module")
def gw() -> Iterator[GatewayStack]:
    broker, fe, be = start_broker("--max-queue", "1", *FAST_HB)
    stack = GatewayStack(fe, be, "", [broker])
    try:
        for args in (
            ["--model", "m", "--capacity", "16"],
            ["--model", "slow", "--capacity", "1", "--token-delay", "0.05"],
            ["--model", "wide", "--capacity", "4", "--token-delay", "0.02"],
            ["--model", "busy", "--capacity", "1", "--token-delay", "0.05"],
        ):
            stack.procs.append(start_worker(be, "--engine", "null", *args, *FAST_HB))
        gateway, stack.root = start_gateway(fe, "--api-keys", f"{KEY},{KEY2}", *FAST_HB)
        stack.procs.append(gateway)
        wait_models(fe, MODELS, 30)
        yield stack
    finally:
        stack.stop()


class FakeWorker:
    """A worker speaking the ZSW protocol from a thread, for replies the null
    engine never gives: every request ends with ``engine_error``."""

    def __init__(self, backend: str, model: str) -> None:
        self.backend = backend
        self.model = model
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FakeWorker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.backend)
        info = p.WorkerInfo(models=[self.model], capacity=4, engine="fake")
        sock.send_multipart([p.WORKER, p.W_READY, info.encode()])
        beat = p.pack({"queue_length": 0})
        last = 0.0
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    frames = sock.recv_multipart()
                    if len(frames) == 6 and frames[1] == p.W_REQUEST:
                        # [ZSW1, REQUEST, client_id, request_id, model, body]
                        client, rid = frames[2], frames[3]
                        rec = p.error_record(rid, "engine_error", "the fake engine broke")
                        sock.send_multipart(
                            [
                                p.WORKER,
                                p.W_TOKENS,
                                client,
                                p.encode_header([rid], [rid]),
                                p.encode_tokens([rec]),
                            ]
                        )
                now = time.monotonic()
                if now - last > 0.1:
                    sock.send_multipart([p.WORKER, p.W_HEARTBEAT, beat])
                    last = now
            sock.send_multipart([p.WORKER, p.W_DISCONNECT])
        finally:
            sock.close(0)
