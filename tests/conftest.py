"""Shared fixtures: real zserve processes on loopback, ephemeral ports."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zserve.client import Client
from zserve.launcher import Proc, start_broker, start_worker, wait_for

# Short heartbeats keep failure tests fast; the defaults are 1 s x 3.
FAST_HB = ["--heartbeat-interval", "0.2", "--heartbeat-liveness", "3"]


class Stack:
    """A broker plus workers, all real processes, stopped at teardown."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.frontend = ""
        self.backend = ""
        self.broker: Proc | None = None

    def start_broker(self, *args: str, **kw: Any) -> Proc:
        proc, self.frontend, self.backend = start_broker(*args, **kw)
        self.broker = proc
        self.procs.append(proc)
        return proc

    def worker(self, *args: str, engine: str = "null", **kw: Any) -> Proc:
        proc = start_worker(self.backend, "--engine", engine, *args, **kw)
        self.procs.append(proc)
        return proc

    def client(self, **kw: Any) -> Client:
        kw.setdefault("timeout", 30)
        return Client(self.frontend, **kw)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def wait_workers(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            ws = self.status()["workers"]
            return ws if len(ws) == n else None

        return wait_for(ready, timeout, f"{n} registered workers")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def make_stack() -> Iterator[Callable[[], Stack]]:
    made: list[Stack] = []

    def make() -> Stack:
        s = Stack()
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()
