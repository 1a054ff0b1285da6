"""Workers on several brokers: one capacity, refusals no caller sees, no
request waiting while a worker idles, ``zserve status`` and ``zserve run``
with several brokers.

Real broker and worker processes on loopback, ephemeral ports; every wait
has a deadline, generous because the test machine's cores are shared.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import FAST_HB, kill_children, start_run, wait_children_gone
from tests.finals import count_finals
from zserve.client import AsyncClient, Client
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for, zserve_cmd

HB = 0.2  # FAST_HB's interval: brokers and workers heartbeat every 0.2 s
CAPACITY = 4
TOKENS = 8
TEXT = "".join(f"t{i} " for i in range(TOKENS))
# 0.03 s a token: a request holds its slot for about a quarter of a second,
# about one heartbeat, so a broker's view of the other's load is often stale.
PACE = ["--engine", "null", "--model", "m", "--token-delay", "0.03", *FAST_HB]


class Brokers:
    """Brokers and workers, every one a real process, all stopped at teardown."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.frontends: list[str] = []
        self.backends: list[str] = []

    def broker(self, *args: str) -> str:
        proc, fe, be = start_broker(*FAST_HB, *args)
        self.procs.append(proc)
        self.frontends.append(fe)
        self.backends.append(be)
        return fe

    def worker(self, backends: list[str], *args: str) -> Proc:
        proc = start_worker(",".join(backends), *args)
        self.procs.append(proc)
        return proc

    def status(self, frontend: str) -> dict[str, Any]:
        with Client(frontend, timeout=20) as c:
            return c.status()

    def wait_registered(self, n: int, timeout: float = 30) -> None:
        """Every broker has ``n`` workers."""
        for fe in self.frontends:
            wait_for(
                lambda fe=fe: len(self.status(fe)["workers"]) == n, timeout, f"{n} workers at {fe}"
            )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()


@pytest.fixture
def brokers() -> Iterator[Brokers]:
    b = Brokers()
    try:
        yield b
    finally:
        b.stop()


async def hammer(frontend: str, n: int, tag: str) -> tuple[list[str], Any]:
    """``n`` requests at once through the broker at ``frontend``; their texts,
    and the finals each got (counted at the client)."""
    async with AsyncClient(frontend, timeout=60) as c:
        finals = count_finals(c)
        done = await asyncio.gather(
            *(c.generate("m", f"{tag} {i}", max_tokens=TOKENS) for i in range(n))
        )
    return [r.text for r in done], finals


def load_from_both(frontends: list[str], n: int) -> list[tuple[list[str], Any]]:
    async def both() -> list[tuple[list[str], Any]]:
        return list(
            await asyncio.gather(*(hammer(fe, n, f"b{i}") for i, fe in enumerate(frontends)))
        )

    return asyncio.run(both())


class Sampler(threading.Thread):
    """Every broker's status, over and over, until stopped: (time, statuses)."""

    def __init__(self, frontends: list[str]) -> None:
        super().__init__(daemon=True)
        self.frontends = frontends
        self.samples: list[tuple[float, list[dict[str, Any]]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        clients = [Client(fe, timeout=20) for fe in self.frontends]
        try:
            while not self.done.is_set():
                sts = [c.status() for c in clients]
                self.samples.append((time.monotonic(), sts))
                self.done.wait(0.02)
        finally:
            for c in clients:
                c.close()


def worker_view(sts: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per worker (by instance id): in flight over every broker, and the
    highest queue length and peak it reported."""
    out: dict[str, dict[str, int]] = {}
    for st in sts:
        for w in st["workers"]:
            v = out.setdefault(
                w["worker_id"], {"in_flight": 0, "peak": 0, "refused": 0, "brokers": 0}
            )
            v["in_flight"] += w["in_flight"]
            v["peak"] = max(v["peak"], w["peak_queue_length"])
            v["refused"] += w["refused"]
            v["brokers"] += 1
    return out


def test_a_worker_on_two_brokers_never_runs_past_its_capacity(brokers):
    """Two clients, each on its own broker, each with four times the
    worker's capacity at once: both brokers see a free worker and dispatch
    to it, the worker refuses what it cannot take, and the brokers send
    that on later. The worker's own count never passes its capacity, and
    every caller gets its whole text, with one final each."""
    for _ in range(2):
        brokers.broker()
    brokers.worker(brokers.backends, *PACE, "--capacity", str(CAPACITY))
    brokers.wait_registered(1)
    results = load_from_both(brokers.frontends, 4 * CAPACITY)
    for texts, finals in results:
        assert texts == [TEXT] * (4 * CAPACITY)
        assert finals.each_once() and len(finals) == 4 * CAPACITY
    # What the worker reported in its heartbeats (after the load: the last
    # one carries the highest count it ever ran at once).
    time.sleep(3 * HB)
    (view,) = worker_view([brokers.status(fe) for fe in brokers.frontends]).values()
    assert view["brokers"] == 2
    assert view["peak"] == CAPACITY  # full, and never past it
    # Both brokers dispatched to it before either heard of the other's load:
    # it refused, and no caller noticed.
    assert view["refused"] >= 1
    counters = [brokers.status(fe)["counters"] for fe in brokers.frontends]
    assert sum(c.get("refused", 0) for c in counters) == view["refused"]
    assert all(c.get("retried", 0) == 0 for c in counters)  # a refusal is not a retry
    assert all(c.get("error.worker_lost", 0) == 0 for c in counters)


def test_no_request_waits_while_a_worker_idles(brokers):
    """Two workers on both brokers, twice their joint capacity queued on
    each broker. Sampling both brokers over and over: whenever requests
    wait in a queue, no worker has nothing in flight on every broker for
    longer than two heartbeats (the time a broker may take to hear that
    the other broker's requests there are done)."""
    for _ in range(2):
        brokers.broker()
    for _ in range(2):
        brokers.worker(brokers.backends, *PACE, "--capacity", str(CAPACITY))
    brokers.wait_registered(2)
    sampler = Sampler(brokers.frontends)
    sampler.start()
    try:
        wait_for(lambda: len(sampler.samples) >= 3, 30, "the sampler running")
        results = load_from_both(brokers.frontends, 4 * 2 * CAPACITY)
    finally:
        sampler.done.set()
        sampler.join(30)
    for texts, finals in results:
        assert texts == [TEXT] * (8 * CAPACITY)
        assert finals.each_once()
    # Longest time a worker sat idle while requests were queued somewhere.
    idle_since: dict[str, float] = {}
    longest: dict[str, float] = {}
    queued_samples = 0
    for t, sts in sampler.samples:
        queued = sum(sum(st["queued"].values()) for st in sts)
        queued_samples += queued > 0
        for wid, v in worker_view(sts).items():
            if queued and v["in_flight"] == 0:
                start = idle_since.setdefault(wid, t)
                longest[wid] = max(longest.get(wid, 0.0), t - start)
            else:
                idle_since.pop(wid, None)
    assert queued_samples >= 5, "the load never queued: the check saw nothing"
    assert len(worker_view(sampler.samples[-1][1])) == 2
    worst = max(longest.values(), default=0.0)
    assert worst <= 2 * HB + 0.3, f"a worker idled {worst:.2f} s while requests waited"
    after = worker_view([brokers.status(fe) for fe in brokers.frontends])
    assert all(v["peak"] <= CAPACITY for v in after.values())


def _zserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(zserve_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_status_shows_each_broker_and_every_worker_once(brokers):
    fe1 = brokers.broker()
    fe2 = brokers.broker()
    brokers.worker(brokers.backends, "--engine", "null", "--model", "both", *FAST_HB)
    brokers.worker(brokers.backends[:1], "--engine", "null", "--model", "first", *FAST_HB)
    wait_for(lambda: len(brokers.status(fe1)["workers"]) == 2, 30, "two workers at broker 1")
    wait_for(lambda: len(brokers.status(fe2)["workers"]) == 1, 30, "one worker at broker 2")
    r = _zserve("status", "--broker", fe1, "--broker", fe2, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(b["broker"], b["reachable"]) for b in out["brokers"]] == [(fe1, True), (fe2, True)]
    assert [b["workers"] for b in out["brokers"]] == [2, 1]
    assert out["models"] == ["both", "first"]
    by_model = {tuple(w["models"]): w for w in out["workers"]}
    assert len(out["workers"]) == 2  # the worker on both brokers appears once
    assert by_model[("both",)]["brokers"] == [fe1, fe2]
    assert by_model[("first",)]["brokers"] == [fe1]
    # A comma list, a broker that is not there: each broker is shown,
    # reachable or not; the answer stands while one broker answers.
    gone = f"tcp://127.0.0.1:{free_port()}"
    r = _zserve("status", "--broker", f"{fe1},{fe2}", "--broker", gone, "--timeout", "2")
    assert r.returncode == 0, r.stderr
    for addr in (fe1, fe2, gone):
        assert addr in r.stdout
    assert "unreachable" in r.stdout and "2 of 3 reachable" in r.stdout
    assert "broker_unreachable" in r.stderr and gone in r.stderr
    gone_too = f"tcp://127.0.0.1:{free_port()}"
    r = _zserve("status", "--broker", gone, "--broker", gone_too, "--timeout", "2", "--json")
    assert r.returncode == 8  # none answers: broker_unreachable
    assert [b["reachable"] for b in json.loads(r.stdout)["brokers"]] == [False, False]


def test_run_with_two_brokers_serves_on_each_then_stops_everything():
    import psutil
    proc, fe, gw, lines = start_run("--engine", "null", "--brokers", "2", deadline_s=120)
    children: list[Any] = []
    try:
        out = "".join(lines)
        # "  broker 1        : frontend tcp://..., backend tcp://..."
        frontends = [
            ln.split("frontend ")[1].split(",")[0]
            for ln in lines
            if ln.strip().startswith("broker ")
        ]
        assert len(frontends) == 2 and frontends[0] == fe, out
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 4  # two brokers, the worker, the gateway
        ids = set()
        for address in frontends:  # one worker, on both
            with Client(address, timeout=20) as c:
                assert c.generate("tiny", "hi", max_tokens=3).text == "t0 t1 t2 "
                (w,) = c.status()["workers"]
                ids.add(w["worker_id"])
        assert len(ids) == 1
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(60) == 0
        wait_children_gone(children, 30)
    finally:
        proc.stop()
        kill_children(children)
