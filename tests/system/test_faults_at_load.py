"""Faults proven at load: real processes, many streams, one fault each.

* a worker SIGKILLed with 32 streams in flight out of 200 requests;
* a hung worker (SIGSTOP: its socket stays open, only its silence tells);
* a worker cut off from the network (its own network namespace, link down);
* the broker restarted under load.

Each checks that nothing hangs (every request ends within a deadline), that
every request is accounted for (its exact text, or a zserve error with a
code), that each got exactly one final record at the client, and that the
stack serves again afterwards. A request whose worker dies mid-stream
continues on another worker (exact resumption, on by default in the
client): the caller sees the whole null text, with no error (unless it
asked ``resume=False``: then ``worker_lost``). A broker restart is not
resumed: its callers get ``BrokerUnreachable``.

Deadlines are generous (the machine is small and shared); the only upper
bounds on time are the promises themselves: expiry within interval x
liveness + 1 s, callers told within their liveness, rejoin within 10 s.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from tests.conftest import FAST_HB
from tests.finals import count_finals, tap_records
from zserve.client import AsyncClient
from zserve.errors import BrokerUnreachable, ZServeError
from zserve.launcher import Proc, wait_for, zserve_cmd

HB_INTERVAL, HB_LIVENESS = 0.2, 3  # FAST_HB: a worker is expired after 0.6 s
EXPIRY_BOUND = HB_INTERVAL * HB_LIVENESS + 1.0  # the promise: interval x liveness + 1 s
DEADLINE = 60.0  # seconds any one phase may take before it counts as a hang
CODES = {
    "bad_request", "context_overflow", "model_not_found", "overloaded", "worker_lost",
    "timeout", "cancelled", "broker_unreachable", "engine_error", "protocol_error",
}  # fmt: skip


def expected(n: int) -> str:
    """The null engine's text for ``max_tokens=n``."""
    return "".join(f"t{i} " for i in range(n))


@dataclass
class Outcome:
    """What one request gave its caller."""

    text: str = ""
    deltas: int = 0
    error: ZServeError | None = None
    ended: float = 0.0  # monotonic time its stream ended

    def ok(self, n: int) -> bool:
        return self.error is None and self.text == expected(n)


async def consume(
    c: AsyncClient, out: Outcome, n: int, model: str = "m", resume: bool | None = None
) -> None:
    """Read one stream to its end into ``out``; a zserve error is an outcome,
    anything else fails the test."""
    try:
        async with c.stream(model, "x", max_tokens=n, resume=resume) as s:
            async for d in s:
                out.text += d.text
                out.deltas += 1
    except ZServeError as e:
        out.error = e
    out.ended = time.monotonic()


async def until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    """The async ``wait_for``: poll ``cond`` (sync or async) until truthy."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        v = cond()
        if inspect.isawaitable(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


def late_records(client: Any) -> list[bytes]:
    """Record every record that reaches ``client`` for a request id after that
    request's final record (a stale record from a worker that came back):
    there must be none."""
    finished: set[bytes] = set()
    late: list[bytes] = []

    def see(r: list[Any]) -> None:
        if r[0] in finished:
            late.append(r[0])
        elif r[3] is not None:
            finished.add(r[0])

    tap_records(client, see)
    return late


def _worker_by_capacity(st: dict[str, Any], capacity: int) -> dict[str, Any] | None:
    return next((w for w in st["workers"] if w["capacity"] == capacity), None)


def _check_accounted(outs: list[Outcome], n: int) -> list[Outcome]:
    """Every request completed with its exact text or ended with a zserve
    error that has a code; returns the failed ones."""
    failed = [o for o in outs if o.error is not None]
    for o in outs:
        assert o.ended, "a request never ended"
        if o.error is None:
            assert o.text == expected(n), f"wrong text: {o.text[:80]!r}..."
        else:
            assert o.error.code in CODES, o.error
    return failed


def _run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


# -------------------------------------------------- 1. SIGKILL at load

LOAD = 200  # requests
STREAMS = 32  # on the victim, streaming when it is killed
VICTIM_ROOM = 8  # more slots on the victim: filled, not started, when it dies
VICTIM_DELAY = 1.0  # s/token: its streams stay mid-stream and its last requests unstarted
TOKENS = 32
HEALTHY_DELAY = 0.02  # s/token: a healthy request takes 0.64 s
AFTER = 16  # requests after the kill
NO_RESUME = 4  # of the victim's streams, sent with resume=False


def test_worker_sigkilled_with_32_streams_in_flight_out_of_200(stack):
    stack.start_broker(*FAST_HB)
    cap = STREAMS + VICTIM_ROOM
    victim = stack.worker(
        "--model", "m", "--capacity", str(cap), "--token-delay", str(VICTIM_DELAY), *FAST_HB
    )
    stack.wait_workers(1)

    async def run() -> tuple[list[Outcome], list[Outcome], dict[str, Any], Any, int]:
        async with AsyncClient(stack.frontend, timeout=30) as c:
            finals = count_finals(c)
            first = [Outcome() for _ in range(STREAMS)]
            tasks = [
                asyncio.create_task(consume(c, o, TOKENS, resume=False if i < NO_RESUME else None))
                for i, o in enumerate(first)
            ]
            await until(lambda: all(o.deltas for o in first), DEADLINE, "32 streams started")
            for _ in range(2):
                stack.worker("--model", "m", "--token-delay", str(HEALTHY_DELAY), *FAST_HB)
            await asyncio.to_thread(stack.wait_workers, 3, DEADLINE)
            rest = [Outcome() for _ in range(LOAD - STREAMS)]
            tasks += [asyncio.create_task(consume(c, o, TOKENS)) for o in rest]

            async def all_dispatched() -> bool:
                # every request has reached a worker, and the victim took
                # some of the later ones (they wait a second for a token)
                st = await c.status()
                w = _worker_by_capacity(st, cap)
                return st["counters"]["dispatched"] >= LOAD and w["in_flight"] > STREAMS

            await until(all_dispatched, DEADLINE, "all 200 requests dispatched")
            victim.kill()
            await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)  # nothing hangs
            after = [Outcome() for _ in range(AFTER)]
            await asyncio.wait_for(
                asyncio.gather(*(consume(c, o, TOKENS) for o in after)), DEADLINE
            )
            st = await c.status()
            return first + rest, after, st, finals, c.resumes

    outs, after, st, finals, resumes = _run(run())
    assert finals.each_once()
    assert len(finals) >= LOAD + AFTER  # every request got its final (and only one)
    failed = _check_accounted(outs, TOKENS)
    counters = st["counters"]
    assert counters["workers_lost"] == 1
    # the victim's requests that had no token yet were dispatched again
    assert counters.get("retried", 0) >= 1, counters
    assert all(o.ok(TOKENS) for o in after), "a request after the kill failed"
    # started streams continued on the other workers: nobody saw an error
    # but those that asked not to be resumed, and each other stream the
    # broker ended mid-stream was resumed once
    assert failed == outs[:NO_RESUME], [str(o.error) for o in failed[:5]]
    assert all(o.error.code == "worker_lost" for o in failed)
    assert resumes == counters["worker_lost"] - NO_RESUME >= STREAMS - NO_RESUME
    assert st["requests_in_flight"] == 0


# -------------------------------------------------- 2. a hung worker

HUNG_TOKENS = 80
HUNG_DELAY = 0.05  # 4 s streams: still running when the hung worker comes back
HUNG_STREAMS = 8
VICTIM_CAP = 8  # tells the victim from the healthy worker (default capacity)


def _start_healthy(stack) -> None:
    """The healthy worker (the victim is started by the test)."""
    stack.worker("--model", "m", "--token-delay", str(HUNG_DELAY), *FAST_HB)


@dataclass
class Returned:
    """What a worker that vanished and came back left behind."""

    outs: list[Outcome]  # the streams running when it vanished
    after: list[Outcome]  # requests once it was back
    status: dict[str, Any]  # the broker's, at the end
    finals: Any
    late: list[bytes]
    resumes: int
    took: float  # seconds until the broker expired it


async def _expire_and_return(
    stack, freeze: Callable[[], None], thaw: Callable[[], None], *, bound: float | None
) -> Returned:
    """Streams on both workers; ``freeze`` the victim, wait until the broker
    has expired it, ``thaw`` it, wait until it has registered again, let
    every stream end, then send as many new requests again."""
    async with AsyncClient(stack.frontend, timeout=30) as c:
        finals = count_finals(c)
        late = late_records(c)
        outs = [Outcome() for _ in range(HUNG_STREAMS)]
        tasks = [asyncio.create_task(consume(c, o, HUNG_TOKENS)) for o in outs]
        await until(lambda: all(o.deltas >= 3 for o in outs), DEADLINE, "streams started")
        st = await c.status()
        assert _worker_by_capacity(st, VICTIM_CAP)["in_flight"] >= 1  # the victim serves some
        freeze()
        t0 = time.monotonic()
        try:

            async def expired() -> bool:
                return len((await c.status())["workers"]) == 1

            await until(expired, DEADLINE, "the victim expired")
            took = time.monotonic() - t0
        finally:
            thaw()
        if bound is not None:
            assert took <= bound, f"expired after {took:.2f} s, promised {bound:.2f} s"

        async def rejoined() -> bool:
            return len((await c.status())["workers"]) == 2

        await until(rejoined, DEADLINE, "the victim registered again")
        await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)
        # the victim serves again: new requests spread over both workers
        after = [Outcome() for _ in range(HUNG_STREAMS)]
        await asyncio.wait_for(
            asyncio.gather(*(consume(c, o, HUNG_TOKENS // 8) for o in after)), DEADLINE
        )
        st = await c.status()
        return Returned(outs, after, st, finals, late, c.resumes, took)


def _check_returned(r: Returned) -> None:
    assert r.finals.each_once()
    assert not r.late, f"stale records reached the client: {r.late[:5]}"
    failed = _check_accounted(r.outs, HUNG_TOKENS)
    # its streams continued on the healthy worker, exactly: no error
    assert not failed, [str(o.error) for o in failed[:5]]
    counters = r.status["counters"]
    assert counters["workers_lost"] == 1
    assert r.resumes == counters["worker_lost"] >= 1
    assert all(o.ok(HUNG_TOKENS // 8) for o in r.after)
    # registered again, and served
    victim = _worker_by_capacity(r.status, VICTIM_CAP)
    assert victim is not None and victim["dispatched"] >= 1, r.status["workers"]
    assert r.status["requests_in_flight"] == 0


def test_hung_worker_expired_resumed_elsewhere_and_rejoins_clean(stack):
    stack.start_broker(*FAST_HB)
    victim = stack.worker(
        "--model", "m", "--capacity", str(VICTIM_CAP), "--token-delay", str(HUNG_DELAY),
        *FAST_HB,
    )  # fmt: skip
    _start_healthy(stack)
    stack.wait_workers(2)
    try:
        res = _run(
            _expire_and_return(
                stack,
                lambda: os.kill(victim.pid, signal.SIGSTOP),
                lambda: os.kill(victim.pid, signal.SIGCONT),
                bound=EXPIRY_BOUND,
            )
        )
    finally:
        os.kill(victim.pid, signal.SIGCONT)  # a stopped process ignores SIGTERM
    _check_returned(res)


# -------------------------------------------------- 3. a worker cut off


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=20)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add), and this is not root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns is unavailable: {r.stderr.strip()}"
    return None


@contextmanager
def isolated_worker_link() -> Iterator[tuple[str, str, str]]:
    """A network namespace joined to this one by a veth pair in a private
    /30 (10.199.X.0/30, only ever on these two interfaces); yields (namespace,
    host-side interface, host-side address). Everything is removed on exit,
    and any process still in the namespace is killed first."""
    tag = f"{os.getpid() % 100000}"
    ns, host, peer = f"zsfault{tag}", f"zsh{tag}", f"zsn{tag}"
    x = os.getpid() % 250 + 1
    host_ip, ns_ip = f"10.199.{x}.1", f"10.199.{x}.2"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host, "type", "veth", "peer", "name", peer)
        _ip("link", "set", peer, "netns", ns)
        _ip("addr", "add", f"{host_ip}/30", "dev", host)
        _ip("link", "set", host, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", peer)
        _ip("netns", "exec", ns, "ip", "link", "set", peer, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, host, host_ip
    finally:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:  # only processes this test started live there
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _ip("link", "del", host, check=False)  # takes its peer with it
        _ip("netns", "del", ns, check=False)


def test_worker_cut_off_from_the_network_expires_and_rejoins(stack):
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    with isolated_worker_link() as (ns, host, host_ip):
        # the broker's backend on the host side of the veth (the healthy
        # worker reaches it too, without leaving this namespace)
        stack.start_broker(*FAST_HB, backend=f"tcp://{host_ip}:*")
        victim = Proc(
            [
                "ip", "netns", "exec", ns,
                *zserve_cmd(
                    "worker", "--broker", stack.backend, "--log-level", "warning",
                    "--engine", "null", "--model", "m", "--capacity", str(VICTIM_CAP),
                    "--token-delay", str(HUNG_DELAY), *FAST_HB,
                ),
            ],
            name="isolated worker",
        )  # fmt: skip
        stack.procs.append(victim)
        _start_healthy(stack)
        stack.wait_workers(2)
        try:
            res = _run(
                _expire_and_return(
                    stack,
                    lambda: _ip("link", "set", host, "down"),
                    lambda: _ip("link", "set", host, "up"),
                    bound=None,  # the worker may also be told by TCP
                )
            )
        finally:
            victim.stop()
    _check_returned(res)


# -------------------------------------------------- 4. broker restart


RESTART_STREAMS = 32
REJOIN_BOUND = 10.0


def test_broker_restarted_under_load(stack):
    broker = stack.start_broker(*FAST_HB)
    fe, be = stack.frontend, stack.backend
    for _ in range(2):
        stack.worker("--model", "m", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(2)

    async def run() -> tuple[list[Outcome], float, float, list[Outcome], Any]:
        async with AsyncClient(
            fe, timeout=30, heartbeat_interval=HB_INTERVAL, heartbeat_liveness=HB_LIVENESS
        ) as c:
            finals = count_finals(c)
            outs = [Outcome() for _ in range(RESTART_STREAMS)]
            tasks = [asyncio.create_task(consume(c, o, 10_000)) for o in outs]
            await until(lambda: all(o.deltas for o in outs), DEADLINE, "streams started")
            broker.kill()
            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), DEADLINE)  # nothing hangs
            told = max(o.ended for o in outs) - t0
            broker.stop()
            t1 = time.monotonic()
            await asyncio.to_thread(lambda: stack.start_broker(*FAST_HB, frontend=fe, backend=be))
            await asyncio.to_thread(stack.wait_workers, 2, REJOIN_BOUND + 5)
            rejoin = time.monotonic() - t1
            # the same client serves again
            after = [Outcome() for _ in range(RESTART_STREAMS)]
            await asyncio.wait_for(asyncio.gather(*(consume(c, o, 8) for o in after)), DEADLINE)
            return outs, told, rejoin, after, finals

    outs, told, rejoin, after, finals = _run(run())
    assert all(isinstance(o.error, BrokerUnreachable) for o in outs), {repr(o.error) for o in outs}
    # the client's liveness (0.6 s) plus one tick and the same slack as expiry
    assert told <= HB_INTERVAL * (HB_LIVENESS + 1) + 1.0, f"callers told after {told:.2f} s"
    assert rejoin <= REJOIN_BOUND, f"workers rejoined after {rejoin:.1f} s"
    assert all(o.ok(8) for o in after)
    assert finals.each_once()


def test_netns_helpers_leave_nothing(stack):
    """The namespace helper cleans up even when the body fails."""
    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    with pytest.raises(RuntimeError), isolated_worker_link() as (ns, host, _):
        child = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c",
                                  "import time; time.sleep(60)"])  # fmt: skip
        wait_for(lambda: str(child.pid) in _ip("netns", "pids", ns).stdout.split(), 20,
                 "the child in the namespace")  # fmt: skip
        raise RuntimeError("boom")
    assert child.wait(10) == -signal.SIGKILL
    assert ns not in _ip("netns", "list").stdout
    assert _ip("link", "show", host, check=False).returncode != 0
