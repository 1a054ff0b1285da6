"""The broker at scale: many paced workers, thousands of streams, several client processes.

``python -m bench.scale [--quick]`` measures, in one run:

* **streams**: 1, 2, 4 and 8 null workers paced like a batched model
  (``--engine null --token-delay 0.02 --engine-arg pacing=step``: one engine
  step every 20 ms for all of a worker's requests, capacity 256 each) and up
  to 2048 concurrent streams (at most 256 per worker), split over several
  client processes (``zserve.AsyncClient`` each). Per cell: tokens/s, and the
  **latency zserve adds to each token**: the time a client reads it minus the
  time the worker's engine produced it (``--engine-arg stamp=true`` writes
  ``time.monotonic()`` into the token's text; the machine's monotonic clock
  is shared by its processes), p50 and p99. With 8 workers: the broker's CPU
  seconds per 1000 tokens (``/proc/<pid>/task/*/schedstat``) as streams grow
  from 16 to 2048, and its memory per 1000 requests in flight (RSS at the
  peak of the 2048-stream run minus RSS before it).
* **rate**: the 1-token requests/s one broker sustains with 8 client
  processes (each a closed loop of 16 requests at a time: zserve's
  ``AsyncClient`` against ``zserve broker`` + one null worker; ``FloorClient``
  against the bare ROUTER/ROUTER forwarder of ``bench/floor.py``), the two
  taking turns in the same run; plus each broker's CPU per request.

Every figure here shares 2 cores with the clients and workers that drive it:
on a small machine the processes compete, and "added latency" includes
waiting for a core. Each cell and each rate turn records the share of the
machine's cores in use (``/proc/stat``), and the rate one broker would carry
on a core of its own (1 / its CPU per request) is reported beside the rate
it reached here. Targets (issue 11): added p99 <= 2 ms at 8 workers x 2048
streams; broker CPU per token within 20 % from 16 to 2048 streams (read as
"grows no more than 20 %": it falls, since a message carries more tokens as
streams grow; CPU per token message is reported beside it); one broker
>= 5,000 1-token requests/s and >= 0.7x the forwarder's rate.

Writes ``bench/results/scale.json`` and ``scale.png`` (tokens/s and added
p99 against streams).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import select
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    RssSampler,
    all_met,
    busy_share,
    cpu_seconds,
    format_table,
    latency_summary_ms,
    machine_busy,
    median,
    mib,
    result_record,
    rss_kib,
    write_json,
)
from zserve.launcher import Proc, start_broker, start_worker

MODEL = "paced"
STEP = 0.02  # seconds per engine step (token_delay)
CAPACITY = 256  # per worker
RATE_WINDOW = 16  # 1-token requests in flight per rate client
_STAMP = re.compile(r"@([0-9]+\.[0-9]+) ")

# Targets (issue 11).
ADDED_P99_MAX_MS = 2.0
CPU_FLAT_WITHIN = 0.20
RATE_MIN = 5000.0
RATE_RATIO_MIN = 0.7


@dataclass(frozen=True)
class Settings:
    workers: tuple[int, ...]
    streams: tuple[int, ...]  # per cell, capped at workers x CAPACITY
    tokens: int  # per stream
    clients: int  # client processes for the stream cells
    rate_clients: int
    rate_seconds: float  # per turn
    rate_rounds: int


FULL = Settings((1, 2, 4, 8), (16, 64, 256, 1024, 2048), 100, 8, 8, 5.0, 3)
QUICK = Settings((1, 2, 4, 8), (16, 256, 1024, 2048), 25, 4, 8, 2.0, 2)


# ------------------------------------------------------------------ client processes


def _child_io() -> tuple[Any, Any]:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return sys.stdin, out


async def _streams_child(frontend: str, streams: int, tokens: int) -> dict[str, Any]:
    from zserve import AsyncClient

    stdin, out = _child_io()
    added: list[float] = []
    counts: list[int] = []
    async with AsyncClient(frontend, timeout=120) as ac:
        await ac.models()
        out.write("ready\n")
        out.flush()
        await asyncio.to_thread(stdin.readline)
        t0 = time.monotonic()

        async def one(i: int) -> None:
            got = 0
            async for d in ac.stream(MODEL, "go", max_tokens=tokens):
                now = time.monotonic()
                for m in _STAMP.findall(d.text):
                    added.append(now - float(m))
                got += len(d.token_ids or ())
            counts.append(got)

        await asyncio.gather(*(one(i) for i in range(streams)))
        t1 = time.monotonic()
    return {"t0": t0, "t1": t1, "tokens": sum(counts), "bad": sum(c != tokens for c in counts),
            "added_ms": [round(x * 1e3, 3) for x in added], "out": out}  # fmt: skip


def _rate_child(kind: str, frontend: str, seconds: float) -> dict[str, Any]:
    stdin, out = _child_io()
    done = 0
    if kind == "floor":
        from bench.floor import FloorClient

        with FloorClient(frontend) as fc:
            fc.request(1)
            out.write("ready\n")
            out.flush()
            stdin.readline()
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                done += len(fc.streams(RATE_WINDOW, 1, False))
            t1 = time.monotonic()
    else:
        from zserve import AsyncClient

        async def run() -> tuple[float, float, int]:
            n = 0
            async with AsyncClient(frontend, timeout=30) as ac:
                await ac.generate(MODEL, "x", max_tokens=1)
                out.write("ready\n")
                out.flush()
                await asyncio.to_thread(stdin.readline)
                t0 = time.monotonic()
                while time.monotonic() - t0 < seconds:
                    await asyncio.gather(
                        *(ac.generate(MODEL, "x", max_tokens=1) for _ in range(RATE_WINDOW))
                    )
                    n += RATE_WINDOW
                return t0, time.monotonic(), n

        t0, t1, done = _run_async(run())
    return {"t0": t0, "t1": t1, "requests": done, "out": out}


def _run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _child_main(a: argparse.Namespace) -> int:
    if a.child == "streams":
        r = _run_async(_streams_child(a.frontend, a.streams, a.tokens))
    else:
        r = _rate_child(a.child, a.frontend, a.seconds)
    out = r.pop("out")
    out.write(json.dumps(r) + "\n")
    out.flush()
    return 0


class Clients:
    """Client processes started together, released together by one line on stdin."""

    def __init__(self, args: list[list[str]], timeout: float = 120.0) -> None:
        self.timeout = timeout
        self.procs = [
            Proc([sys.executable, "-m", "bench.scale", *a], name=f"client{i}",
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            for i, a in enumerate(args)
        ]  # fmt: skip

    def _line(self, p: Proc) -> str:
        out = p.popen.stdout
        assert out is not None
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if select.select([out], [], [], 0.5)[0]:
                line = out.readline()
                if line:
                    return line
                raise RuntimeError(f"{p.name} exited with {p.popen.wait()}")
        raise TimeoutError(f"{p.name}: no answer in {self.timeout:.0f} s")

    def run(self) -> list[dict[str, Any]]:
        for p in self.procs:
            self._line(p)  # "ready"
        for p in self.procs:
            assert p.popen.stdin is not None
            p.popen.stdin.write("go\n")
            p.popen.stdin.flush()
        return [json.loads(self._line(p)) for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


# ------------------------------------------------------------------ the stream cells


def _workers_up(frontend: str, n: int, timeout: float = 60.0) -> None:
    from zserve.client import Client

    deadline = time.monotonic() + timeout
    with Client(frontend, timeout=5) as c:
        while len(c.status().get("workers", [])) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} workers did not register in {timeout:.0f} s")
            time.sleep(0.2)


def _token_messages(frontend: str) -> int:
    from zserve.client import Client

    with Client(frontend, timeout=5) as c:
        return int(c.status()["counters"].get("token_messages", 0))


def _idle_cpu_rate(pid: int, seconds: float = 0.5) -> float:
    """CPU seconds per second ``pid`` uses with nothing to do (heartbeats, timers)."""
    c0 = cpu_seconds(pid)
    time.sleep(seconds)
    return (cpu_seconds(pid) - c0) / seconds


def _paced_worker(backend: str, capacity: int = CAPACITY, delay: float = STEP) -> Proc:
    args = ["--engine", "null", "--model", MODEL, "--capacity", str(capacity)]
    if delay:
        args += ["--token-delay", str(delay), "--engine-arg=pacing=step",
                 "--engine-arg=stamp=true"]  # fmt: skip
    return start_worker(backend, *args, log_level="error",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip


def stream_cells(s: Settings) -> list[dict[str, Any]]:
    cells: list[dict[str, Any]] = []
    for nw in s.workers:
        with ExitStack() as stack:
            broker, fe, be = start_broker("--max-queue", "8192", log_level="error")
            stack.callback(broker.stop)
            for _ in range(nw):
                stack.callback(_paced_worker(be).stop)
            _workers_up(fe, nw)
            for streams in [x for x in s.streams if x <= nw * CAPACITY]:
                k = min(s.clients, streams)
                split = [streams // k + (1 if i < streams % k else 0) for i in range(k)]
                clients = Clients([["--child", "streams", "--frontend", fe, "--streams",
                                    str(n), "--tokens", str(s.tokens)] for n in split])  # fmt: skip
                stack.callback(clients.stop)
                idle_cpu = _idle_cpu_rate(broker.pid)
                m0 = _token_messages(fe)
                idle = rss_kib(broker.pid) or 0
                rss = RssSampler(broker.pid, 0.05).start()
                cpu0, w0, busy0 = cpu_seconds(broker.pid), time.monotonic(), machine_busy()
                got = clients.run()
                cpu, cpu_wall = cpu_seconds(broker.pid) - cpu0, time.monotonic() - w0
                machine = busy_share(busy0, machine_busy())
                rss.stop()
                clients.stop()
                messages = _token_messages(fe) - m0
                tokens = sum(g["tokens"] for g in got)
                wall = max(g["t1"] for g in got) - min(g["t0"] for g in got)
                net = max(0.0, cpu - idle_cpu * cpu_wall)
                added = [x / 1e3 for g in got for x in g["added_ms"]]
                lat = latency_summary_ms(added)
                cell = {
                    "workers": nw, "streams": streams, "client_processes": k,
                    "tokens": tokens, "short_streams": sum(g["bad"] for g in got),
                    "tok_s": round(tokens / wall, 1),
                    "ideal_tok_s": round(streams / STEP, 1),
                    # share of all cores busy during the cell (clients and workers too)
                    "machine_cpu_busy": round(machine, 3),
                    "added_ms": {x: lat[x] for x in ("p50_ms", "p90_ms", "p99_ms", "max_ms")},
                    "broker_cpu_s_per_1000_tokens": round(cpu * 1000 / tokens, 4),
                    "broker_cpu_s_per_1000_tokens_less_idle": round(net * 1000 / tokens, 4),
                    "broker_idle_cpu_per_s": round(idle_cpu, 4),
                    "token_messages": messages,
                    "tokens_per_message": round(tokens / messages, 2) if messages > 0 else None,
                    "broker_cpu_us_per_message": round(cpu * 1e6 / messages, 2)
                    if messages > 0 else None,
                    "broker_rss_mib": {"before": mib(idle), "peak": mib(rss.peak_kib())},
                    "broker_kib_per_1000_in_flight": round(
                        (rss.peak_kib() - idle) * 1000 / streams, 1),
                }  # fmt: skip
                cells.append(cell)
                print(f"  {nw} workers x {streams:5d} streams: {cell['tok_s']:>10,.0f} tok/s "
                      f"(ideal {cell['ideal_tok_s']:,.0f}), added p50 {lat['p50_ms']:.2f} "
                      f"p99 {lat['p99_ms']:.2f} ms, machine {machine:.0%} busy, broker "
                      f"{cell['broker_cpu_s_per_1000_tokens'] * 1e3:.1f} ms CPU/1000 tok",
                      flush=True)  # fmt: skip
    return cells


# ------------------------------------------------------------------ 1-token rate


def rate_turns(s: Settings) -> dict[str, Any]:
    from bench.floor import start_floor

    out: dict[str, Any] = {"zserve": [], "floor": []}
    with ExitStack() as stack:
        broker, fe, be = start_broker("--max-queue", "8192", log_level="error")
        stack.callback(broker.stop)
        stack.callback(_paced_worker(be, capacity=1024, delay=0.0).stop)
        _workers_up(fe, 1)
        fwd, fworker, ffe = start_floor()
        stack.callback(fwd.stop)
        stack.callback(fworker.stop)
        sides = {"zserve": (fe, broker.pid), "floor": (ffe, fwd.pid)}
        for r in range(s.rate_rounds):
            for kind in (("zserve", "floor") if r % 2 == 0 else ("floor", "zserve")):
                front, pid = sides[kind]
                clients = Clients([["--child", kind, "--frontend", front, "--seconds",
                                    str(s.rate_seconds)]] * s.rate_clients)  # fmt: skip
                stack.callback(clients.stop)
                cpu0, busy0 = cpu_seconds(pid), machine_busy()
                got = clients.run()
                cpu, busy = cpu_seconds(pid) - cpu0, busy_share(busy0, machine_busy())
                clients.stop()
                n = sum(g["requests"] for g in got)
                wall = max(g["t1"] for g in got) - min(g["t0"] for g in got)
                out[kind].append({"req_s": round(n / wall, 1), "requests": n,
                                  "broker_cpu_us_per_request": round(cpu * 1e6 / n, 2),
                                  "machine_cpu_busy": round(busy, 3)})
                print(f"  rate {kind:6s}: {n / wall:>9,.0f} req/s "
                      f"({cpu * 1e6 / n:.1f} us broker CPU each)", flush=True)
    return {
        k: {"req_s": median([x["req_s"] for x in v]),
            "broker_cpu_us_per_request": median([x["broker_cpu_us_per_request"] for x in v]),
            "machine_cpu_busy": median([x["machine_cpu_busy"] for x in v]),
            "turns": v}
        for k, v in out.items()
    }  # fmt: skip


# ------------------------------------------------------------------ report


def evaluate(cells: list[dict[str, Any]], rate: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    big = [c for c in cells if c["workers"] == max(x["workers"] for x in cells)]
    if big:
        top = max(big, key=lambda c: c["streams"])
        rows.append({
            "workload": f"added latency per token, {top['workers']} workers x "
                        f"{top['streams']} streams, p99 (ms)",
            "base": top["added_ms"]["p50_ms"], "baseline": "its own p50",
            "zserve": top["added_ms"]["p99_ms"], "ratio": None,
            "target": f"<= {ADDED_P99_MAX_MS:g}",
            "pass": top["added_ms"]["p99_ms"] <= ADDED_P99_MAX_MS,
        })  # fmt: skip
        lo, hi = min(big, key=lambda c: c["streams"]), top
        a, b = lo["broker_cpu_s_per_1000_tokens"], hi["broker_cpu_s_per_1000_tokens"]
        am, bm = lo["broker_cpu_us_per_message"], hi["broker_cpu_us_per_message"]
        rows.append({
            "workload": f"broker CPU ms per 1000 tokens, {lo['streams']} -> {hi['streams']} "
                        "streams",
            "base": round(a * 1e3, 2), "baseline": f"{lo['streams']} streams",
            "zserve": round(b * 1e3, 2), "ratio": round(b / a, 3),
            # "Flat" read as "does not grow": per token it falls as messages fill up.
            "target": f"grows <= {CPU_FLAT_WITHIN:.0%}",
            "pass": b / a - 1 <= CPU_FLAT_WITHIN,
        })  # fmt: skip
        if am and bm:
            rows.append({
                "workload": f"broker CPU us per token message, {lo['streams']} -> "
                            f"{hi['streams']} streams",
                "base": am, "baseline": f"{lo['streams']} streams", "zserve": bm,
                "ratio": round(bm / am, 3), "target": "-", "pass": None,
            })  # fmt: skip
        rows.append({
            "workload": "broker memory per 1000 requests in flight (KiB), "
                        f"{top['streams']} streams",
            "base": None, "baseline": "-", "zserve": top["broker_kib_per_1000_in_flight"],
            "ratio": None, "target": "-", "pass": None,
        })  # fmt: skip
    z, f = rate["zserve"]["req_s"], rate["floor"]["req_s"]
    rows.append({
        "workload": "1-token requests/s, one broker, 8 client processes",
        "base": f, "baseline": "bare ROUTER/ROUTER forwarder", "zserve": z,
        "ratio": round(z / f, 3),
        "target": f">= {RATE_MIN:,.0f} and >= {RATE_RATIO_MIN}x",
        "pass": z >= RATE_MIN and z / f >= RATE_RATIO_MIN,
    })  # fmt: skip
    # On 2 shared cores the clients and workers run out of CPU long before the
    # broker does (machine_cpu_busy): what one broker carries with a core of
    # its own follows from its CPU per request.
    zc, fc = (rate[k]["broker_cpu_us_per_request"] for k in ("zserve", "floor"))
    rows.append({
        "workload": "1-token requests/s one broker carries on a core of its own "
                    "(1 / its CPU per request)",
        "base": round(1e6 / fc, 1), "baseline": "bare ROUTER/ROUTER forwarder",
        "zserve": round(1e6 / zc, 1), "ratio": round(fc / zc, 3),
        "target": "-", "pass": None,
    })  # fmt: skip
    rows.append({
        "workload": "broker CPU per 1-token request (us)",
        "base": rate["floor"]["broker_cpu_us_per_request"], "baseline": "bare forwarder",
        "zserve": rate["zserve"]["broker_cpu_us_per_request"],
        "ratio": round(rate["zserve"]["broker_cpu_us_per_request"]
                       / rate["floor"]["broker_cpu_us_per_request"], 3),
        "target": "-", "pass": None,
    })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter streams, fewer client processes")
    ap.add_argument("--out", default="scale.json", help="file name under bench/results/")
    ap.add_argument("--child", choices=("streams", "zserve", "floor"), help=argparse.SUPPRESS)
    ap.add_argument("--frontend", help=argparse.SUPPRESS)
    ap.add_argument("--streams", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return _child_main(a)
    s = QUICK if a.quick else FULL
    t0 = time.monotonic()
    load_before = os.getloadavg()
    print(f"streams: {s.workers} workers x {s.streams} streams, {s.tokens} tokens each, "
          f"{STEP * 1e3:g} ms steps", flush=True)  # fmt: skip
    cells = stream_cells(s)
    print("1-token rate, zserve and the bare forwarder taking turns:", flush=True)
    rate = rate_turns(s)
    rows = evaluate(cells, rate)
    result = result_record("scale", a.quick, t0, {
        "load_average_1_5_15": {"before": [round(x, 2) for x in load_before],
                                "after": [round(x, 2) for x in os.getloadavg()]},
        "settings": {**asdict(s), "step_s": STEP, "capacity": CAPACITY,
                     "rate_window": RATE_WINDOW},
        "rows": rows,
        "pass": all_met(rows),
        "cells": cells,
        "rate": rate,
    })  # fmt: skip
    path = write_json(a.out, result)
    try:
        from bench.plots import scale as plot

        plot(path.parent, path.name)
    except Exception as e:  # noqa: BLE001 - the numbers stand without the plot
        print(f"plot failed: {e}", file=sys.stderr)
    print(format_table(
        ["workers x streams", "tok/s", "ideal", "added p50 ms", "added p99 ms",
         "machine busy", "broker ms CPU/1k tok", "(less idle)", "tok/msg", "us CPU/msg",
         "broker KiB/1k in flight"],
        [[f"{c['workers']} x {c['streams']}", c["tok_s"], c["ideal_tok_s"],
          c["added_ms"]["p50_ms"], c["added_ms"]["p99_ms"],
          f"{c['machine_cpu_busy']:.0%}", c["broker_cpu_s_per_1000_tokens"] * 1e3,
          c["broker_cpu_s_per_1000_tokens_less_idle"] * 1e3, c["tokens_per_message"],
          c["broker_cpu_us_per_message"], c["broker_kib_per_1000_in_flight"]]
         for c in cells],
    ))  # fmt: skip
    print()
    print(format_table(["workload", "baseline", "base", "zserve", "ratio", "target", "pass?"],
                       [[r["workload"], r["baseline"], r["base"], r["zserve"], r["ratio"],
                         r["target"], r["pass"]] for r in rows]))  # fmt: skip
    print(f"\nall targets met: {'yes' if result['pass'] else 'NO'}   ({result['wall_s']} s, "
          f"{path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
