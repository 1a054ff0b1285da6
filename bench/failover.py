"""Failover: one broker of two killed under load, and what two brokers cost.

``python -m bench.failover [--quick]`` starts two brokers and null workers
registered with both (paced like a model), then, in the same run:

* **stall at a broker kill**: 32 concurrent streams from one AsyncClient
  given both brokers; once every stream is flowing, the broker carrying them
  (the client's primary) is SIGKILLed. Every caller's gaps between tokens
  are recorded: the longest, against the heartbeat expiry (interval x
  liveness); errors reaching callers; whether each text is exact.
* **the cost of a second broker**: 1-token request p50 (sequential, Client)
  and 256 concurrent streams x N tokens (AsyncClient), through a client
  given one broker and through a client given both, alternating round by
  round.

Writes bench/results/failover.json and prints a table.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.common import latency_summary_ms, median, run_and_report
from zserve import AsyncClient, Client, ZServeError
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for

INTERVAL, LIVENESS = 1.0, 3  # the defaults
EXPIRY = INTERVAL * LIVENESS


@dataclass
class Settings:
    streams: int = 32  # at the kill
    kill_tokens: int = 400  # per stream at the kill (20 ms each: ~8 s)
    token_delay: float = 0.02
    one_token: int = 400  # 1-token requests per round
    wide: int = 256  # concurrent streams for throughput
    wide_tokens: int = 500
    rounds: int = 3


FULL = Settings()
QUICK = Settings(kill_tokens=300, one_token=300, wide_tokens=200, rounds=4)


class Stack:
    def __init__(self, token_delay: float) -> None:
        self.eps = [(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
                    for _ in range(2)]  # fmt: skip
        self.brokers: list[Proc] = []
        self.workers: list[Proc] = []
        for fe, be in self.eps:
            self.brokers.append(start_broker(frontend=fe, backend=be)[0])
        backends = [a for _, be in self.eps for a in ("--broker", be)]
        # paced workers for the kill, instant ones for the cost figures
        for model, delay in (("paced", token_delay), ("paced", token_delay), ("m", 0.0)):
            self.workers.append(start_worker(
                self.eps[0][1], *backends[2:], "--engine", "null", "--model", model,
                "--capacity", "256", "--token-delay", str(delay),
            ))  # fmt: skip
        for fe, _ in self.eps:
            with Client(fe, timeout=10) as c:
                wait_for(lambda c=c: len(c.status()["workers"]) == 3, 60, "workers on " + fe)

    @property
    def frontends(self) -> list[str]:
        return [fe for fe, _ in self.eps]

    def stop(self) -> None:
        for p in [*self.workers, *self.brokers]:
            p.stop()


async def _kill_run(st: Stack, s: Settings) -> dict[str, Any]:
    gaps: list[float] = []
    errors: dict[str, int] = {}
    exact = 0
    want = "".join(f"t{i} " for i in range(s.kill_tokens))
    flowing = asyncio.Event()
    started = 0
    async with AsyncClient(st.frontends, timeout=60) as c:
        primary = c._core.primary

        async def one() -> None:
            nonlocal exact, started
            text, last, first = [], 0.0, True
            try:
                async with c.stream("paced", "x", max_tokens=s.kill_tokens) as stream:
                    async for d in stream:
                        now = time.monotonic()
                        if first:
                            first = False
                            started += 1
                            if started == s.streams:
                                flowing.set()
                        elif flowing.is_set():
                            gaps.append(now - last)
                        last = now
                        text.append(d.text)
            except ZServeError as e:
                errors[e.code] = errors.get(e.code, 0) + 1
                return
            exact += "".join(text) == want

        tasks = [asyncio.create_task(one()) for _ in range(s.streams)]
        await flowing.wait()
        await asyncio.sleep(1.0)
        st.brokers[primary].kill()
        killed_at = time.monotonic()
        await asyncio.gather(*tasks)
        resumes = c.resumes
    return {
        "streams": s.streams,
        "longest_gap_s": round(max(gaps), 3) if gaps else None,
        "expiry_s": EXPIRY,
        "errors": errors,
        "exact_texts": exact,
        "resumes": resumes,
        "run_after_kill_s": round(time.monotonic() - killed_at, 2),
    }


def _one_token(address: Any, n: int) -> list[float]:
    out = []
    with Client(address, timeout=30) as c:
        c.generate("m", "x", max_tokens=1)  # warm-up
        for _ in range(n):
            t0 = time.perf_counter()
            c.generate("m", "x", max_tokens=1)
            out.append(time.perf_counter() - t0)
    return out


async def _wide(address: Any, n: int, tokens: int) -> float:
    async with AsyncClient(address, timeout=60) as c:

        async def one() -> int:
            k = 0
            async with c.stream("m", "x", max_tokens=tokens) as s:
                async for d in s:
                    k += len(d.token_ids or ())
            return k

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(n)))
        dt = time.perf_counter() - t0
    if any(k != tokens for k in counts):
        raise RuntimeError("a stream came back short")
    return n * tokens / dt


def run(s: Settings) -> dict[str, Any]:
    cost: dict[str, dict[str, list[float]]] = {
        "one": {"p50_ms": [], "tok_s": []}, "two": {"p50_ms": [], "tok_s": []},
    }  # fmt: skip
    st = Stack(s.token_delay)
    try:
        sides: list[tuple[str, Any]] = [("one", st.frontends[0]), ("two", st.frontends)]
        for _ in range(s.rounds):
            sides.reverse()  # which goes first alternates: order effects hit both alike
            for name, address in sides:
                lat = _one_token(address, s.one_token)
                cost[name]["p50_ms"].append(latency_summary_ms(lat)["p50_ms"])
                cost[name]["tok_s"].append(asyncio.run(_wide(address, s.wide, s.wide_tokens)))
        kill = asyncio.run(_kill_run(st, s))
    finally:
        st.stop()
    one = {k: median(v) for k, v in cost["one"].items()}
    two = {k: median(v) for k, v in cost["two"].items()}
    return {"kill": kill, "one_broker": one, "two_brokers": two, "rounds": cost}


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    k, one, two = m["kill"], m["one_broker"], m["two_brokers"]
    gap = k["longest_gap_s"]
    p50_ratio = two["p50_ms"] / one["p50_ms"] if one["p50_ms"] else None
    return [
        {"workload": "caller-visible errors at a broker kill", "base": 0, "baseline": "none",
         "zserve": sum(k["errors"].values()), "target": "0",
         "pass": not k["errors"]},
        {"workload": "longest stall at the kill (s)", "base": EXPIRY,
         "baseline": "interval x liveness",
         "zserve": gap, "target": f"<= {EXPIRY + 0.5:g}",
         "pass": gap is not None and gap <= EXPIRY + 0.5},
        {"workload": "exact texts after the kill", "base": k["streams"],
         "baseline": "streams at the kill",
         "zserve": k["exact_texts"], "target": "all",
         "pass": k["exact_texts"] == k["streams"]},
        {"workload": "1-token p50 (ms), two brokers vs one", "base": round(one["p50_ms"], 3),
         "baseline": "a client given one broker",
         "zserve": round(two["p50_ms"], 3),
         "ratio": round(p50_ratio, 3) if p50_ratio else None, "target": "< 1.1x",
         "pass": p50_ratio is not None and p50_ratio < 1.1},
        {"workload": "256 streams tok/s, two brokers vs one", "base": round(one["tok_s"]),
         "baseline": "a client given one broker",
         "zserve": round(two["tok_s"]),
         "ratio": round(two["tok_s"] / one["tok_s"], 3), "target": "-", "pass": None},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(
        "failover", __doc__, argv, (FULL, QUICK), run, evaluate,
        quick_help="fewer samples (about a minute)", column="zserve",
    )  # fmt: skip


if __name__ == "__main__":
    main()
