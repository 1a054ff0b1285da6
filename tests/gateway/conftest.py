"""The gateway under test: broker, null workers and ``zserve gateway`` as real
processes on ephemeral ports, one stack per test module.

Served models (all on the null engine, whose token i is ``t{i} ``):

* ``m``: capacity 16, instant tokens: the everyday model.
* ``slow``: capacity 1, 50 ms per token: disconnects must free its one slot.
* ``wide``: capacity 4, 20 ms per token: ``n`` choices must run at once.
* ``busy``: capacity 1, 50 ms per token, and the broker queues at most one
  request per model: the third concurrent request is turned away (429).
* ``broken``: the engine raises before the first token (``engine_error``).
* ``flaky``: the engine raises after two tokens (an error mid-stream).

The gateway wants an API key (``KEY`` or ``KEY2``) on ``/v1/*``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_HB
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
MODELS = ["m", "slow", "wide", "busy", "broken", "flaky"]


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


def start_gateway(frontend: str, *args: str, **popen: Any) -> tuple[Proc, str]:
    """``zserve gateway`` on a free port; returns it and its root URL once it
    answers HTTP (any status). ``popen``: for ``Proc`` (``env=...``)."""
    port = free_port()
    proc = Proc(
        zserve_cmd(
            "gateway", "--broker", frontend, "--port", str(port), "--log-level", "warning", *args
        ),
        name="gateway",
        **popen,
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
            ["--model", "broken", "--capacity", "4", "--engine-arg", "fail_after=0"],
            ["--model", "flaky", "--capacity", "4", "--engine-arg", "fail_after=2"],
        ):
            stack.procs.append(start_worker(be, "--engine", "null", *args, *FAST_HB))
        gateway, stack.root = start_gateway(fe, "--api-keys", f"{KEY},{KEY2}", *FAST_HB)
        stack.procs.append(gateway)
        wait_models(fe, MODELS, 30)
        yield stack
    finally:
        stack.stop()
