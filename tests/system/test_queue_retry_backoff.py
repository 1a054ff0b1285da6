"""The broker's queue and retries, and the worker's own view of a silent broker.

Real broker and worker processes on loopback. Each worker also serves a name
of its own (``w1``, ``w2``, ...) beside the shared model ``m``, so the
broker's status tells which process holds a request and the test can kill
exactly that one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_HB
from zserve import protocol as p
from zserve.client import Client
from zserve.errors import WorkerLost
from zserve.launcher import Proc, free_port, wait_for
from zserve.worker.engines.null import NullEngine
from zserve.worker.runtime import Worker, WorkerConfig

SLOW = ["--token-delay", "60"]  # never a first token while a test looks on


def named_worker(stack: Any, name: str, *args: str) -> Proc:
    return stack.worker("--model", "x", "--model-names", f"m,{name}", *args, *FAST_HB)


def client(stack: Any) -> Client:
    """A client that may sit between reads for a while: it advertises a long
    heartbeat interval, so the broker does not take it for vanished."""
    return stack.client(heartbeat_interval=5.0)


def holder(c: Client) -> str | None:
    """The name of the one worker with a request in flight, if exactly one has."""
    busy = [w for w in c.status()["workers"] if w["in_flight"]]
    if len(busy) != 1:
        return None
    return next(n for n in busy[0]["models"] if n != "m")


def queued(c: Client) -> int:
    return int(c.status()["queued"].get("m", 0))


# ------------------------------------------------------------------ queue


def test_cancelling_a_queued_request_removes_it_from_the_queue(stack):
    stack.start_broker(*FAST_HB)
    named_worker(stack, "w1", "--capacity", "1", "--token-delay", "0.05")
    stack.wait_workers(1)
    with client(stack) as c:
        running = c.stream("m", "a", max_tokens=100_000)
        assert next(running).text == "t0 "
        waiting = c.stream("m", "b", max_tokens=3)
        wait_for(lambda: queued(c) == 1, 10, "the second request queued")
        waiting.close()  # CANCEL while it waits for the worker
        wait_for(lambda: queued(c) == 0, 10, "the queue empty")
        assert c.status()["counters"]["cancels"] == 1
        running.close()
        wait_for(lambda: c.status()["workers"][0]["in_flight"] == 0, 10, "the worker free")
        # Had the cancelled request stayed queued, it would run before this one.
        assert c.generate("m", "c", max_tokens=2).text == "t0 t1 "
        (w,) = c.status()["workers"]
    assert w["dispatched"] == 2  # the running one and the last: never the cancelled one


# ---------------------------------------------------------------- retries


def test_retries_exhausted_end_in_worker_lost(stack):
    """A request whose worker dies before its first token is retried, at most
    MAX_RETRIES times; the next death ends it with worker_lost even though a
    healthy worker for the model is still there."""
    stack.start_broker(*FAST_HB)
    kills = p.MAX_RETRIES + 1
    procs = {
        f"w{i}": named_worker(stack, f"w{i}", "--capacity", "1", *SLOW) for i in range(kills + 1)
    }
    stack.wait_workers(kills + 1)
    with client(stack) as c:
        s = c.stream("m", "x", max_tokens=2)
        for _ in range(kills):
            name = wait_for(lambda: holder(c), 20, "the request on a worker")
            procs.pop(name).kill()
            wait_for(
                lambda n=name: all(n not in w["models"] for w in c.status()["workers"]),
                20,
                f"{name} expired",
            )
        with pytest.raises(WorkerLost):
            next(s)
        st = c.status()
    assert st["counters"]["retried"] == p.MAX_RETRIES
    assert st["counters"]["dispatched"] == kills
    (survivor,) = st["workers"]  # a worker was there: the limit ended it, not a lack of workers
    assert survivor["in_flight"] == 0 and survivor["dispatched"] == 0


def test_a_retried_request_goes_ahead_of_newer_ones(stack):
    stack.start_broker(*FAST_HB)
    w1 = named_worker(stack, "w1", "--capacity", "1", *SLOW)
    stack.wait_workers(1)
    with client(stack) as c:
        old = c.stream("m", "old", max_tokens=100_000)  # the oldest request, on w1
        wait_for(lambda: holder(c) == "w1", 10, "old on w1")
        named_worker(stack, "w2", "--capacity", "1", "--token-delay", "0.05")
        wait_for(lambda: len(c.status()["workers"]) == 2, 20, "w2 registered")
        blocker = c.stream("m", "blocker", max_tokens=100_000)  # takes w2's one slot
        assert next(blocker).text == "t0 "
        new = c.stream("m", "new", max_tokens=3)  # newer than old: waits in the queue
        wait_for(lambda: queued(c) == 1, 10, "new queued")
        w1.kill()  # old had no token yet: it is retried...
        wait_for(lambda: c.status()["counters"].get("retried") == 1, 20, "old retried")
        assert queued(c) == 2
        blocker.close()  # ...and when w2's slot frees, old (not new) gets it
        assert next(old).text == "t0 "
        assert queued(c) == 1  # new still waits: w2 is busy with old
        old.close()
        assert "".join(d.text for d in new) == "t0 t1 t2 "


# ------------------------------------------------------ worker backoff


_STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"


def _events(log: Path) -> list[tuple[float, str, float | None]]:
    """(time, "lost" | "ready", the announced delay) from a worker's log."""
    out: list[tuple[float, str, float | None]] = []
    for line in log.read_text().splitlines():
        m = re.match(_STAMP + r" \w+ zserve\.worker\.session: (.*)", line)
        if not m:
            continue
        t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        lost = re.match(r"broker lost: reconnecting in ([\d.]+) s", m.group(2))
        if lost:
            out.append((t, "lost", float(lost.group(1))))
        elif m.group(2).startswith("READY sent"):
            out.append((t, "ready", None))
    return out


def test_worker_detects_a_frozen_broker_and_backs_off_doubling(stack, tmp_path):
    """SIGSTOP the broker: it says nothing, not even DISCONNECT, so only the
    worker's own heartbeat clock can notice. The worker then reconnects after
    1 s, 2 s, 4 s (the defaults; nothing answers in between), and comes back
    once the broker does."""
    broker = stack.start_broker(*FAST_HB)
    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        stack.worker("--model", "m", *FAST_HB, log_level="info", stderr=f)
    stack.wait_workers(1)
    os.kill(broker.pid, signal.SIGSTOP)
    try:

        def three_retries() -> list[tuple[float, str, float | None]] | None:
            ev = _events(log)
            lost = [i for i, e in enumerate(ev) if e[1] == "lost"]
            return ev if len(lost) >= 3 and any(e[1] == "ready" for e in ev[lost[2] :]) else None

        ev = wait_for(three_retries, 60, "three reconnects")
    finally:
        os.kill(broker.pid, signal.SIGCONT)
    # READY (first session), then for each loss: the announced delay, and the
    # next READY no sooner than that delay later.
    assert ev[0][1] == "ready"
    gaps = []
    delays = []
    for i, (t, kind, delay) in enumerate(ev):
        if kind == "lost":
            nxt = next(e for e in ev[i + 1 :] if e[1] == "ready")
            delays.append(delay)
            gaps.append(nxt[0] - t)
    assert delays[:3] == [p.RECONNECT_INITIAL, 2 * p.RECONNECT_INITIAL, 4 * p.RECONNECT_INITIAL]
    assert p.RECONNECT_INITIAL == 1.0
    for gap, delay in zip(gaps[:3], delays[:3], strict=True):
        assert gap >= delay - 0.01, (gaps, delays)  # log stamps are to the millisecond
    # The broker is back: the worker registers again and serves.
    stack.wait_workers(1, timeout=30)
    with stack.client() as c:
        assert c.generate("m", "x", max_tokens=2).text == "t0 t1 "


def test_backoff_doubles_up_to_its_cap_and_resets_after_a_session(stack, caplog):
    """The same runtime with a short scale (the CLI keeps the 1 s / 32 s
    defaults): against an endpoint where nobody listens the delays double to
    the cap and stay there; a session in which the broker spoke resets them."""
    assert (WorkerConfig().reconnect_initial, WorkerConfig().reconnect_max) == (1.0, 32.0)
    assert (p.RECONNECT_INITIAL, p.RECONNECT_MAX) == (1.0, 32.0)
    caplog.set_level(logging.WARNING, logger="zserve.worker.session")
    port = free_port()
    cfg = WorkerConfig(
        broker=f"tcp://127.0.0.1:{port}",
        # (a session long enough to hear the broker on a loaded machine: with
        # 0.3 s of liveness, a CPU-starved worker took the new broker for lost
        # before hearing it, and that session's delay was not reset)
        heartbeat_interval=0.1,
        heartbeat_liveness=10,
        reconnect_initial=0.01,
        reconnect_max=0.08,
    )
    worker = Worker(NullEngine(["m"]), cfg)
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    t.start()

    def delays() -> list[float]:
        return [
            r.args[0]
            for r in caplog.records
            if r.name == "zserve.worker.session" and r.msg.startswith("broker lost")
        ]

    broker: Proc | None = None
    try:
        wait_for(lambda: len(delays()) >= 6, 30, "six reconnects")
        assert delays()[:6] == [0.01, 0.02, 0.04, 0.08, 0.08, 0.08]
        # A broker appears on that endpoint: the worker registers; when it goes
        # silent again, the backoff starts over from the initial delay.
        broker = stack.start_broker(
            "--heartbeat-interval", "0.02", frontend="tcp://127.0.0.1:*",
            backend=f"tcp://127.0.0.1:{port}",
        )  # fmt: skip
        stack.wait_workers(1, timeout=30)
        # The broker registering the worker is not the worker hearing it: a
        # connection can send READY and time out before the broker's first
        # heartbeat reaches a CPU-starved worker (that session's delay is
        # rightly not reset). Count from a connection in which it heard.
        session = worker.brokers[0]
        wait_for(lambda: session._heard, 30, "the worker heard the broker")
        n = len(delays())
        os.kill(broker.pid, signal.SIGSTOP)
        wait_for(lambda: len(delays()) > n, 30, "the frozen broker noticed")
        assert delays()[n] == 0.01
    finally:
        if broker is not None:
            os.kill(broker.pid, signal.SIGCONT)
        loop.call_soon_threadsafe(worker.stop)
        t.join(10)
        assert not t.is_alive()
        loop.close()
