"""Heartbeat intervals that differ between a client and the broker.

A client advertises its own interval on REQUEST and HEARTBEAT; the broker
expires it after max(broker interval, client interval) x liveness. So a
client with the default 1 s interval keeps a long stream alive through a
broker that heartbeats every 0.1 s, and a client that truly vanishes is
still cancelled, within its own interval x liveness.

The other way round, the broker answers each HEARTBEAT of a client with
requests in flight, so a client that heartbeats faster than the broker
hears from it at its own pace and does not take a slower broker for dead,
while a broker that truly stops is still noticed within the client's
interval x liveness.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from zserve import AsyncClient, Client
from zserve import protocol as p
from zserve.errors import BrokerUnreachable
from zserve.launcher import wait_for

BROKER_HB = ["--heartbeat-interval", "0.1", "--heartbeat-liveness", "3"]  # expiry 0.3 s
TOKEN_DELAY = 0.05
TOKENS = 50  # 2.5 s of stream: many broker expiries, more than two client intervals
PAST_BROKER_EXPIRY = 20  # tokens: 1 s of stream, three broker expiries


def _start(stack) -> None:
    stack.start_broker(*BROKER_HB)
    stack.worker("--model", "m", "--capacity", "4", "--token-delay", str(TOKEN_DELAY), *BROKER_HB)
    stack.wait_workers(1)


def _assert_nobody_expired(stack) -> None:
    st = stack.status()
    assert st["counters"].get("clients_expired", 0) == 0
    assert st["counters"].get("cancels", 0) == 0
    assert st["requests_in_flight"] == 0


def test_slow_heartbeat_sync_client_keeps_a_long_stream(stack):
    _start(stack)
    with Client(stack.frontend, timeout=30) as c:  # default interval: 1 s
        assert c.heartbeat_interval == p.HEARTBEAT_INTERVAL
        t0 = time.monotonic()
        r = c.generate("m", "x", max_tokens=TOKENS)
        assert time.monotonic() - t0 > 6 * 0.3  # outlived the broker's own expiry many times
    assert r.finish_reason == "length"
    assert r.token_ids == list(range(TOKENS))
    _assert_nobody_expired(stack)


def test_slow_heartbeat_async_client_keeps_long_streams(stack):
    _start(stack)

    async def run() -> list[list[int]]:
        async with AsyncClient(stack.frontend, timeout=30) as ac:

            async def one() -> list[int]:
                ids: list[int] = []
                async for d in ac.stream("m", "x", max_tokens=TOKENS):
                    ids.extend(d.token_ids or [])
                return ids

            return await asyncio.gather(one(), one(), one())

    assert asyncio.run(run()) == [list(range(TOKENS))] * 3
    _assert_nobody_expired(stack)


def test_vanished_slow_heartbeat_client_is_still_cancelled(stack):
    _start(stack)
    script = textwrap.dedent(
        f"""
        import sys
        from zserve import Client
        c = Client({stack.frontend!r}, heartbeat_interval=0.5)
        s = c.stream("m", "x", max_tokens=100000)
        next(s)
        print("streaming", flush=True)
        for i, _ in enumerate(s):  # keep reading (and heartbeating) until stopped
            if i == {PAST_BROKER_EXPIRY}:
                print("past the broker's expiry", flush=True)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "streaming"
        # Tokens every 0.05 s: this many take the stream well past the broker's
        # own 0.3 s expiry, so the client's interval is what counts.
        assert child.stdout.readline().strip() == "past the broker's expiry"
        assert stack.status()["workers"][0]["in_flight"] == 1
        # Freeze it: the connection stays open, so only its silence can tell.
        os.kill(child.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        wait_for(
            lambda: stack.status()["workers"][0]["in_flight"] == 0, 10, "request cancelled"
        )
        took = time.monotonic() - t0
        # 0.5 s x 3, less up to one interval since its last heartbeat: not the
        # broker's 0.3 s. (How much later it comes depends on the machine's
        # load; the deadline above is the generous bound.)
        assert took > 0.9, took
        assert stack.status()["counters"].get("clients_expired", 0) == 1
        wait_for(lambda: stack.status()["workers"][0]["queue_length"] == 0, 10, "worker idle")
    finally:
        child.kill()
        child.wait()


# ------------------------------------------------- the reverse: a fast client

SLOW_BROKER_HB = ["--heartbeat-interval", "1.0", "--heartbeat-liveness", "3"]
FAST_CLIENT_HB = 0.1  # client expiry 0.3 s, a third of the broker's interval
FIRST_TOKEN_DELAY = 1.5  # a long silence before the first token (a slow prefill)


def _start_slow_broker(stack) -> None:
    stack.start_broker(*SLOW_BROKER_HB)
    stack.worker(
        "--model", "m", "--capacity", "4", "--token-delay", str(FIRST_TOKEN_DELAY),
        *SLOW_BROKER_HB,
    )
    stack.wait_workers(1)


def test_fast_heartbeat_sync_client_waits_out_a_slow_broker(stack):
    """A client that heartbeats faster than the broker hears back at its own
    pace (the broker answers its HEARTBEAT), so a token that takes several
    client expiries to come is waited for, not taken for a dead broker."""
    _start_slow_broker(stack)
    with Client(stack.frontend, timeout=30, heartbeat_interval=FAST_CLIENT_HB) as c:
        t0 = time.monotonic()
        r = c.generate("m", "x", max_tokens=2)
        assert time.monotonic() - t0 > 2 * FIRST_TOKEN_DELAY - 0.1
    assert r.finish_reason == "length" and r.token_ids == [0, 1]
    _assert_nobody_expired(stack)


def test_fast_heartbeat_async_client_waits_out_a_slow_broker(stack):
    _start_slow_broker(stack)

    async def run() -> list[list[int]]:
        async with AsyncClient(
            stack.frontend, timeout=30, heartbeat_interval=FAST_CLIENT_HB
        ) as ac:

            async def one() -> list[int]:
                ids: list[int] = []
                async for d in ac.stream("m", "x", max_tokens=2):
                    ids.extend(d.token_ids or [])
                return ids

            return await asyncio.gather(one(), one())

    assert asyncio.run(run()) == [[0, 1]] * 2
    _assert_nobody_expired(stack)


VERY_SLOW_BROKER_HB = ["--heartbeat-interval", "10", "--heartbeat-liveness", "3"]  # 30 s


def test_fast_heartbeat_client_still_notices_a_frozen_broker(stack):
    """Answered heartbeats must not hide a broker that truly stops: frozen,
    it is declared unreachable by the client's own interval x liveness
    (0.3 s), long before the broker's would have run out (30 s here, so
    that the bound below is generous on a loaded machine)."""
    stack.start_broker(*VERY_SLOW_BROKER_HB)
    stack.worker("--model", "m", "--token-delay", "0.05", *VERY_SLOW_BROKER_HB)
    stack.wait_workers(1)
    with Client(stack.frontend, timeout=30, heartbeat_interval=FAST_CLIENT_HB) as c:
        s = c.stream("m", "x", max_tokens=1000)
        os.kill(stack.broker.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(BrokerUnreachable):
                for _ in s:
                    pass
            took = time.monotonic() - t0
        finally:
            os.kill(stack.broker.pid, signal.SIGCONT)
    assert took < 15, took  # the client's 0.3 s expiry, not the broker's 30 s


def test_sync_client_reads_what_waits_before_judging_a_broker_silent(stack):
    """CI: a status query ended with ``broker_unreachable ... went silent``
    on a loaded machine, its answer waiting in the socket: the client's
    thread had not run for longer than the expiry between its read and its
    judging of the broker's silence. What waits is read first."""
    # the broker gives the client 1.5 s (its own interval 0.5 x 3): the stall
    # below is one for the client's judgement only
    hb = ["--heartbeat-interval", "0.5", "--heartbeat-liveness", "3"]
    stack.start_broker(*hb)
    stack.worker("--model", "m", "--token-delay", str(TOKEN_DELAY), *hb)
    stack.wait_workers(1)
    with Client(stack.frontend, timeout=30, heartbeat_interval=FAST_CLIENT_HB) as c:
        s = c.stream("m", "x", max_tokens=TOKENS)
        ids = list(next(s).token_ids or [])
        read = c._read

        def stalled(timeout: float) -> None:
            """A read that found nothing, then the thread stalls for three
            expiries (0.9 s) while the worker's tokens keep coming."""
            c._read = read
            time.sleep(3 * c.expiry)

        c._read = stalled  # type: ignore[method-assign]
        for d in s:
            ids.extend(d.token_ids or [])
        assert c._read == read, "the stall was not exercised"
        assert c.resumes == 0 and c.handovers == 0
    assert ids == list(range(TOKENS))
    _assert_nobody_expired(stack)
