"""Regression tests for the defects found in review (issue 12), each through
real processes over loopback: false broker silence, oversize replies, lost
cancels, stale streams after a broker restart, worker heartbeat intervals
and a graceful worker stop. Each failed on the code before its fix.

Every test that runs requests also counts the final records each request
got at the client (``tests.finals``): exactly one, whatever the path.
"""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from tests.finals import count_finals
from tests.gateway.conftest import start_gateway
from zserve import AsyncClient, BrokerUnreachable, Client, ZServeError
from zserve import protocol as p
from zserve.launcher import free_port, wait_for


def in_flight(stack, model: str = "m") -> int:
    return sum(w["in_flight"] for w in stack.status()["workers"] if model in w["models"])


def test_an_idle_client_does_not_take_a_healthy_broker_for_silent(stack):
    """Defect 1: liveness counted from the last message heard, even after
    seconds with nothing in flight; streams created together (the gateway's
    ``n``) did not reset it, so the first tick could end them all."""
    # The broker ticks every 5 s; what it says to the client comes only in
    # answer to the client's own heartbeats (or with tokens).
    stack.start_broker("--heartbeat-interval", "5")
    stack.worker("--model", "m", "--capacity", "4", "--token-delay", "1.5")
    stack.wait_workers(1)

    async def main() -> list[str]:
        async with AsyncClient(stack.frontend, timeout=30) as c:
            finals = count_finals(c)
            assert (await c.generate("m", "warm up", max_tokens=1)).text == "t0 "
            await asyncio.sleep(3.5)  # idle for longer than interval x liveness
            streams = [c.stream("m", f"p{i}", max_tokens=2) for i in range(3)]
            texts = []
            for s in streams:
                await s.start()
            for s in streams:
                texts.append("".join([d.text async for d in s]))
            assert finals.each_once()
            return texts

    assert asyncio.run(main()) == ["t0 t1 "] * 3


def test_requests_given_up_on_a_silent_broker_are_cancelled_when_it_answers(stack):
    """Defect 1: a client that gave up on a silent broker sent no CANCEL, so
    the workers ran those requests to max_tokens once the broker was back."""
    stack.start_broker()
    stack.worker("--model", "m", "--capacity", "4", "--token-delay", "0.1")
    stack.wait_workers(1)

    async def main() -> None:
        # The client gives up after 0.6 s of silence, well before the worker
        # (1 s x 3) would lose the broker and abort the requests itself.
        async with AsyncClient(stack.frontend, timeout=60, heartbeat_interval=0.2) as c:
            streams = [c.stream("m", "x", max_tokens=2000) for _ in range(3)]
            for s in streams:
                await s.start()
                await s.__anext__()
            stack.broker.kill(signal.SIGSTOP)
            try:
                for s in streams:
                    with pytest.raises(BrokerUnreachable):
                        async for _ in s:
                            pass
            finally:
                stack.broker.kill(signal.SIGCONT)
            # A new stream keeps the client talking, so the broker does not
            # cancel the old ones for a vanished client: only CANCELs can.
            keep = c.stream("m", "y", max_tokens=2000)
            await keep.start()
            await keep.__anext__()
            # 2000 tokens at 0.1 s each would keep them busy for minutes
            await asyncio.to_thread(
                wait_for, lambda: in_flight(stack) == 1, 15, "the given-up requests cancelled"
            )
            await keep.aclose()

    asyncio.run(main())


def test_a_huge_embedding_result_travels_in_pieces(stack):
    """Defect 2: one reply over the broker's message limit dropped the
    worker's connection (and every stream on it); now it is split."""
    stack.start_broker("--max-message-size", str(1_000_000))
    stack.worker("--model", "m")
    stack.wait_workers(1)
    texts = [f"text number {i}" for i in range(p.MAX_EMBED_INPUTS)]  # ~1.2 MB of vectors
    with stack.client() as c:
        finals = count_finals(c)
        vecs = c.embed("m", texts)
        assert len(vecs) == len(texts)
        assert finals.each_once()
    st = stack.status()
    assert st["counters"].get("workers_lost", 0) == 0
    assert st["workers"][0]["dispatched"] == 1


def test_oversize_requests_are_refused_at_the_edge(stack):
    """Defect 2: requests are bounded where they enter, with a clear error."""
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    proc, root = start_gateway(stack.frontend)
    stack.procs.append(proc)
    r = httpx.post(
        root + "/v1/embeddings", json={"model": "m", "input": ["x"] * 40_000}, timeout=30
    )
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "bad_request" and err["param"] == "input"
    with stack.client() as c:
        with pytest.raises(ZServeError) as e:
            c.generate("m", "x" * (p.MAX_REQUEST_SIZE + 1))
        assert e.value.code == "bad_request"
        with pytest.raises(ZServeError) as e:
            c.embed("m", ["x"] * (p.MAX_EMBED_INPUTS + 1))
        assert e.value.code == "bad_request"
        assert c.generate("m", "still fine", max_tokens=2).text == "t0 t1 "
    assert stack.status()["counters"].get("workers_lost", 0) == 0


def _fill_pipe_while_broker_stopped(c: Client) -> int:
    """Send requests until the client's pipe to the (stopped) broker is full."""
    n = 0
    with pytest.raises(BrokerUnreachable):
        while True:
            c.stream("nope", "x" * 20_000, max_tokens=1)
            n += 1
    return n


def test_a_cancel_that_meets_a_full_pipe_is_sent_later(stack):
    """Defect 4: the sync client dropped a CANCEL that found the pipe full."""
    stack.start_broker()
    stack.worker("--model", "m", "--token-delay", "0.1")
    stack.wait_workers(1)
    c = Client(stack.frontend, timeout=60, connect_timeout=0.5)
    try:
        s = c.stream("m", "x", max_tokens=2000)
        next(s)
        stack.broker.kill(signal.SIGSTOP)
        try:
            assert _fill_pipe_while_broker_stopped(c) > 0
            s.close()  # the CANCEL finds no room
        finally:
            stack.broker.kill(signal.SIGCONT)
        c.connect_timeout = 30
        # The client's next calls send what waited (and, asking the broker,
        # keep it from taking the client for vanished and cancelling for it).
        wait_for(
            lambda: sum(w["in_flight"] for w in c.status()["workers"]) == 0,
            15,
            "the request cancelled on the worker",
        )
    finally:
        c.close()


def test_a_cancel_behind_a_queued_request_is_not_lost(stack):
    """Defect 4: an async stream closed while its REQUEST still waited for
    room dropped its CANCEL; the REQUEST went out later and ran to the end."""
    # A long liveness on both sides: on a loaded machine the SIGSTOP below
    # can last longer than the default 3 s, and a worker that left the
    # stopped broker is not there for the request (it ends model_not_found
    # before any CANCEL could matter).
    slow_hb = ("--heartbeat-liveness", "60")
    stack.start_broker(*slow_hb)
    stack.worker("--model", "m", "--capacity", "2", "--token-delay", "0.1", *slow_hb)
    stack.wait_workers(1)

    async def main() -> None:
        async with AsyncClient(stack.frontend, timeout=120, connect_timeout=60) as c:
            stack.broker.kill(signal.SIGSTOP)
            try:
                fill = [c.stream("nope", "x" * 20_000, max_tokens=1) for _ in range(3000)]
                starts = [asyncio.ensure_future(s.start()) for s in fill]
                target = c.stream("m", "x", max_tokens=2000)
                start = asyncio.ensure_future(target.start())
                await asyncio.sleep(0.5)
                assert not start.done(), "the pipe did not fill up"
                await target.aclose()  # the REQUEST is still queued
            finally:
                stack.broker.kill(signal.SIGCONT)
            await asyncio.gather(start, *starts)
            for s in fill:
                await s.aclose()
            # Polled through this client, so the broker does not take it for
            # vanished (and cancel its requests for that reason). The CANCEL
            # must reach the broker while it holds the REQUEST (queued or
            # dispatched: on a loaded machine the SIGSTOP can outlast the
            # worker's liveness, and it registers again meanwhile).
            deadline = time.monotonic() + 30
            while True:
                st = await c.status()
                n = st["counters"]
                if (n.get("requests", 0) > len(fill) and n.get("cancels", 0) >= 1
                        and not any(w["in_flight"] for w in st["workers"])):  # fmt: skip
                    break
                assert time.monotonic() < deadline, f"request not cancelled: {st['workers']}"
                await asyncio.sleep(0.1)

    asyncio.run(main())


def test_streams_of_a_restarted_broker_end_at_once(make_stack):
    """Defect 6: silence was judged per client; after a broker restart, a
    new request's heartbeats kept the old streams waiting out their timeout.
    (Now a stream that can resume continues through the restarted broker
    from its ids, and one that cannot ends at once.)"""
    fe, be = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    stack = make_stack()
    stack.start_broker(frontend=fe, backend=be)
    stack.worker("--model", "m", "--capacity", "4", "--token-delay", "0.5")
    stack.wait_workers(1)

    async def main() -> None:
        # A long liveness: the restart is over before the client could take
        # the broker for silent; only the new broker can say it lost "old".
        async with AsyncClient(stack.frontend, timeout=600, heartbeat_liveness=15) as c:
            finals = count_finals(c)
            old = c.stream("m", "x", max_tokens=1000, resume=False)
            await old.start()
            await old.__anext__()
            kept = c.stream("m", "x", max_tokens=1000)
            await kept.start()
            await kept.__anext__()
            stack.broker.kill(signal.SIGKILL)
            stack.broker.popen.wait(5)
            stack.start_broker(frontend=fe, backend=be)
            await asyncio.to_thread(stack.wait_workers, 1)
            new = c.stream("m", "y", max_tokens=30)
            await new.start()

            async def drain() -> None:
                async for _ in old:
                    pass

            with pytest.raises(BrokerUnreachable):
                await asyncio.wait_for(drain(), 30)  # not its 600 s timeout
            assert "".join([d.text async for d in new]).startswith("t0 t1 ")
            d = await asyncio.wait_for(kept.__anext__(), 30)
            assert d.token_ids == [1]  # where it was: the resumable stream continues
            await kept.aclose()
            assert finals.each_once()

    asyncio.run(main())


def test_workers_and_brokers_with_different_heartbeat_intervals_keep_each_other(stack):
    """Defect 8: a worker could not advertise its interval, so a broker with
    a short one expired idle default workers in a loop (and a fast worker
    took a slow broker for dead)."""
    stack.start_broker("--heartbeat-interval", "0.2")
    stack.worker("--model", "slow-hb", "--heartbeat-interval", "1")
    stack.worker("--model", "fast-hb", "--heartbeat-interval", "0.05")
    stack.wait_workers(2)
    ids = {w["id"] for w in stack.status()["workers"]}
    deadline = time.monotonic() + 4  # several of either side's expiry
    while time.monotonic() < deadline:
        st = stack.status()
        assert {w["id"] for w in st["workers"]} == ids
        time.sleep(0.2)  # sampling the registry, not waiting on it
    assert st["counters"].get("workers_lost", 0) == 0
    assert st["counters"]["workers_registered"] == 2


def test_a_worker_stopped_gracefully_hands_back_what_it_has_not_started(stack):
    """Defect 5: on shutdown the worker drained first and said DISCONNECT
    last, so its requests ended ``cancelled`` (and new ones could be sent
    into the drain). Now (issue 23) it says DRAIN first, and at its drain
    deadline gives back what has sent nothing yet (REFUSE): the broker
    dispatches it elsewhere, unseen, and not as a retry."""
    stack.start_broker()
    leaving = stack.worker("--model", "m", "--token-delay", "3", "--drain-timeout", "0")
    stack.wait_workers(1)
    with stack.client() as c:
        finals = count_finals(c)
        s = c.stream("m", "x", max_tokens=2)
        wait_for(lambda: in_flight(stack) == 1, 10, "the request on the first worker")
        stack.worker("--model", "m")
        stack.wait_workers(2)
        leaving.kill(signal.SIGTERM)
        assert "".join(d.text for d in s) == "t0 t1 "
        assert finals.each_once()
    counters = stack.status()["counters"]
    assert counters.get("retried", 0) == 0 and counters["refused"] == 1
