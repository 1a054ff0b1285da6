"""No single broker: clients that know several brokers move on when one
dies, and their streams continue through another by exact resumption.

Real broker, worker and gateway processes over loopback; brokers are
SIGKILLed mid-stream and restarted on the same ports.
"""

from __future__ import annotations

import asyncio
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
        for i in range(2):
            b.start(i)
            b.others.append(start_worker(
                b.backends[i], "--engine", "null", "--model", "m", "--capacity", "8",
                "--token-delay", "0.05", *FAST_HB,
            ))  # fmt: skip
        for i in range(2):
            wait_for(lambda i=i: b.status(i)["workers"], 20, f"a worker on broker {i}")
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
            assert c.resumes == 1
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
        for i in range(2):
            b.start(i)
            b.others.append(start_worker(
                b.backends[i], "--engine", "null", "--model", "m", "--capacity", "8",
                "--token-delay", "0.05", *FAST_HB,
            ))  # fmt: skip
        for i in range(2):
            wait_for(lambda i=i: b.status(i)["workers"], 20, f"a worker on broker {i}")

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
