"""No single broker: clients that know several brokers move on when one
dies, and their streams continue through another by exact resumption.

Real broker, worker and gateway processes over loopback; brokers are
SIGKILLed mid-stream and restarted on the same ports.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from tests.conftest import FAST_HB
from tests.finals import count_finals
from zserve import AsyncClient, Client
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for


def endpoints() -> tuple[str, str]:
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


class Brokers:
    """Brokers on fixed ports (so one can be restarted where it was)."""

    def __init__(self, n: int) -> None:
        self.eps = [endpoints() for _ in range(n)]
        self.procs: list[Proc | None] = [None] * n
        self.others: list[Proc] = []

    def start(self, i: int) -> None:
        fe, be = self.eps[i]
        self.procs[i] = start_broker(*FAST_HB, frontend=fe, backend=be)[0]

    def kill(self, i: int) -> None:
        proc = self.procs[i]
        assert proc is not None
        proc.kill()
        proc.popen.wait(10)

    @property
    def frontends(self) -> list[str]:
        return [fe for fe, _ in self.eps]

    @property
    def backends(self) -> list[str]:
        return [be for _, be in self.eps]

    def status(self, i: int) -> dict[str, Any]:
        with Client(self.eps[i][0], timeout=5, connect_timeout=2) as c:
            return c.status()

    def busy(self) -> int:
        """The one broker with requests in flight."""
        found: list[int] = []

        def find() -> bool:
            found[:] = [i for i in range(len(self.eps)) if self.status(i)["requests_in_flight"]]
            return len(found) == 1

        wait_for(find, 20, "one busy broker")
        return found[0]

    def start_with_null_workers(self) -> None:
        """Every broker, each with a paced null worker ("m") of its own."""
        for i in range(len(self.eps)):
            self.start(i)
            self.others.append(start_worker(
                self.backends[i], "--engine", "null", "--model", "m", "--capacity", "8",
                "--token-delay", "0.05", *FAST_HB,
            ))  # fmt: skip
        for i in range(len(self.eps)):
            wait_for(lambda i=i: self.status(i)["workers"], 20, f"a worker on broker {i}")

    def stop(self) -> None:
        for proc in [*self.others, *self.procs]:
            if proc is not None:
                proc.stop()


def test_a_stream_moves_to_another_broker_when_its_broker_dies() -> None:
    """Two brokers, a worker behind each; the broker carrying the stream is
    SIGKILLed after 20 of 60 tokens: the caller's stream reads on, exact,
    through the other broker; restarted, the broker is used again."""
    b = Brokers(2)
    try:
        b.start_with_null_workers()
        with Client(b.frontends, timeout=30, heartbeat_interval=0.2) as c:
            finals = count_finals(c)
            s = c.stream("m", "x", max_tokens=60)
            got = [next(s) for _ in range(20)]
            dead = b.busy()
            b.kill(dead)
            got += list(s)
            assert "".join(d.text for d in got) == "".join(f"t{i} " for i in range(60))
            assert [t for d in got for t in d.token_ids] == list(range(60))
            assert got[-1].usage["completion_tokens"] == 60
            # Its connection ended (the killed broker's socket closed): the
            # stream moved at once, not as a resume after interval x liveness.
            assert c.resumes == 0
            # New requests go on through the live broker meanwhile...
            assert c.generate("m", "y", max_tokens=3).text == "t0 t1 t2 "
            # ...and the restarted one is used again once it answers (this
            # client's primary was the one that died: it carried the stream).
            b.start(dead)
            wait_for(lambda: b.status(dead)["workers"], 20, "the worker back on it")
            t0 = time.monotonic()

            def used_again() -> bool:
                c.generate("m", "z", max_tokens=1)
                return b.status(dead)["counters"].get("requests", 0) > 0

            wait_for(used_again, 10, "the restarted broker to take requests again")
            assert time.monotonic() - t0 < 10
            assert finals.each_once()
    finally:
        b.stop()


def test_an_async_client_with_all_brokers_dead_fails_clearly() -> None:
    """With no broker left, streams end with BrokerUnreachable (no hang)."""
    b = Brokers(2)
    try:
        b.start_with_null_workers()

        async def main() -> None:
            from zserve import BrokerUnreachable

            async with AsyncClient(b.frontends, timeout=30, heartbeat_interval=0.2) as c:
                s = c.stream("m", "x", max_tokens=1000)
                await s.start()
                await s.__anext__()
                b.kill(0)
                b.kill(1)

                async def drain() -> None:
                    async for _ in s:
                        pass

                try:
                    await asyncio.wait_for(drain(), 20)
                except BrokerUnreachable:
                    return
                raise AssertionError("the stream ended without an error")

        asyncio.run(main())
    finally:
        b.stop()


# ---------------------------------------------- through the gateway, hf


PROMPTS = [f"Once upon a time there was a dragon number {i}" for i in range(4)]


def test_gateway_with_two_brokers_loses_no_stream_when_one_dies(tiny_model_dir) -> None:
    """Two brokers, two hf workers registered with both, the gateway given
    both: 32 concurrent greedy streams; the broker carrying them is SIGKILLed
    mid-run. No caller sees an error and every text equals an uninterrupted
    run; the broker, restarted, is used again within 10 s."""
    import httpx

    from tests.gateway.conftest import start_gateway

    b = Brokers(2)
    try:
        for i in range(2):
            b.start(i)
        for _ in range(2):
            b.others.append(start_worker(
                b.backends[0], "--broker", b.backends[1], "--engine", "hf",
                "--model", str(tiny_model_dir), "--model-names", "tiny", "--dtype", "float32",
                "--capacity", "32", "--engine-arg", "threads=1", *FAST_HB,
            ))  # fmt: skip
        for i in range(2):
            wait_for(lambda i=i: len(b.status(i)["workers"]) == 2, 120, f"workers on broker {i}")
        gw, root = start_gateway(",".join(b.frontends), *FAST_HB)
        b.others.append(gw)
        n = 300
        body = {"model": "tiny", "max_tokens": n, "temperature": 0, "ignore_eos": True}

        def ask(prompt: str, **kw: Any) -> dict[str, Any]:
            r = httpx.post(root + "/v1/completions", json={**body, "prompt": prompt, **kw},
                           timeout=120)  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()

        want = {p: ask(p)["choices"][0]["text"] for p in PROMPTS}

        async def run() -> tuple[list[str], list[Any]]:
            started = asyncio.Event()
            count = 0
            errors: list[Any] = []

            async def one(prompt: str) -> str:
                nonlocal count
                text = ""
                first = True
                async with httpx.AsyncClient(timeout=120) as h, h.stream(
                    "POST", root + "/v1/completions",
                    json={**body, "prompt": prompt, "stream": True},
                ) as r:  # fmt: skip
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        ev = json.loads(line[6:])
                        if "error" in ev:
                            errors.append(ev["error"])
                            continue
                        text += "".join(c.get("text") or "" for c in ev["choices"])
                        if first and text:
                            first = False
                            count += 1
                            if count == 32:
                                started.set()
                return text

            tasks = [asyncio.create_task(one(PROMPTS[i % 4])) for i in range(32)]
            await asyncio.wait_for(started.wait(), 60)
            dead = await asyncio.to_thread(b.busy)
            b.kill(dead)
            texts = await asyncio.gather(*tasks)
            return [f"{dead}", *texts], errors

        (dead_s, *texts), errors = asyncio.run(run())
        dead = int(dead_s)
        assert errors == []
        assert texts == [want[PROMPTS[i % 4]] for i in range(32)]
        metrics = httpx.get(root + "/metrics").text
        assert "zserve_gateway_stream_resumes_total" in metrics
        # restarted, it is used again within 10 s (the gateway's primary was
        # the one that carried the streams)
        b.start(dead)
        t0 = time.monotonic()

        def used_again() -> bool:
            ask(PROMPTS[0], max_tokens=1)
            return b.status(dead)["counters"].get("requests", 0) > 0

        wait_for(used_again, 10, "the restarted broker to take requests again")
        assert time.monotonic() - t0 < 10
        # and it serves them again once the workers are back (their
        # reconnect backoff decides when)
        wait_for(lambda: len(b.status(dead)["workers"]) == 2, 40, "the workers back on it")

        def served_again() -> bool:
            ask(PROMPTS[1], max_tokens=1)
            return b.status(dead)["counters"].get("dispatched", 0) > 0

        wait_for(served_again, 10, "the restarted broker to dispatch again")
    finally:
        b.stop()


def test_a_broker_that_does_not_know_the_model_yet_passes_the_request_on() -> None:
    """Brokers can disagree for a moment (one just restarted, its workers not
    back): model_not_found from one sends the request to the next live one."""
    b = Brokers(2)
    try:
        b.start(0)
        b.start(1)
        b.others.append(start_worker(b.backends[1], "--engine", "null", "--model", "m"))
        wait_for(lambda: b.status(1)["workers"], 20, "the worker on broker 1")
        with Client(b.frontends, timeout=30, primary=0) as c:
            finals = count_finals(c)
            assert c.generate("m", "x", max_tokens=2).text == "t0 t1 "
            assert c.resumes == 0  # passed on, not resumed
            assert finals.each_once() is not None
            # a model no broker knows is still model_not_found
            from zserve import ModelNotFound

            try:
                c.generate("nope", "x")
            except ModelNotFound:
                pass
            else:
                raise AssertionError("an unknown model was served")
        assert b.status(0)["counters"]["model_not_found"] == 2
    finally:
        b.stop()


# --------------------------------------------- a broker cut off the network


def test_a_broker_whose_link_goes_down_is_treated_as_dead() -> None:
    """A broker in its own network namespace (a veth pair, as its own host);
    its link goes down mid-stream: the client treats it as dead and the
    stream continues through the other broker; link up again, it is used
    again, and nothing reaches the caller twice."""
    import pytest

    from tests.system.test_faults_at_load import _ip, _netns_unavailable, isolated_worker_link
    from zserve.launcher import zserve_cmd

    why = _netns_unavailable()
    if why:
        pytest.skip(why)
    procs: list[Proc] = []
    with isolated_worker_link() as (ns, host, host_ip):
        ns_ip = host_ip.rsplit(".", 1)[0] + ".2"
        fe1, be1 = (f"tcp://{ns_ip}:{port}" for port in (free_port(), free_port()))
        fe2, be2 = endpoints()
        try:
            procs.append(Proc(
                ["ip", "netns", "exec", ns, *zserve_cmd(
                    "broker", "--frontend", fe1, "--backend", be1, "--log-level", "warning",
                    *FAST_HB)],
                name="broker in a namespace",
            ))  # fmt: skip
            procs.append(start_broker(*FAST_HB, frontend=fe2, backend=be2)[0])
            for _ in range(2):
                procs.append(start_worker(
                    be1, "--broker", be2, "--engine", "null", "--model", "m", "--capacity", "8",
                    "--token-delay", "0.05", *FAST_HB,
                ))  # fmt: skip
            for fe in (fe1, fe2):
                with Client(fe, timeout=10) as s:
                    wait_for(lambda s=s: len(s.status()["workers"]) == 2, 30, f"workers on {fe}")
            with Client([fe1, fe2], timeout=30, heartbeat_interval=0.2, primary=0) as c:
                st = c.stream("m", "x", max_tokens=60)
                got = [next(st) for _ in range(20)]
                _ip("link", "set", host, "down")
                try:
                    got += list(st)
                finally:
                    _ip("link", "set", host, "up")
                assert "".join(d.text for d in got) == "".join(f"t{i} " for i in range(60))
                assert [t for d in got for t in d.token_ids] == list(range(60))
                assert [d.finish_reason for d in got].count("length") == 1 == len(
                    [d for d in got if d.finish_reason])
                assert c.resumes == 1
                # back on the link: used again once it answers the probes
                with Client(fe1, timeout=10) as s:
                    wait_for(lambda: len(s.status()["workers"]) == 2, 30, "workers back on it")
                    before = s.status()["counters"].get("requests", 0)

                    def used_again() -> bool:
                        c.generate("m", "y", max_tokens=2)
                        return s.status()["counters"].get("requests", 0) > before

                    wait_for(used_again, 10, "the broker to take requests again")
                # (on the wire the abandoned request may still get its final,
                # and answers to heartbeats that named it, from the broker that
                # came back; the client drops them: the caller got each token
                # once, and exactly one final, above)
        finally:
            for proc in reversed(procs):
                proc.stop()
