"""Where each serving process's time goes, per output token: zserve + vLLM
against ``vllm serve`` on the same engine settings (``bench/vllm_server.py``'s).

``python -m bench.wakeups [--levels 8,32] [--rounds 4]`` starts both servers
(``serving.both_sides``), loads them in alternating turns with the same
streams, and reads from ``/proc`` for every thread of every process of each
side (the serving layer and vLLM's engine processes):

* CPU per token (``schedstat``: time on a CPU);
* wake-ups per token (``voluntary_ctxt_switches``: each time a thread slept
  and was woken by a message, a timer or a lock);
* run-queue wait per token (``schedstat``: time runnable but waiting for a
  core), which is what the process lost to the others on this machine.

A profile by process and thread rather than by function: on a 2-core
machine with vLLM's two engine processes busy-polling, what decides the
serving layer's CPU and its tail latency is how often each process wakes,
what a wake-up costs, and how long it waits for a core
(docs/performance.md). Prints a table; writes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.common import format_table, tree_pids
from bench.serving import both_sides
from bench.vllm_server import ENGINE, FULL, _turn

SIDES = ("zserve", "vllm_serve")
PARENT = {"zserve": "worker", "vllm_serve": "api_server"}


def _threads(pid: int) -> dict[int, tuple[int, int, int]]:
    """tid -> (ns on a CPU, ns waiting for one, voluntary switches)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                run, wait, _ = f.read().split()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                vol = next(int(x.split()[1]) for x in f if x.startswith("voluntary_ctxt"))
            out[int(tid)] = (int(run), int(wait), vol)
        except (OSError, StopIteration, ValueError):
            pass
    return out


def _procs(side: str, serving: dict[str, int]) -> dict[str, int]:
    """The side's processes by role; vLLM's engine processes by their name."""
    procs = dict(serving)
    for key, pid in tree_pids(PARENT[side], serving[PARENT[side]]).items():
        if "/" in key:
            try:
                with open(f"/proc/{pid}/comm") as f:
                    procs[f.read().strip()] = pid
            except OSError:
                pass
    return procs


def measure(levels: list[int], rounds: int) -> dict[str, dict[int, dict[str, list[float]]]]:
    """side -> level -> process -> [cpu ns, wait ns, wake-ups, tokens]."""
    acc: dict[str, dict[int, dict[str, list[float]]]] = {
        s: {n: defaultdict(lambda: [0.0, 0.0, 0.0]) for n in levels} for s in SIDES
    }
    tokens = {s: dict.fromkeys(levels, 0) for s in SIDES}
    with tempfile.TemporaryDirectory(prefix="zserve-wakeups-") as tmp:
        with both_sides(Path(tmp), ENGINE) as sides:
            for n in levels:
                for r in range(rounds):
                    for side in SIDES if r % 2 == 0 else SIDES[::-1]:
                        root, procs = sides.roots[side], _procs(side, sides.serving[side])
                        asyncio.run(_turn(root, n, FULL, warm=True))
                        before = {k: _threads(p) for k, p in procs.items()}
                        got = asyncio.run(_turn(root, n, FULL, warm=False))
                        tokens[side][n] += got["tokens"]
                        for k, p in procs.items():
                            after = _threads(p)
                            for tid, (run, wait, vol) in after.items():
                                r0, w0, v0 = before[k].get(tid, (0, 0, 0))
                                a = acc[side][n][k]
                                a[0] += run - r0
                                a[1] += wait - w0
                                a[2] += vol - v0
    return {
        s: {n: {k: [*v, tokens[s][n]] for k, v in acc[s][n].items()} for n in levels}
        for s in SIDES
    }


def render(m: dict[str, dict[int, dict[str, list[float]]]]) -> str:
    rows = []
    for side, by_level in m.items():
        for n, by_proc in by_level.items():
            for proc, (run, wait, vol, tok) in by_proc.items():
                if not tok or run / tok < 500:  # under 0.5 us a token: idle helpers
                    continue
                rows.append([side, n, proc, round(run / tok / 1e3, 1), round(wait / tok / 1e3, 1),
                             round(vol / tok, 2), round(run / max(vol, 1) / 1e3, 1)])  # fmt: skip
    return format_table(["side", "streams", "process", "CPU us/token", "run-queue wait us/token",
                         "wake-ups/token", "CPU us/wake-up"], rows)  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.wakeups", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--levels", default="8,32", help="concurrent streams, comma-separated")
    ap.add_argument("--rounds", type=int, default=4, help="turns per side and level")
    a = ap.parse_args(argv)
    print(render(measure([int(x) for x in a.levels.split(",")], a.rounds)))


if __name__ == "__main__":
    main()
