"""Helpers every benchmark shares: percentiles, RSS sampling, result tables.

Nothing here starts processes or opens sockets (see ``zserve.launcher`` for
processes): these are the measuring and reporting pieces only.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """p50 / p90 / p99 / p99.9 / max / mean of latencies given in seconds, in
    milliseconds, and ``cdf_ms``: the 0th..100th percentiles (the
    distribution ``bench/plots.py`` draws)."""
    ms = [s * 1000.0 for s in seconds]
    return {
        "n": len(ms),
        "p50_ms": round(percentile(ms, 50), 4),
        "p90_ms": round(percentile(ms, 90), 4),
        "p99_ms": round(percentile(ms, 99), 4),
        "p99.9_ms": round(percentile(ms, 99.9), 4),
        "max_ms": round(max(ms), 4),
        "mean_ms": round(sum(ms) / len(ms), 4),
        "cdf_ms": [round(percentile(ms, q), 4) for q in range(101)],
    }


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; return (seconds, its result)."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ------------------------------------------------------------------ memory


def rss_kib(pid: int) -> int | None:
    """Resident set size of ``pid`` in KiB (VmRSS in /proc/PID/status); None if gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


class RssSampler:
    """Samples one process's RSS from a daemon thread every ``interval`` seconds.

    ``mark(label)`` records a labelled sample on the caller's thread (e.g.
    "after_warmup"), so a report can say where the plateau starts. Reading
    /proc costs a few microseconds, so the thread barely touches the GIL.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic, KiB)
        self.marks: dict[str, int] = {}  # label -> KiB
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self.mark("start")
        self._thread = threading.Thread(target=self._run, name=f"rss-{self.pid}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            kib = rss_kib(self.pid)
            if kib is None:
                return
            self.samples.append((time.monotonic(), kib))

    def mark(self, label: str) -> int | None:
        kib = rss_kib(self.pid)
        if kib is not None:
            self.marks[label] = kib
            self.samples.append((time.monotonic(), kib))
        return kib

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self.mark("end")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def peak_kib(self) -> int:
        return max((k for _, k in self.samples), default=0)

    def summary(self) -> dict[str, Any]:
        """start / peak / end (and every mark) in MiB, plus the sample count."""
        out: dict[str, Any] = {f"{k}_mib": mib(v) for k, v in self.marks.items()}
        out["peak_mib"] = mib(self.peak_kib())
        out["samples"] = len(self.samples)
        return out


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores, from
    /proc/stat; busy is everything but idle and iowait. `busy_share` of two
    readings is the share of the machine's cores in use between them."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(fields[:8])  # guest time is already counted in user
    idle = fields[3] + fields[4]
    return (total - idle) / tick, total / tick


def busy_share(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The share of the machine's cores in use between two `machine_busy` readings."""
    return (after[0] - before[0]) / max(1e-9, after[1] - before[1])


def all_met(rows: list[dict[str, Any]]) -> bool:
    """A run's verdict: no row missed its target (rows without one count as met)."""
    return all(r["pass"] is not False for r in rows)


def result_record(name: str, quick: bool, t0: float, fields: dict[str, Any]) -> dict[str, Any]:
    """What every ``bench/results/<name>.json`` holds: the benchmark, its mode
    and the machine first, then ``fields`` in order, then the seconds since
    ``t0`` (``time.monotonic()``)."""
    return {
        "benchmark": name,
        "mode": "quick" if quick else "full",
        "machine": machine_info(),
        **fields,
        "wall_s": round(time.monotonic() - t0, 1),
    }


def cpu_seconds(pid: int) -> float:
    """CPU time ``pid`` has used so far, all its threads (ZeroMQ's I/O thread too).

    Read from each thread's /proc/PID/task/TID/schedstat (nanoseconds), so
    short phases are measured well below the 10 ms of a clock tick.
    """
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return total / 1e9


def tree_pids(name: str, pid: int) -> dict[str, int]:
    """``pid`` as ``name`` and its descendants (vLLM's engine core) as
    ``name/PID``, for a CpuMeter."""
    import psutil

    pids = {name: pid}
    try:
        for ch in psutil.Process(pid).children(recursive=True):
            pids[f"{name}/{ch.pid}"] = ch.pid
    except psutil.NoSuchProcess:
        pass
    return pids


class CpuMeter:
    """CPU seconds used by named processes between ``start`` and ``stop``.

    Unlike wall-clock rates this barely moves when other work shares the
    machine, so per-message costs stay comparable between runs. Resolution is
    nanoseconds, but a thread that ends between two reads takes its time along.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.used: dict[str, float] = dict.fromkeys(pids, 0.0)
        self._t0: dict[str, float] = {}

    def start(self) -> None:
        self._t0 = {k: cpu_seconds(p) for k, p in self.pids.items()}

    def stop(self) -> None:
        for k, p in self.pids.items():
            self.used[k] += cpu_seconds(p) - self._t0[k]

    def per(self, n: int, scale: float = 1e6) -> dict[str, float]:
        """CPU per unit (microseconds by default) for each process."""
        return {k: round(v * scale / n, 3) for k, v in self.used.items()}


def mib(kib: int) -> float:
    return round(kib / 1024.0, 2)


# ------------------------------------------------------------------ reporting


def machine_info() -> dict[str, Any]:
    import msgpack
    import zmq

    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": _commit(),
    }


def _commit() -> str | None:
    """The checkout's commit, with ``+`` when the tree has changes (None
    outside a git checkout): which code a result measured."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
            text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+" if dirty else "")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width text table (first column left-aligned, others right)."""
    cells = [[str(h) for h in headers]] + [[cell(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        cols = zip(r[1:], widths[1:], strict=True)
        parts = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in cols]
        return " | ".join(parts)

    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep, *(line(r) for r in cells[1:])])


def cell(v: Any) -> str:
    """One table cell: - for None, yes/NO for bools, numbers to a sensible precision."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v >= 1000:
            return f"{v:,.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.3f}"
    return str(v)


def targets_table(rows: Sequence[dict[str, Any]], baseline: str) -> str:
    """The table of a benchmark's target rows: {workload, ``baseline`` (the
    baseline's figure), zserve, ratio, target, pass}."""
    return format_table(
        ["workload", baseline, "zserve", "ratio", "target", "pass?"],
        [[r["workload"], r[baseline], r["zserve"], r["ratio"], r["target"], r["pass"]]
         for r in rows],
    )  # fmt: skip


def write_json(name: str, data: dict[str, Any], directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def run_and_report(
    name: str,
    doc: str | None,
    argv: list[str] | None,
    settings: tuple[Any, Any],
    run: Callable[[Any], dict[str, Any]],
    evaluate: Callable[[dict[str, Any]], list[dict[str, Any]]],
    *,
    quick_help: str,
    column: str = "zserve",
) -> dict[str, Any]:
    """A benchmark's ``main``: ``--quick`` picks ``settings[1]`` over
    ``settings[0]``; the rows of ``evaluate`` ({workload, baseline (its name),
    base (its figure), zserve, ratio?, target, pass}) go to
    ``bench/results/<name>.json`` and to a printed table."""
    import argparse
    from dataclasses import asdict

    ap = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=quick_help)
    a = ap.parse_args(argv)
    s = settings[1] if a.quick else settings[0]
    t0 = time.monotonic()
    measured = run(s)
    rows = evaluate(measured)
    result = result_record(name, a.quick, t0, {
        "settings": asdict(s), "rows": rows, "pass": all_met(rows), "measured": measured,
    })  # fmt: skip
    path = write_json(f"{name}.json", result)
    print(format_table(
        ["workload", "baseline", "", column, "ratio", "target", "met"],
        [[r["workload"], r["baseline"], r["base"], r["zserve"], r.get("ratio", "-"), r["target"],
          "-" if r["pass"] is None else "yes" if r["pass"] else "NO"] for r in rows],
    ))  # fmt: skip
    print(f"\n({result['wall_s']} s, {path})")
    return result
