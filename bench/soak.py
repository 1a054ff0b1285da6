"""Soak: steady load through the whole stack while workers die.

``python -m bench.soak [--quick]`` starts, on loopback ephemeral ports, a
broker, two null workers paced like a model (``--token-delay``, 15 ms a
token) and the OpenAI gateway, then keeps ``concurrency`` streaming chat
completions going through the gateway (httpx, SSE) for ``duration``
seconds. Every ``kill_every`` seconds one worker (each in turn) is
SIGKILLed and started again at once.

Every response is read and checked by ``bench/loadgen.py``'s stream reader
(``stream_one``): HTTP 200, the null text ``t0 t1 ... t{n-1}``,
``finish_reason`` length and the closing ``[DONE]``, or an error with a code
(the HTTP body's, or the error event mid-stream). A wrong text, finish reason
or a missing ``[DONE]`` is an error of its own (``wrong_text``,
``wrong_finish``, ``no_done``).

Reported: requests done, errors by code, resumes (the gateway's
``/metrics`` where it counts them; the broker's ``retried`` and
``worker_lost`` counters in any case), and the broker's RSS after the first
interval (minute 1 of the full run) and at the end. Targets: broker RSS
grows < 5 % from the first mark to the end, and no error that the kills do
not explain (only ``worker_lost`` is: a stream its worker took down with
it). Writes bench/results/soak.json.

Full: 10 minutes, a kill every minute. ``--quick``: 1 minute, a kill every
20 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._procs import LoggedProc, log_tail
from bench.common import RssSampler, format_table, mib, result_record, write_json
from bench.loadgen import LoadGenError, chat_body, stream_one
from zserve.launcher import Proc, free_port, start_broker, zserve_cmd

MODEL = "null"
TARGET_RSS_GROWTH_PCT = 5.0
EXPLAINED = {"worker_lost"}  # the codes a killed worker explains
TIMEOUT = httpx.Timeout(120.0, connect=10.0)


@dataclass(frozen=True)
class Settings:
    duration: float  # seconds of load
    kill_every: float  # seconds between kills (the first RSS mark is at the first)
    concurrency: int  # streams kept going
    max_tokens: int
    token_delay: float  # seconds per token on the null workers


FULL = Settings(duration=600, kill_every=60, concurrency=32, max_tokens=64, token_delay=0.015)
QUICK = Settings(duration=60, kill_every=20, concurrency=32, max_tokens=64, token_delay=0.015)


class Stack:
    """Broker, two null workers and the gateway; their logs in ``logs``."""

    def __init__(self, s: Settings, logs: Path) -> None:
        self.s = s
        self.logs = logs
        self.procs: list[Proc] = []
        self.broker, self.frontend, self.backend = start_broker(log_level="error")
        self.procs.append(self.broker)
        self.workers: list[LoggedProc] = [self._worker(i) for i in range(2)]
        self.port = free_port()
        self.gateway = LoggedProc(
            zserve_cmd(
                "gateway", "--broker", self.frontend, "--port", str(self.port),
                "--log-level", "warning",
            ),
            "gateway",
            logs / "gateway.log",
        )  # fmt: skip
        self.procs.append(self.gateway)
        self.starts = 0

    def _worker(self, i: int) -> LoggedProc:
        w = LoggedProc(
            zserve_cmd(
                "worker", "--broker", self.backend, "--engine", "null", "--model", MODEL,
                "--token-delay", str(self.s.token_delay), "--log-level", "warning",
            ),
            f"worker{i}",
            self.logs / f"worker{i}.log",
        )  # fmt: skip
        self.procs.append(w)
        return w

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def kill_and_restart(self, i: int) -> None:
        """SIGKILL worker ``i`` and start a new one in its place."""
        self.workers[i].kill()
        self.workers[i].popen.wait()
        self.workers[i] = self._worker(i)

    def wait_ready(self, workers: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.gateway.alive():
                raise RuntimeError("gateway exited:\n" + log_tail(self.gateway.log_path))
            try:
                h = httpx.get(self.root + "/health", timeout=5).json()
                if h.get("workers") == workers and MODEL in h.get("models", []):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the stack was not ready with {workers} workers")
            time.sleep(0.2)

    def counters(self) -> dict[str, int]:
        from zserve.client import Client

        with Client(self.frontend, timeout=10, connect_timeout=10) as c:
            return dict(c.status()["counters"])

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> str | None:
    """One streaming chat completion; None if it was whole and right, else a code."""
    try:
        await stream_one(client, url, body)
    except LoadGenError as e:
        return e.code
    except httpx.HTTPError as e:
        return f"http_{type(e).__name__}"
    return None


async def _load(stack: Stack, s: Settings, rss: RssSampler) -> dict[str, Any]:
    url = stack.root + "/v1/chat/completions"
    body = chat_body(MODEL, s.max_tokens, stream=True)
    done = 0
    errors: Counter[str] = Counter()
    kills: list[float] = []
    t0 = time.monotonic()
    stop_at = t0 + s.duration
    limits = httpx.Limits(max_connections=s.concurrency, max_keepalive_connections=s.concurrency)

    async def slot(client: httpx.AsyncClient) -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            code = await _one(client, url, body)
            done += 1
            if code is not None:
                errors[code] += 1

    async def killer() -> None:
        n = 0
        while True:
            at = t0 + (n + 1) * s.kill_every
            if at >= stop_at:
                return
            await asyncio.sleep(at - time.monotonic())
            if n == 0:
                rss.mark("first")
            stack.kill_and_restart(n % 2)
            kills.append(round(time.monotonic() - t0, 1))
            n += 1
            print(f"  {kills[-1]:6.1f} s: worker{(n - 1) % 2} killed and restarted; "
                  f"{done} requests, errors {dict(errors)}", flush=True)  # fmt: skip

    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        k = asyncio.create_task(killer())
        await asyncio.gather(*(slot(client) for _ in range(s.concurrency)))
        k.cancel()
        metrics = (await client.get(stack.root + "/metrics")).text
    return {
        "requests": done,
        "seconds": round(time.monotonic() - t0, 1),
        "errors": dict(errors),
        "kills_at_s": kills,
        "gateway_resumes": _resumes(metrics),
    }


def _resumes(metrics: str) -> float | None:
    """The sum of the gateway's resume counters, None if it has none."""
    total, seen = 0.0, False
    for line in metrics.splitlines():
        name = line.split("{")[0].split(" ")[0]
        if line.startswith("#") or "resum" not in name or name.endswith("_created"):
            continue
        seen = True
        total += float(line.rsplit(" ", 1)[1])
    return total if seen else None


def evaluate(m: dict[str, Any]) -> dict[str, Any]:
    first, end = m["broker_rss_first_mib"], m["broker_rss_end_mib"]
    growth = round((end - first) / first * 100.0, 2)
    unexplained = {k: v for k, v in m["errors"].items() if k not in EXPLAINED}
    n_unexplained = sum(unexplained.values())
    rows = [
        {
            "workload": f"broker RSS, first mark -> end (MiB, {m['duration_s']:g} s)",
            "first": first, "zserve": end, "ratio": growth,
            "target": f"< {TARGET_RSS_GROWTH_PCT:g} % growth",
            "pass": growth < TARGET_RSS_GROWTH_PCT,
        },
        {
            "workload": f"errors the kills do not explain ({m['requests']} requests, "
                        f"{len(m['kills_at_s'])} kills)",
            "first": None, "zserve": n_unexplained, "ratio": None, "target": "0",
            "pass": n_unexplained == 0,
        },
    ]  # fmt: skip
    return {
        "rss_growth_pct": growth,
        "errors_unexplained": unexplained,
        "rows": rows,
        "pass": all(r["pass"] for r in rows),
    }


def summary_rows(r: dict[str, Any]) -> list[list[str]]:
    """The rows ``python -m bench`` shows for this benchmark."""
    from bench.common import cell

    out = []
    for x in r.get("rows", []):
        ratio = "-" if x.get("ratio") is None else f"{x['ratio']:+g} %"
        met = "-" if x.get("pass") is None else "yes" if x["pass"] else "**no**"
        base = "broker after the first interval" if x.get("first") is not None else "-"
        out.append(["soak", x["workload"], base, cell(x.get("first")), cell(x.get("zserve")),
                    ratio, x.get("target", "-"), met])  # fmt: skip
    return out


def run(s: Settings) -> dict[str, Any]:
    logs = Path(tempfile.mkdtemp(prefix="zserve-soak-"))
    stack = Stack(s, logs)
    try:
        stack.wait_ready(2)
        rss = RssSampler(stack.broker.pid, interval=1.0).start()
        load = asyncio.run(_load(stack, s, rss))
        rss.stop()
        counters = stack.counters()
    finally:
        stack.stop()
    gateway_resumes = load.pop("gateway_resumes")
    lost = counters.get("worker_lost", 0)
    if gateway_resumes is not None:
        resumed, source = gateway_resumes, "the gateway's /metrics"
    else:  # every mid-stream loss that reached no caller as worker_lost was resumed
        resumed = lost - load["errors"].get("worker_lost", 0)
        source = "broker worker_lost less the callers' worker_lost errors"
    return {
        **load,
        "duration_s": s.duration,
        "resumes": {
            "resumed": resumed,
            "source": source,
            "gateway": gateway_resumes,
            "broker_retried": counters.get("retried", 0),  # not yet started: sent again
            "broker_worker_lost": counters.get("worker_lost", 0),  # mid-stream
            "broker_workers_lost": counters.get("workers_lost", 0),
        },
        "broker_counters": counters,
        "broker_rss_first_mib": mib(rss.marks["first"]),
        "broker_rss_end_mib": mib(rss.marks["end"]),
        "broker_rss_peak_mib": mib(rss.peak_kib()),
        "logs": str(logs),
    }


def render(m: dict[str, Any], v: dict[str, Any]) -> str:
    rows = [
        ["requests done", m["requests"]],
        ["requests/s", round(m["requests"] / m["seconds"], 1)],
        ["errors by code", json.dumps(m["errors"]) if m["errors"] else "none"],
        ["kills (s into the run)", ", ".join(f"{k:g}" for k in m["kills_at_s"])],
        ["streams resumed on the other worker", m["resumes"]["resumed"]],
        ["lost mid-stream (broker worker_lost)", m["resumes"]["broker_worker_lost"]],
        ["retried before a token (broker retried)", m["resumes"]["broker_retried"]],
        ["broker RSS first mark (MiB)", m["broker_rss_first_mib"]],
        ["broker RSS end (MiB)", m["broker_rss_end_mib"]],
        ["broker RSS growth (%)", v["rss_growth_pct"]],
    ]
    return format_table(["soak", "value"], rows) + f"\n(resumes: {m['resumes']['source']})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="1 minute, a kill every 20 s")
    ap.add_argument("--duration", type=float, help="seconds of load (overrides the mode's)")
    ap.add_argument("--kill-every", type=float, help="seconds between kills")
    ap.add_argument("--out", default="soak.json", help="file name under bench/results/")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    if a.duration or a.kill_every:
        s = Settings(a.duration or s.duration, a.kill_every or s.kill_every, s.concurrency,
                     s.max_tokens, s.token_delay)  # fmt: skip
    t0 = time.monotonic()
    measured = run(s)
    verdict = evaluate(measured)
    result = result_record("soak", a.quick, t0, {"settings": asdict(s), "measured": measured,
                                                  **verdict})  # fmt: skip
    path = write_json(a.out, result)
    print(render(measured, verdict))
    print(
        f"\ntargets: broker RSS growth {verdict['rss_growth_pct']:+g} % "
        f"(< {TARGET_RSS_GROWTH_PCT:g} %), errors the kills do not explain: "
        f"{sum(verdict['errors_unexplained'].values())} (0): "
        f"{'met' if verdict['pass'] else 'NOT met'}   ({result['wall_s']} s, {path})"
    )
    return result


if __name__ == "__main__":
    main()
