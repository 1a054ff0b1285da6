"""Dispatch policies, capacity, queueing, overload, cancel, unknown model."""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest

from tests.conftest import FAST_HB
from zserve import AsyncClient, ModelNotFound, Overloaded, Timeout
from zserve.launcher import wait_for


def _in_flight(stack):
    return sorted(w["in_flight"] for w in stack.status()["workers"])


def test_shortest_queue_spreads_long_requests_evenly(stack):
    stack.start_broker("--dispatch", "shortest_queue")
    for _ in range(3):
        stack.worker("--model", "m", "--capacity", "8", "--token-delay", "0.05")
    stack.wait_workers(3)
    with stack.client() as c:
        streams = [c.stream("m", "x", max_tokens=200) for _ in range(12)]
        wait_for(lambda: sum(_in_flight(stack)) == 12, 10, "12 requests dispatched")
        assert _in_flight(stack) == [4, 4, 4]
        for s in streams:
            s.close()
    wait_for(lambda: sum(_in_flight(stack)) == 0, 10, "cancels to free every slot")
    wait_for(
        lambda: all(w["queue_length"] == 0 for w in stack.status()["workers"]),
        20,
        "every worker idle",
    )


def test_lottery_dispatches_in_proportion_to_speed(stack):
    stack.start_broker("--dispatch", "lottery")
    stack.worker("--model", "m", "--speed", "1", "--capacity", "4")
    stack.worker("--model", "m", "--speed", "3", "--capacity", "4")
    stack.wait_workers(2)
    with stack.client() as c:
        for _ in range(400):
            c.generate("m", "x", max_tokens=1)
    by_speed = {w["speed"]: w["dispatched"] for w in stack.status()["workers"]}
    assert by_speed[1.0] + by_speed[3.0] == 400
    assert 0.67 < by_speed[3.0] / 400 < 0.83  # expected 0.75; +-4 sigma


def test_capacity_never_exceeded_and_excess_queues(stack):
    stack.start_broker()
    stack.worker("--model", "m", "--capacity", "2", "--token-delay", "0.02")

    async def run():
        async with AsyncClient(stack.frontend) as ac:
            tasks = [asyncio.create_task(ac.generate("m", "x", max_tokens=25)) for _ in range(6)]
            peak = 0
            while not all(t.done() for t in tasks):
                st = await ac.status()
                if st["workers"]:
                    peak = max(peak, st["workers"][0]["in_flight"])
                    assert st["workers"][0]["in_flight"] <= 2
                await asyncio.sleep(0.02)
            return peak, [t.result() for t in tasks]

    stack.wait_workers(1)
    peak, results = asyncio.run(run())
    assert peak == 2
    assert all(r.usage["completion_tokens"] == 25 for r in results)


def test_full_queue_answers_overloaded_at_once(stack):
    stack.start_broker("--max-queue", "1")
    stack.worker("--model", "m", "--capacity", "1", "--token-delay", "0.05")
    stack.wait_workers(1)
    with stack.client() as c:
        running = c.stream("m", "x", max_tokens=400)
        wait_for(lambda: _in_flight(stack) == [1], 20, "first request running")
        queued = c.stream("m", "x", max_tokens=2)
        wait_for(lambda: stack.status()["queued"] == {"m": 1}, 20, "second request queued")
        with pytest.raises(Overloaded, match="queue"):
            c.generate("m", "x", max_tokens=1)
        running.close()  # frees the slot: the queued one runs
        assert "".join(d.text for d in queued) == "t0 t1 "


def test_queue_timeout(stack):
    stack.start_broker("--queue-timeout", "0.3", *FAST_HB)
    stack.worker("--model", "m", "--capacity", "1", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    with stack.client() as c:
        hog = c.stream("m", "x", max_tokens=1000)
        wait_for(lambda: _in_flight(stack) == [1], 20, "hog running")
        with pytest.raises(Timeout, match="no free worker"):
            c.generate("m", "x", max_tokens=1)
        hog.close()


def test_unknown_model_answers_at_once(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    with stack.client() as c, pytest.raises(ModelNotFound, match="nope"):
        c.generate("nope", "x")


def test_cancel_frees_capacity(stack):
    stack.start_broker()
    stack.worker("--model", "m", "--capacity", "1", "--token-delay", "0.05")
    stack.wait_workers(1)
    with stack.client() as c:
        s = c.stream("m", "x", max_tokens=10_000)
        assert next(s).text == "t0 "
        s.close()
        wait_for(lambda: _in_flight(stack) == [0], 20, "the slot freed")
        wait_for(
            lambda: stack.status()["workers"][0]["queue_length"] == 0, 5, "worker idle"
        )
        assert c.generate("m", "x", max_tokens=2).text == "t0 t1 "
    assert stack.status()["counters"]["cancels"] == 1


def test_async_client_many_streams_one_socket(stack):
    stack.start_broker()
    stack.worker("--model", "m", "--capacity", "64")
    stack.wait_workers(1)

    async def run():
        async with AsyncClient(stack.frontend) as ac:
            async def one(n):
                parts = []
                async for d in ac.stream("m", "x", max_tokens=n):
                    parts.append(d.text)
                return "".join(parts)

            return await asyncio.gather(*(one(n) for n in range(1, 65)))

    texts = asyncio.run(run())
    assert [len(t.split()) for t in texts] == list(range(1, 65))


def test_threads_each_with_own_client(stack):
    stack.start_broker()
    stack.worker("--model", "m", "--capacity", "8")
    stack.wait_workers(1)

    def job(i):
        with stack.client() as c:
            return c.generate("m", "x", max_tokens=i + 1).usage["completion_tokens"]

    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        assert list(ex.map(job, range(8))) == list(range(1, 9))
