"""Planned stops cost callers nothing: a worker told to stop drains, a broker
told to stop says goodbye, and a restarted broker never ends a stream.

Real broker and worker processes over loopback; null workers paced with
``--token-delay`` (token i is ``t{i} ``, id i: a continued stream is exact).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.finals import count_finals
from tests.system.test_resume import PROMPT, _greedy_stack, read
from zserve import AsyncClient, BrokerUnreachable, Client
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for, zserve_cmd
from zserve.status import cluster_status


def want(n: int) -> str:
    return "".join(f"t{i} " for i in range(n))


def worker_state(stack: Any, pid: int) -> dict[str, Any] | None:
    return next((w for w in stack.status()["workers"] if w["pid"] == pid), None)


def draining(stack: Any, pid: int) -> dict[str, Any] | None:
    """The worker's status entry once the broker shows it draining."""
    w = worker_state(stack, pid)
    return w if w is not None and w["draining"] else None


async def open_streams(c: AsyncClient, n: int, tokens: int, first: int = 3) -> list[Any]:
    """``n`` streams of ``tokens`` tokens, each read until ``first`` arrived."""
    streams = [c.stream("m", "x", max_tokens=tokens) for _ in range(n)]
    for s in streams:
        await s.start()
    heads = [[await s.__anext__() for _ in range(first)] for s in streams]
    return list(zip(streams, heads, strict=True))


async def read_all(pairs: list[Any]) -> list[str]:
    async def rest(s: Any, head: list[Any]) -> str:
        return "".join(d.text for d in head) + "".join([d.text async for d in s])

    return list(await asyncio.gather(*(rest(s, h) for s, h in pairs)))


# ------------------------------------------------------------ worker drain


def test_the_only_worker_finishes_its_streams_on_sigterm(stack) -> None:
    """The issue's defect: SIGTERM to the only worker of a model ended its
    streams ``worker_lost``. Now they finish there (the grace is longer
    than they are), nothing is handed over, and it exits when it holds
    nothing; the broker showed it draining meanwhile."""
    stack.start_broker()
    w = stack.worker("--model", "m", "--capacity", "8", "--token-delay", "0.05",
                     "--drain-timeout", "30")  # fmt: skip
    stack.wait_workers(1)

    async def main() -> None:
        async with AsyncClient(stack.frontend, timeout=30) as c:
            finals = count_finals(c)
            pairs = await open_streams(c, 4, 50)  # 2.5 s of generation left
            w.kill(signal.SIGTERM)
            st = await asyncio.to_thread(
                wait_for, lambda: draining(stack, w.pid), 5, "the worker draining at the broker"
            )
            assert st["in_flight"] == 4
            assert await read_all(pairs) == [want(50)] * 4
            assert c.resumes == 0 and c.handovers == 0
            assert finals.each_once()

    asyncio.run(main())
    assert w.popen.wait(10) == 0
    counters = stack.status()["counters"]
    assert counters["drains"] == 1 and "handovers" not in counters
    assert counters.get("worker_lost", 0) == 0


def test_streams_outliving_the_grace_are_handed_over_exactly(stack) -> None:
    """Grace shorter than the streams: at the deadline they move to the
    other worker, from the ids delivered; the callers see one stream. The
    broker stops dispatching to the draining worker at once."""
    stack.start_broker()
    a = stack.worker("--model", "m", "--capacity", "8", "--token-delay", "0.05",
                     "--drain-timeout", "0.5")  # fmt: skip
    stack.wait_workers(1)

    async def main() -> None:
        async with AsyncClient(stack.frontend, timeout=30) as c:
            finals = count_finals(c)
            pairs = await open_streams(c, 4, 60)
            await asyncio.to_thread(
                stack.worker, "--model", "m", "--capacity", "8", "--token-delay", "0.05"
            )
            await asyncio.to_thread(stack.wait_workers, 2)
            a.kill(signal.SIGTERM)
            await asyncio.to_thread(
                wait_for, lambda: draining(stack, a.pid), 5, "the worker draining at the broker"
            )
            new = await c.generate("m", "y", max_tokens=2)  # goes to the other one
            assert new.text == "t0 t1 "
            assert await read_all(pairs) == [want(60)] * 4
            assert c.handovers == 4 and c.resumes == 0
            assert finals.each_once()

    asyncio.run(main())
    assert a.popen.wait(10) == 0
    st = stack.status()
    assert st["counters"]["handovers"] == 4
    assert st["counters"].get("worker_lost", 0) == 0
    (b,) = st["workers"]
    assert b["dispatched"] == 5  # the new request and the 4 continuations


def test_zserve_drain_then_a_second_signal_hands_over_at_once(stack) -> None:
    """``zserve drain WORKER`` through the broker starts the drain (status
    shows it); a SIGTERM after it skips the grace: the streams move at once."""
    stack.start_broker()
    a = stack.worker("--model", "m", "--capacity", "8", "--token-delay", "0.05",
                     "--drain-timeout", "60")  # fmt: skip
    stack.worker("--model", "m", "--capacity", "8", "--token-delay", "0.05")
    stack.wait_workers(2)
    wid = worker_state(stack, a.pid)["worker_id"]
    bad = subprocess.run(
        zserve_cmd("drain", "nosuchworker", "--broker", stack.frontend),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2 and "no worker 'nosuchworker'" in bad.stderr

    async def main() -> None:
        async with AsyncClient(stack.frontend, timeout=30) as c:
            finals = count_finals(c)
            # both workers take streams: their loads are even
            pairs = await open_streams(c, 6, 200)
            out = await asyncio.to_thread(
                subprocess.run, zserve_cmd("drain", wid, "--broker", stack.frontend),
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.returncode == 0 and f"draining: {wid}" in out.stdout, out.stderr
            st = worker_state(stack, a.pid)
            assert st["draining"] and st["in_flight"] > 0
            t0 = time.monotonic()
            a.kill(signal.SIGTERM)
            assert await asyncio.to_thread(a.popen.wait, 10) == 0
            assert time.monotonic() - t0 < 5  # not its 60 s grace
            assert await read_all(pairs) == [want(200)] * 6
            assert c.handovers == st["in_flight"] and c.resumes == 0
            assert finals.each_once()

    asyncio.run(main())


# ------------------------------------------------------------ broker goodbye


class TwoBrokers:
    """Two brokers on fixed ports, a paced null worker registered with both."""

    def __init__(self, *worker_args: str) -> None:
        self.eps = [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
                    for _ in range(2)]  # fmt: skip
        self.brokers: list[Proc] = [start_broker(frontend=fe, backend=be)[0] for fe, be in self.eps]
        self.worker = start_worker(
            ",".join(be for _, be in self.eps), "--engine", "null", "--model", "m",
            "--capacity", "64", "--token-delay", "0.02", *worker_args,
        )  # fmt: skip
        for fe in self.frontends:
            with Client(fe, timeout=5) as c:
                wait_for(lambda c=c: c.models() == ["m"], 20, f"the worker at {fe}")

    @property
    def frontends(self) -> list[str]:
        return [fe for fe, _ in self.eps]

    def stop(self) -> None:
        for pr in [self.worker, *self.brokers]:
            pr.stop()


async def gaps_around(c: AsyncClient, n: int, tokens: int, act: Any) -> tuple[list[str], float]:
    """``n`` streams; once all flow, ``act()`` (in a thread); the texts and
    the longest gap any stream saw between two tokens."""
    gaps: list[float] = []
    flowing = asyncio.Event()
    started = 0

    async def one() -> str:
        nonlocal started
        text: list[str] = []
        last = 0.0
        async for d in c.stream("m", "x", max_tokens=tokens):
            now = time.monotonic()
            if not text:
                started += 1
                if started == n:
                    flowing.set()
            elif flowing.is_set():
                gaps.append(now - last)
            last = now
            text.append(d.text)
        return "".join(text)

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await flowing.wait()
    await asyncio.to_thread(act)
    texts = await asyncio.gather(*tasks)
    return texts, max(gaps)


def test_a_broker_stopped_on_purpose_hands_its_streams_to_the_other_at_once() -> None:
    """SIGTERM to the broker carrying 8 streams: it says GOODBYE, the client
    moves them through the other broker at once (the liveness would take
    3 s), exact; its worker is told too and comes back once it restarts."""
    b = TwoBrokers()
    try:

        async def main() -> None:
            async with AsyncClient(b.frontends, timeout=30, primary=0) as c:
                finals = count_finals(c)

                def stop() -> None:
                    time.sleep(0.3)
                    b.brokers[0].kill(signal.SIGTERM)
                    assert b.brokers[0].popen.wait(10) == 0

                texts, gap = await gaps_around(c, 8, 150, stop)
                assert texts == [want(150)] * 8
                assert gap < 1.0, gap  # a third of interval x liveness (3 s)
                assert c.handovers == 8 and c.resumes == 0
                assert finals.each_once()

        asyncio.run(main())
    finally:
        b.stop()


CLIENT_SCRIPT = """
import sys
from zserve import Client
with Client(sys.argv[1].split(","), timeout=30, primary=0) as c:
    s = c.stream("m", "x", max_tokens=int(sys.argv[2]))
    text = next(s).text
    print("flowing", flush=True)
    text += "".join(d.text for d in s)
    print(text, c.handovers, flush=True)
"""


def test_a_leaving_broker_shows_in_status_until_its_clients_have_moved() -> None:
    """SIGTERM to a broker whose one client is SIGSTOPped: it says GOODBYE
    and stays *leaving* (status says so, new requests go elsewhere) until
    that client has moved its stream and said DISCONNECT, then exits; the
    client's stream goes on through the other broker, exact."""
    b = TwoBrokers()
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, ",".join(b.frontends), "200"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "flowing"
        proc.send_signal(signal.SIGSTOP)
        a = b.brokers[0]
        with Client(b.frontends[0], timeout=5) as watch, Client(b.frontends, timeout=10) as c:
            assert watch.status()["state"] == "serving"
            a.kill(signal.SIGTERM)
            st = wait_for(lambda: (s := watch.status())["state"] == "leaving" and s, 2, "leaving")
            assert st["requests_in_flight"] == 1  # the stopped client's
            report = cluster_status(b.frontends, timeout=2)
            assert [r.get("state") for r in report["brokers"]] == ["leaving", "serving"]
            # a new request that reaches it is sent on through the other
            assert c.generate("m", "y", max_tokens=2).text == "t0 t1 "
            time.sleep(0.5)
            assert a.alive()  # still waiting for the stopped client
            proc.send_signal(signal.SIGCONT)
            t0 = time.monotonic()
            assert a.popen.wait(10) == 0
            assert time.monotonic() - t0 < 1.5  # it moved: no need to wait 2 s
        out, _ = proc.communicate(timeout=30)
        assert out.split() == [*want(200).split(), "1"]  # exact, one hand-over
    finally:
        proc.kill()
        proc.wait()
        b.stop()


def test_the_only_broker_stopped_on_purpose_ends_streams_at_once() -> None:
    """With no other broker, GOODBYE ends the streams with a clear
    BrokerUnreachable at once, not after interval x liveness (3 s)."""
    broker, fe, be = start_broker()
    w = start_worker(be, "--engine", "null", "--model", "m", "--token-delay", "0.05")
    try:
        with Client(fe, timeout=30) as c:
            wait_for(lambda: c.models() == ["m"], 20, "the worker")
            finals = count_finals(c)
            s = c.stream("m", "x", max_tokens=1000)
            next(s)
            t0 = time.monotonic()
            broker.kill(signal.SIGTERM)
            with pytest.raises(BrokerUnreachable, match="goodbye"):
                for _ in s:
                    pass
            assert time.monotonic() - t0 < 1.0
            finals.check()  # (the broker sent no final: the client ended it)
    finally:
        w.stop()
        broker.stop()


def test_a_restarted_broker_without_workers_never_ends_a_stream() -> None:
    """The broker carrying 8 streams dies and comes back at once on its
    frontend, but with no worker behind it (a new backend): its streams
    go on through the live broker, exact (they ended ``model_not_found``)."""
    b = TwoBrokers()
    try:

        async def main() -> None:
            async with AsyncClient(b.frontends, timeout=30, primary=0) as c:
                finals = count_finals(c)

                def restart() -> None:
                    b.brokers[0].kill()
                    b.brokers[0].popen.wait(10)
                    be = f"tcp://127.0.0.1:{free_port()}"
                    b.brokers[0] = start_broker(frontend=b.eps[0][0], backend=be)[0]

                texts, _ = await gaps_around(c, 8, 200, restart)
                assert texts == [want(200)] * 8
                # new requests too, whichever broker they try first
                assert (await c.generate("m", "y", max_tokens=2)).text == "t0 t1 "
                assert finals.each_once()

        asyncio.run(main())
    finally:
        b.stop()


def test_status_json_says_draining(stack) -> None:
    stack.start_broker()
    w = stack.worker("--model", "m", "--token-delay", "0.1", "--drain-timeout", "30")
    stack.wait_workers(1)
    with stack.client() as c:
        s = c.stream("m", "x", max_tokens=30)
        next(s)
        w.kill(signal.SIGTERM)
        wait_for(lambda: draining(stack, w.pid), 5, "the worker draining at the broker")
        out = subprocess.run(
            zserve_cmd("status", "--broker", stack.frontend, "--json"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        (ws,) = json.loads(out.stdout)["workers"]
        assert ws["draining"] is True
        assert "".join(d.text for d in s) == want(30)[3:]


# ------------------------------------------------------------ hf, greedy


@pytest.fixture(scope="module")
def medium_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 7.5 M random model: the tiny one streams 64 tokens faster than a
    test can signal its worker on a loaded machine (see test_resume)."""
    from zserve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("medium-model"), size="medium")


def test_an_hf_stream_handed_over_by_a_drain_equals_the_uninterrupted_one(
    stack, medium_model_dir
) -> None:
    """Two hf workers (the 7.5 M random model, greedy): the one serving a
    stream is SIGTERMed with no grace; the stream is handed over after its
    first token and goes on, id for id, as an uninterrupted run."""
    # the default heartbeats (1 s x 3): with the fast ones a loaded machine
    # can expire the other worker meanwhile, and the stream resumes instead
    _greedy_stack(stack, "hf", medium_model_dir, "--engine-arg", "threads=1",
                  "--drain-timeout", "0", hb=[])  # fmt: skip
    kw = {"max_tokens": 64, "temperature": 0, "ignore_eos": True}
    with stack.client(timeout=120) as c:
        whole = c.generate("tiny", PROMPT, **kw)
        # round robin: the next request goes to the worker that has had none
        (pid,) = [w["pid"] for w in stack.status()["workers"] if w["dispatched"] == 0]
        s = c.stream("tiny", PROMPT, **kw)
        head, head_ids, head_text = read(s, 1)
        (proc,) = [pr for pr in stack.procs if pr.pid == pid]
        proc.kill(signal.SIGTERM)
        tail, tail_ids, tail_text = read(s)
        assert c.handovers == 1, f"the worker finished before it drained ({len(head_ids)} read)"
        assert c.resumes == 0
        assert head_ids + tail_ids == whole.token_ids
        assert head_text + tail_text == whole.text
        assert tail[-1].usage["completion_tokens"] == 64
        assert proc.popen.wait(30) == 0
