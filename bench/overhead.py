"""zserve's native path against the bare pyzmq floor, in the same run.

``python -m bench.overhead [--quick]`` starts, side by side on loopback
ephemeral ports:

* zserve: ``zserve broker`` + one ``zserve worker --engine null --capacity 256``,
  driven by the real ``zserve.Client`` / ``zserve.AsyncClient`` from this process;
* the floor (``bench/floor.py``): a bare ROUTER/ROUTER forwarder with no
  bookkeeping + a bare pyzmq worker, driven by a bare DEALER from this process.

Workloads (null engine, tokens counted from the records' token ids and
checked against what was asked):

* 1-token request, sequential, p50 / p99 latency;
* one stream of 2000 tokens (the floor: one message per token);
* 32 concurrent streams x 128 tokens (the floor: one message per token);
* 256 concurrent streams x 1000 tokens into one client (the floor: one
  message per step carrying a token for each stream), repeated after a
  warm-up while the broker's RSS is sampled.

CURVE on and off, in the same run: a second zserve stack (broker + null
worker) with CurveZMQ on both broker sockets (``zserve.security`` key set in
a temporary directory), driven by clients holding a listed key. It runs the
1-token latency and the 256-stream workload beside the plain stack, and the
rows compare it with the plain zserve stack (target: p50 <= 1.3x CURVE off,
256 streams >= 250k tokens/s).

Issue 25's target on the 256-stream workload: >= 1,000,000 tokens/s and
>= 0.45x the floor's, in the same run (docs/performance.md says where the
time goes).

Floor, zserve and zserve with CURVE alternate, round by round, so that drift
on a shared machine hits all alike. Prints a table and writes
bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import (
    CpuMeter,
    RssSampler,
    all_met,
    format_table,
    latency_summary_ms,
    median,
    result_record,
    targets_table,
    write_json,
)
from bench.floor import FloorClient, start_floor
from zserve import AsyncClient, Client
from zserve.launcher import Proc, start_broker, start_worker, wait_for
from zserve.security import ensure_key_set

log = logging.getLogger(__name__)

MODEL = "m"
PROMPT = "x"

# Targets (from the issue): ratios are zserve / floor measured in this run.
P50_RATIO_MAX = 1.5
P99_RATIO_MAX = 2.0
STREAMS_256_MIN_TOK_S = 250_000.0
# Issue 25: 256 null streams through one AsyncClient, absolute and against the floor.
STREAMS_256_TARGET_TOK_S = 1_000_000.0
STREAMS_256_TARGET_RATIO = 0.45
CURVE_P50_RATIO_MAX = 1.3  # CURVE on / CURVE off, 1-token p50
# "Broker memory flat": after the warm-up run, repeating the 256-stream
# workload grows RSS by no more than this (see _rss_growth; ZeroMQ's buffers
# and the allocator move it by about 1 MiB either way from run to run).
RSS_NOISE_MIB = 2.0


@dataclass(frozen=True)
class Settings:
    latency_samples: int  # 1-token requests measured, per side
    latency_warmup: int  # 1-token requests before measuring, per side
    rounds: int  # latency samples are taken in this many alternating blocks
    single_repeats: int  # one 2000-token stream
    c32_repeats: int  # 32 x 128
    c256_repeats: int  # 256 x 1000, after one warm-up run
    single_tokens: int = 2000
    c32: tuple[int, int] = (32, 128)
    c256: tuple[int, int] = (256, 1000)


FULL = Settings(
    latency_samples=2000, latency_warmup=300, rounds=10,
    single_repeats=10, c32_repeats=20, c256_repeats=10,
)
QUICK = Settings(
    latency_samples=400, latency_warmup=100, rounds=4,
    single_repeats=2, c32_repeats=3, c256_repeats=2,
)


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop where installed, as zserve's own processes do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def _check(counts: list[int], want: int, what: str) -> None:
    bad = [c for c in counts if c != want]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} stream(s) got {bad[:5]} tokens, asked {want}")


# ------------------------------------------------------------------ zserve side


async def _zserve_streams(
    frontend: str, concurrency: int, n: int, meter: CpuMeter | None = None,
    keys: dict[str, str] | None = None,
) -> tuple[float, list[int]]:
    """``concurrency`` streams of ``n`` tokens through one AsyncClient; (seconds, counts).
    ``keys``: the client's CURVE keys, for the CURVE stack."""

    async def one(ac: AsyncClient) -> int:
        got = 0
        async for d in ac.stream(MODEL, PROMPT, max_tokens=n):
            if d.token_ids:
                got += len(d.token_ids)
        return got

    async with AsyncClient(frontend, timeout=60, **(keys or {})) as ac:
        await ac.models()  # connected and the broker answering before the clock starts
        if meter is not None:
            meter.start()
        t0 = time.perf_counter()
        counts = await asyncio.wait_for(
            asyncio.gather(*(one(ac) for _ in range(concurrency))), 120
        )
        elapsed = time.perf_counter() - t0
        if meter is not None:
            meter.stop()
    return elapsed, list(counts)


def _zserve_one_token(c: Client) -> float:
    t0 = time.perf_counter()
    r = c.generate(MODEL, PROMPT, max_tokens=1)
    dt = time.perf_counter() - t0
    if not r.token_ids or len(r.token_ids) != 1:
        raise RuntimeError(f"zserve 1-token request returned {r.token_ids!r}")
    return dt


def _token_messages(c: Client) -> int:
    """TOKENS messages the broker has forwarded to clients so far."""
    return int(c.status()["counters"].get("token_messages", 0))


# ------------------------------------------------------------------ floor side


def _floor_one_token(fc: FloorClient) -> float:
    t0 = time.perf_counter()
    got = fc.request(1)
    dt = time.perf_counter() - t0
    if got != 1:
        raise RuntimeError(f"floor 1-token request returned {got} tokens")
    return dt


def _floor_streams(
    fc: FloorClient, concurrency: int, n: int, per_step: bool, meter: CpuMeter | None = None
) -> float:
    if meter is not None:
        meter.start()
    t0 = time.perf_counter()
    counts = fc.streams(concurrency, n, per_step)
    elapsed = time.perf_counter() - t0
    if meter is not None:
        meter.stop()
    _check(counts, n, f"floor {concurrency}x{n}")
    return elapsed


# ------------------------------------------------------------------ workloads


@dataclass
class Stacks:
    """Both stacks as the workloads drive them."""

    fc: FloorClient
    zc: Client
    zserve_frontend: str
    floor_pids: dict[str, int]  # client / broker / worker
    zserve_pids: dict[str, int]
    cc: Client  # the CURVE stack's
    curve_frontend: str
    curve_pids: dict[str, int]
    curve_keys: dict[str, str]  # the client's curve_secret / curve_server


def _latency(s: Settings, st: Stacks) -> dict[str, Any]:
    for _ in range(s.latency_warmup):
        _floor_one_token(st.fc)
        _zserve_one_token(st.zc)
        _zserve_one_token(st.cc)
    fm, zm = CpuMeter(st.floor_pids), CpuMeter(st.zserve_pids)
    cm = CpuMeter(st.curve_pids)
    floor: list[float] = []
    zs: list[float] = []
    cs: list[float] = []
    block = max(1, s.latency_samples // s.rounds)
    sides = [(zm, zs, st.zc), (cm, cs, st.cc)]
    while len(zs) < s.latency_samples:
        k = min(block, s.latency_samples - len(zs))
        fm.start()
        floor.extend(_floor_one_token(st.fc) for _ in range(k))
        fm.stop()
        for meter, out, client in sides:
            meter.start()
            out.extend(_zserve_one_token(client) for _ in range(k))
            meter.stop()
        sides.reverse()  # CURVE off and on take turns at going first
    return {
        "floor": {**latency_summary_ms(floor), "cpu_us_per_request": fm.per(len(floor))},
        "zserve": {**latency_summary_ms(zs), "cpu_us_per_request": zm.per(len(zs))},
        "zserve_curve": {**latency_summary_ms(cs), "cpu_us_per_request": cm.per(len(cs))},
    }


def _side(
    rates: list[float], messages: float, tokens: int, meter: CpuMeter, repeats: int
) -> dict[str, Any]:
    return {
        "tok_s": round(median(rates), 1),
        "runs_tok_s": [round(x, 1) for x in rates],
        "messages_per_run": round(messages, 1),
        "tokens_per_message": round(tokens / messages, 2) if messages else None,
        "cpu_us_per_token": meter.per(tokens * repeats),
        "broker_cpu_us_per_message": (
            round(meter.used["broker"] * 1e6 / (messages * repeats), 2) if messages else None
        ),
    }


def _throughput(
    st: Stacks,
    repeats: int,
    concurrency: int,
    n: int,
    per_step: bool,
    after_run: Callable[[int], None] | None = None,
    curve: bool = False,
) -> dict[str, Any]:
    """Alternate floor and zserve runs (and zserve with CURVE, with ``curve``);
    tokens/s per run, medians, CPU per token."""
    total = concurrency * n
    fm, zm = CpuMeter(st.floor_pids), CpuMeter(st.zserve_pids)
    cm = CpuMeter(st.curve_pids)
    ft: list[float] = []
    zt: list[float] = []
    ct: list[float] = []
    fmsg0, zmsg0 = st.fc.messages, _token_messages(st.zc)
    cmsg0 = _token_messages(st.cc) if curve else 0
    for i in range(repeats):
        ft.append(total / _floor_streams(st.fc, concurrency, n, per_step, fm))
        elapsed, counts = _run_async(_zserve_streams(st.zserve_frontend, concurrency, n, zm))
        _check(counts, n, f"zserve {concurrency}x{n}")
        zt.append(total / elapsed)
        if after_run is not None:
            after_run(i)
        if curve:
            elapsed, counts = _run_async(
                _zserve_streams(st.curve_frontend, concurrency, n, cm, st.curve_keys)
            )
            _check(counts, n, f"zserve with CURVE {concurrency}x{n}")
            ct.append(total / elapsed)
    fmsgs = (st.fc.messages - fmsg0) / repeats
    zmsgs = (_token_messages(st.zc) - zmsg0) / repeats
    out = {
        "concurrency": concurrency,
        "tokens_per_stream": n,
        "floor_mode": "one message per step" if per_step else "one message per token",
        "floor": _side(ft, fmsgs, total, fm, repeats),
        "zserve": _side(zt, zmsgs, total, zm, repeats),
    }
    if curve:
        cmsgs = (_token_messages(st.cc) - cmsg0) / repeats
        out["zserve_curve"] = _side(ct, cmsgs, total, cm, repeats)
    return out


def run(s: Settings) -> dict[str, Any]:
    procs: list[Proc] = []
    samplers: list[RssSampler] = []
    keydir: tempfile.TemporaryDirectory[str] | None = None
    try:
        fwd, fworker, ffe = start_floor()
        procs += [fwd, fworker]
        broker, fe, be = start_broker(log_level="error")
        procs.append(broker)
        zworker = start_worker(
            be, "--engine", "null", "--model", MODEL, "--capacity", "256", log_level="error"
        )
        procs.append(zworker)
        keydir = tempfile.TemporaryDirectory(prefix="zserve-bench-keys-")
        ks = ensure_key_set(keydir.name)
        curve_keys = {
            "curve_secret": ks.path("client", secret=True), "curve_server": ks.path("broker"),
        }
        cbroker, cfe, cbe = start_broker(*ks.broker_args(), log_level="error")
        procs.append(cbroker)
        cworker = start_worker(
            cbe, "--engine", "null", "--model", MODEL, "--capacity", "256",
            *ks.peer_args("worker"), log_level="error",
        )  # fmt: skip
        procs.append(cworker)
        for frontend, kw in ((fe, {}), (cfe, curve_keys)):
            with Client(frontend, timeout=5, **kw) as c:
                wait_for(lambda c=c: MODEL in c.models(), 30, f"model {MODEL} at {frontend}")
        b_rss = RssSampler(broker.pid).start()
        f_rss = RssSampler(fwd.pid).start()
        samplers += [b_rss, f_rss]
        me = os.getpid()

        with (
            FloorClient(ffe) as fc,
            Client(fe, timeout=60) as zc,
            Client(cfe, timeout=60, **curve_keys) as cc,
        ):
            st = Stacks(
                fc, zc, fe,
                {"client": me, "broker": fwd.pid, "worker": fworker.pid},
                {"client": me, "broker": broker.pid, "worker": zworker.pid},
                cc, cfe,
                {"client": me, "broker": cbroker.pid, "worker": cworker.pid},
                curve_keys,
            )  # fmt: skip
            latency = _latency(s, st)
            single = _throughput(st, s.single_repeats, 1, s.single_tokens, per_step=False)
            c32 = _throughput(st, s.c32_repeats, *s.c32, per_step=False)

            c, n = s.c256
            # Warm-up: one run each; the plateau starts after it.
            b_rss.mark("before_warmup")
            _floor_streams(fc, c, n, per_step=True)
            _, counts = _run_async(_zserve_streams(fe, c, n))
            _check(counts, n, f"zserve {c}x{n} warm-up")
            _, counts = _run_async(_zserve_streams(cfe, c, n, keys=curve_keys))
            _check(counts, n, f"zserve with CURVE {c}x{n} warm-up")
            b_rss.mark("after_warmup")
            f_rss.mark("after_warmup")
            per_run: list[float] = []

            def after_run(i: int) -> None:
                f_rss.mark(f"after_run_{i + 1}")
                kib = b_rss.mark(f"after_run_{i + 1}")
                if kib is not None:
                    per_run.append(round(kib / 1024, 2))

            c256 = _throughput(
                st, s.c256_repeats, c, n, per_step=True, after_run=after_run, curve=True
            )
            c256["zserve"]["broker_rss_after_each_run_mib"] = per_run
        for smp in samplers:
            smp.stop()
    finally:
        for smp in samplers:
            smp.stop()
        for pr in reversed(procs):
            pr.stop()
        if keydir is not None:
            keydir.cleanup()
    return {
        "latency_1_token": latency,
        "one_stream": single,
        "concurrent_32": c32,
        "streams_256": c256,
        "broker_rss": b_rss.summary(),
        "floor_forwarder_rss": f_rss.summary(),
    }


# ------------------------------------------------------------------ report


def _rss_growth(summary: dict[str, Any]) -> float:
    """Growth from repeating the workload: later runs' median RSS minus earlier runs'.

    Each run's RSS is sampled right after it ends. Medians ignore a single
    spike (ZeroMQ's buffers follow how far the client lagged in that run),
    while a leak of x MiB per run shows up as about x * runs / 2.
    """
    runs = [v for k, v in summary.items() if k.startswith("after_run_")]
    marks = [summary["after_warmup_mib"], *runs]
    half = len(marks) // 2
    return round(median(marks[half:]) - median(marks[:half]), 2)


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    """The table rows: workload, floor, zserve, ratio (zserve / floor), target, pass."""
    lat = m["latency_1_token"]
    rows: list[dict[str, Any]] = []

    def row(
        workload: str, floor: float, zs: float, target: str, ok: bool | None
    ) -> None:
        rows.append(
            {
                "workload": workload,
                "floor": floor,
                "zserve": zs,
                "ratio": round(zs / floor, 3) if floor else None,
                "target": target,
                "pass": ok,
            }
        )

    f50, z50 = lat["floor"]["p50_ms"], lat["zserve"]["p50_ms"]
    f99, z99 = lat["floor"]["p99_ms"], lat["zserve"]["p99_ms"]
    row("1-token request p50 (ms)", f50, z50, f"<= {P50_RATIO_MAX}x floor",
        z50 <= P50_RATIO_MAX * f50)
    row("1-token request p99 (ms)", f99, z99, f"<= {P99_RATIO_MAX:g}x floor",
        z99 <= P99_RATIO_MAX * f99)
    for key, label in (
        ("one_stream", "one stream x {n} (tok/s)"),
        ("concurrent_32", "{c} concurrent x {n} (tok/s)"),
    ):
        w = m[key]
        row(label.format(c=w["concurrency"], n=w["tokens_per_stream"]),
            w["floor"]["tok_s"], w["zserve"]["tok_s"], "-", None)
    w = m["streams_256"]
    z = w["zserve"]["tok_s"]
    row(f"{w['concurrency']} streams x {w['tokens_per_stream']} (tok/s)",
        w["floor"]["tok_s"], z, f">= {STREAMS_256_MIN_TOK_S:,.0f}", z >= STREAMS_256_MIN_TOK_S)
    fz = w["floor"]["tok_s"]
    row(f"{w['concurrency']} streams x {w['tokens_per_stream']} (tok/s), issue 25",
        fz, z, f">= {STREAMS_256_TARGET_TOK_S:,.0f} and >= {STREAMS_256_TARGET_RATIO:g}x floor",
        z >= STREAMS_256_TARGET_TOK_S and z >= STREAMS_256_TARGET_RATIO * fz)
    # CURVE on against CURVE off: the "floor" column holds zserve without CURVE.
    c50 = lat["zserve_curve"]["p50_ms"]
    row("CURVE on: 1-token request p50 (ms)", z50, c50,
        f"<= {CURVE_P50_RATIO_MAX}x CURVE off", c50 <= CURVE_P50_RATIO_MAX * z50)
    cz = w["zserve_curve"]["tok_s"]
    row(f"CURVE on: {w['concurrency']} streams x {w['tokens_per_stream']} (tok/s)", z, cz,
        f">= {STREAMS_256_MIN_TOK_S:,.0f}", cz >= STREAMS_256_MIN_TOK_S)
    fg, zg = _rss_growth(m["floor_forwarder_rss"]), _rss_growth(m["broker_rss"])
    row("broker RSS growth over repeats (MiB)", fg, zg, f"<= {RSS_NOISE_MIB:g} (flat)",
        zg <= RSS_NOISE_MIB)
    return rows


def render(rows: list[dict[str, Any]], m: dict[str, Any]) -> str:
    table = targets_table(rows, "floor")
    # CPU per unit of work, per process: steadier than wall-clock rates on a shared machine.
    cpu_rows: list[list[Any]] = []
    lat = m["latency_1_token"]
    for side in ("floor", "zserve", "zserve_curve"):
        c = lat[side]["cpu_us_per_request"]
        cpu_rows.append([f"1-token request, {side}", "us/request", c["client"], c["broker"],
                         c["worker"], 1.0])
    for key in ("one_stream", "concurrent_32", "streams_256"):
        w = m[key]
        for side in ("floor", "zserve", "zserve_curve"):
            if side not in w:
                continue
            c = w[side]["cpu_us_per_token"]
            cpu_rows.append([f"{w['concurrency']}x{w['tokens_per_stream']}, {side}",
                             "us/token", c["client"], c["broker"], c["worker"],
                             w[side]["tokens_per_message"]])
    cpu = format_table(["CPU time", "unit", "client", "broker", "worker", "tokens/msg"],
                       cpu_rows)
    b = m["broker_rss"]
    return "\n".join([
        table,
        "",
        cpu,
        "",
        f"broker RSS (MiB): start {b['start_mib']}, after warm-up {b['after_warmup_mib']}, "
        f"peak {b['peak_mib']}, end {b['end_mib']}",
        "floor: one message per token for the single stream and 32x128, one per step for "
        "256 streams; zserve coalesces on its own (tokens/msg above).",
        "ratio = zserve / floor; CPU includes each process's ZeroMQ I/O thread.",
        "CURVE rows: the floor column is zserve with CURVE off, zserve_curve the same "
        "stack with CurveZMQ on both broker sockets, measured alternately in this run.",
    ])


def _with_sigterm_as_exit(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run ``fn`` with SIGTERM raising SystemExit, so ``run``'s cleanup still stops the children."""
    if threading.current_thread() is not threading.main_thread():
        return fn()

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples (< 30 s)")
    ap.add_argument("--out", default="overhead.json", help="file name under bench/results/")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    t0 = time.monotonic()
    measured = _with_sigterm_as_exit(lambda: run(s))
    rows = evaluate(measured)
    result = result_record("overhead", a.quick, t0, {
        "loop": _loop_name(), "settings": asdict(s), "rows": rows, "pass": all_met(rows),
        "measured": measured,
    })  # fmt: skip
    path = write_json(a.out, result)
    print(render(rows, measured))
    print(f"\nall targets met: {'yes' if result['pass'] else 'NO'}   "
          f"({result['wall_s']} s, {path})")
    return result


if __name__ == "__main__":
    main()
