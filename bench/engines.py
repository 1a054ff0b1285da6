"""Real engines through zserve against the same engine driven directly, in the same run.

``python -m bench.engines [--quick] [--engines hf,vllm] [--models tiny,small]``
measures, for each engine, on two random-weight Llamas (``zserve.tiny_model``,
written to a temporary directory): ``tiny`` (hidden 128, 2 layers: a decode
step of 1.3-3 ms, so any per-token serving cost shows) and ``small`` (hidden
768, 8 layers, 58 M parameters: a step of 10-20 ms on one core, like a real
model on a GPU); results of the small model are keyed ``hf-small``,
``vllm-small``:

* **direct**: the engine alone in one process, no broker, no sockets (a child
  process of this bench, ``--direct ENGINE``, so that it runs on the same
  footing as a worker process):

  - ``hf``: zserve's ``HFEngine``, its async ``generate()`` driven with
    ``asyncio.gather`` (the engine's own continuous batching included);
  - ``vllm``: vLLM's own ``AsyncLLM.generate`` with the same
    ``SamplingParams`` zserve builds (``RequestOutputKind.DELTA``, greedy,
    ``ignore_eos``, ``max_tokens``), prompts as text, so zserve's vLLM wrapper
    is part of what is compared;

* **zserve**: ``zserve broker`` + ``zserve worker --engine hf|vllm --capacity 32``
  as real processes on ephemeral loopback ports, driven by one
  ``zserve.AsyncClient`` in this process.

Workload: N concurrent requests (N = 1, 8, 32), fixed prompts, greedy,
``ignore_eos`` and a fixed ``max_tokens``, so both sides generate exactly the
same number of tokens (counted from the deltas' token ids and checked). A
run's rate is N x max_tokens / (time from the first request sent to the last
token received). Both sides are warmed up at every concurrency level first;
then direct and zserve runs alternate (the order flips every round) and never
overlap. Before every run the bench waits until the engine processes of both
sides are quiet (vLLM's executor worker spins on ``sched_yield`` for about a
second after its last step; OpenMP threads spin briefly), so one side's
spinning never eats into the other's run; the CPU the idle side used during
each run is measured and shown. Rates are medians over the rounds; the best
run of each side is kept in the JSON too.

**Time to first token, hf** (both models), from a request's send to its
first delta, measured three ways: in the direct process with the prompts
that join at one step prefilled together (``after``, the default) and one at
a time (``before``: the same engine with ``batch_prefill`` off, toggled
between runs in the same process), alternating; and through zserve (batched
prefill). Two workloads, prompts of about 64 tokens:

* **closed loop** (what "at N concurrent" means in the issue: the workload of
  ``vllm bench serve --max-concurrency N``, whose 64 requests at 16
  concurrent gave the issue's reference figures): N users (N = 1, 8, 16, 32),
  each sending its next request as soon as its last one ends, a fixed number
  of requests per run (4 per user, at least 16; fewer and shorter on the
  small model), each of 16-48 tokens (32 on average, spread so that requests
  end and new ones join the running batch at different steps). Median and
  p90 time to first token over the run's requests, and the median
  inter-token latency of the same run;
* **burst**: N requests sent at exactly the same moment (N = 1, 8, 16, 32),
  4 tokens each: the worst case, N prefills in one step. Reported beside the
  closed loop, no target.

Targets (from the issues): zserve >= 0.95x direct for hf and vllm at 1,
8 (issue 25) and 32 concurrent requests on the tiny model, >= 0.97x at 1, 8 and 32 on the
small one; hf: 8 concurrent requests >= 3x the tokens/s of 1; hf time to
first token at 16 concurrent <= 3x the time at 1 (closed loop, median, both
direct with batched prefill and through zserve). Prints a table and writes
bench/results/engines.json.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from bench.common import (
    CpuMeter,
    all_met,
    cpu_seconds,
    format_table,
    median,
    percentile,
    result_record,
    targets_table,
    tree_pids,
    write_json,
)
from zserve.launcher import Proc, start_broker, start_worker

log = logging.getLogger(__name__)

MODEL = "tiny"  # served name on both sides
ENGINES = ("hf", "vllm")
PROMPTS = [
    "The morning train left the station at seven",
    "Once upon a time there was a small dragon who lived in a cave",
    "In the small café by the river, the baker opened his doors",
    "Computers read numbers, not words.",
    "The conductor walked slowly down the aisle, checking tickets",
    "Dough cannot be hurried, and neither can good friends.",
    "A woman in a green coat read a newspaper",
    "Three ships sailed into the harbour before the storm",
]
# Prompts for the time-to-first-token runs: about 64 tokens each, a different
# window of the corpus for every request.
_WORDS = " ".join(PROMPTS * 8).split()
TTFT_PROMPTS = [" ".join(_WORDS[i * 5 : i * 5 + 48]) for i in range(32)]
TTFT_TOKENS = 4  # tokens per request in the time-to-first-token runs
TTFT_CONCURRENCY = (1, 8, 16, 32)
MODELS = ("tiny", "small")
# vLLM on CPU: no torch.compile warm-up, a KV cache of 64 MiB for the tiny
# model (about 32 k tokens: room for 32 x (prompt + 128) many times over) and
# 256 MiB for the small one (about 5 k tokens of 48 KiB each).
VLLM_ENGINE_ARGS: dict[str, Any] = {"enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
VLLM_KV_BYTES = {"tiny": 64 << 20, "small": 256 << 20}
DTYPE = "float32"
# torch intra-op threads for the hf engine, the same on both sides: one core
# left for the broker and the client (a 2-core machine gets 1). torch's idle
# OpenMP threads spin; with every core given to them the serving processes
# starve, which no deployment would choose.
HF_THREADS = max(1, (os.cpu_count() or 2) - 1)
CAPACITY = 32  # the zserve worker's --capacity
START_TIMEOUT = 300.0  # seconds for an engine to load
RUN_TIMEOUT = 300.0  # seconds for one measured run

# Targets (from the issue).
RATIO_MIN = 0.95  # zserve / direct tokens/s, at these concurrency levels
RATIO_AT = (1, 8, 32)  # issue 25 adds 8
RATIO_MIN_SMALL = 0.97  # the same on the small model
RATIO_AT_SMALL = (1, 8, 32)
TTFT_MAX_RATIO = 3.0  # hf: time to first token at 16 concurrent / at 1
TTFT_AT = (16, 1)
HF_SCALING_MIN = 3.0  # hf: tokens/s at 8 concurrent / at 1
HF_SCALING = (8, 1)

BASELINES = {
    "hf": "zserve's HFEngine.generate() in one process, asyncio.gather over N requests",
    "vllm": "vLLM's AsyncLLM.generate() in one process (raw vLLM API, DELTA outputs), "
    "asyncio.gather over N requests",
}


@dataclass(frozen=True)
class Settings:
    max_tokens: int  # per request, every request runs to it (ignore_eos)
    repeats: int  # measured runs per side and concurrency level
    warmup: int  # unmeasured runs per side and concurrency level
    concurrency: tuple[int, ...] = (1, 8, 32)


FULL = Settings(max_tokens=128, repeats=15, warmup=2)
QUICK = Settings(max_tokens=64, repeats=5, warmup=1)
# The small model's step is 5-10x the tiny one's: fewer tokens per run.
FULL_SMALL = Settings(max_tokens=64, repeats=7, warmup=1)
QUICK_SMALL = Settings(max_tokens=32, repeats=3, warmup=1)
TTFT_REPEATS = {"full": 7, "quick": 3}


@dataclass(frozen=True)
class ClosedLoop:
    """The closed-loop time-to-first-token runs (``vllm bench serve`` style)."""

    concurrency: tuple[int, ...]  # users, each with one request in flight
    per_user: int  # requests per run = max(per_user x users, min_requests)
    min_requests: int
    tokens: int  # mean decode length (request i: _closed_tokens(i, tokens))
    rounds: int  # measured rounds of every mode and level (no warm-up round:
    # the burst runs before have warmed every side up)

    def requests(self, users: int) -> int:
        return max(self.per_user * users, self.min_requests)


# The reference workload is 64 requests at 16 concurrent: 4 per user. The
# small model prefills 64 tokens in ~100 ms and steps in ~16 ms: shorter and
# fewer requests, and no 32 users in --quick.
CLOSED = {
    ("full", "tiny"): ClosedLoop((1, 8, 16, 32), 4, 16, 32, 3),
    ("quick", "tiny"): ClosedLoop((1, 8, 16, 32), 4, 16, 32, 3),
    ("full", "small"): ClosedLoop((1, 8, 16, 32), 4, 8, 32, 1),
    ("quick", "small"): ClosedLoop((1, 8, 16), 3, 6, 16, 1),
}


def _run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """asyncio.run on uvloop where installed, as zserve's own processes do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _check(counts: list[int], want: int, what: str) -> None:
    bad = [c for c in counts if c != want]
    if bad:
        raise RuntimeError(f"{what}: {len(bad)} request(s) got {bad[:5]} tokens, asked {want}")


async def _first_and_count(deltas: AsyncIterator[int], t0: float) -> tuple[int, float]:
    """(tokens, seconds from ``t0`` to the first delta) of one request."""
    got, first = 0, 0.0
    async for k in deltas:
        if not got:
            first = time.perf_counter() - t0
        got += k
    return got, first


def _closed_tokens(i: int, mean: int) -> int:
    """Request ``i``'s decode length in a closed loop: spread over
    [mean/2, 3 mean/2] (averaging ``mean``), so that the users' requests end,
    and their next ones join the batch, at different steps."""
    return mean // 2 + (i * 7) % (mean + 1)


@dataclass
class Timed:
    """One closed-loop request as its user saw it."""

    tokens: int
    want: int
    ttft: float  # seconds from the send to the first delta
    gaps: list[float]  # seconds between deltas, per token (a k-token delta counts k times)


async def _closed_loop(
    users: int, total: int, mean: int, stream: Callable[[int, int], AsyncIterator[int]]
) -> tuple[float, list[Timed]]:
    """``vllm bench serve`` with ``--max-concurrency users``: each user sends
    requests one after another (the next as soon as the last one's final delta
    is in) until ``total`` have been sent. ``stream(i, n)`` runs request ``i``
    for ``n`` tokens and yields the tokens of each delta. (seconds, requests)."""
    ids = itertools.count()
    done: list[Timed] = []

    async def user() -> None:
        while (i := next(ids)) < total:
            want = _closed_tokens(i, mean)
            t0 = last = time.perf_counter()
            got, ttft, gaps = 0, 0.0, []
            async for k in stream(i, want):
                now = time.perf_counter()
                if got:
                    gaps += [(now - last) / k] * k
                else:
                    ttft = now - t0
                got += k
                last = now
            done.append(Timed(got, want, ttft, gaps))

    t0 = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(user() for _ in range(users))), RUN_TIMEOUT)
    return time.perf_counter() - t0, done


def _closed_summary(elapsed: float, done: list[Timed], what: str) -> dict[str, Any]:
    """One closed-loop run: TTFT p50/p90 and inter-token latency p50 over its requests."""
    bad = [(t.tokens, t.want) for t in done if t.tokens != t.want]
    if bad:
        raise RuntimeError(
            f"{what}: {len(bad)} request(s) got the wrong count (got, asked) {bad[:5]}"
        )
    ttft = [t.ttft for t in done]
    gaps = [g for t in done for g in t.gaps]
    return {
        "requests": len(done),
        "elapsed_s": round(elapsed, 3),
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p90_ms": percentile(ttft, 90) * 1e3,
        "itl_p50_ms": percentile(gaps, 50) * 1e3 if gaps else 0.0,
    }


# ------------------------------------------------------------------ direct side (child)


class _HFDirect:
    """zserve's hf engine class, no worker runtime around it."""

    def __init__(self, model_dir: str) -> None:
        from zserve.worker.engines.hf import HFEngine

        self.engine = HFEngine(
            [(model_dir, [MODEL])], device="cpu", dtype=DTYPE,
            engine_args={"threads": HF_THREADS},
        )  # fmt: skip
        self._ids = itertools.count()

    async def start(self) -> None:
        await self.engine.start()

    def set_batch_prefill(self, on: bool) -> None:
        """Batched prefill on or off for the next runs (the runner reads it every step)."""
        for sm in self.engine._served.values():
            if sm.runner is not None:
                sm.runner.batch_prefill = on

    async def deltas(self, i: int, n: int, prompts: list[str]) -> AsyncIterator[int]:
        """Request ``i``: the number of tokens in each of its deltas."""
        from zserve.protocol import SamplingParams
        from zserve.worker.engine import GenerateRequest

        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        req = GenerateRequest(f"d{next(self._ids)}", MODEL, prompts[i % len(prompts)], None, params)
        async for d in self.engine.generate(req):
            yield len(d.token_ids or ())

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    async def close(self) -> None:
        await self.engine.close()


class _VLLMDirect:
    """vLLM's AsyncLLM, with the engine arguments and sampling zserve's vllm worker uses."""

    def __init__(self, model_dir: str, kv_bytes: int) -> None:
        self.model_dir = model_dir
        self.kv_bytes = kv_bytes
        self.llm: Any = None
        self._ids = itertools.count()

    async def start(self) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=self.model_dir,
            dtype=DTYPE,
            disable_log_stats=True,
            **{**VLLM_ENGINE_ARGS, "kv_cache_memory_bytes": self.kv_bytes},
        )
        self.llm = AsyncLLM.from_engine_args(args)

    def set_batch_prefill(self, on: bool) -> None:
        pass  # vLLM schedules its own prefills

    async def deltas(self, i: int, n: int, prompts: list[str]) -> AsyncIterator[int]:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(
            n=1,
            temperature=0.0,
            ignore_eos=True,
            max_tokens=n,
            output_kind=RequestOutputKind.DELTA,
        )
        prompt, rid = prompts[i % len(prompts)], f"d{next(self._ids)}"
        async for out in self.llm.generate(prompt, params, rid):
            yield len(out.outputs[0].token_ids)

    def stats(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()


async def _serve_direct(engine: str, model_dir: str, kv_bytes: int, out: TextIO) -> None:
    """Answer one JSON line per command on stdin: {"concurrency": N, "max_tokens": M,
    and optionally "ttft_prompts": true, "batch_prefill": bool, "closed_requests": R
    (a closed loop of N users, R requests in all, M tokens on average)}."""
    drv: _HFDirect | _VLLMDirect = (
        _HFDirect(model_dir) if engine == "hf" else _VLLMDirect(model_dir, kv_bytes)
    )
    try:
        await drv.start()
        out.write(json.dumps({"ready": True}) + "\n")
        out.flush()
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line.strip():
                break  # EOF: the bench is done with us
            cmd = json.loads(line)
            c, n = int(cmd["concurrency"]), int(cmd["max_tokens"])
            prompts = TTFT_PROMPTS if cmd.get("ttft_prompts") else PROMPTS
            drv.set_batch_prefill(bool(cmd.get("batch_prefill", True)))
            before = drv.stats()
            reply: dict[str, Any]
            if cmd.get("closed_requests"):  # closed loop: c users, n tokens on average
                elapsed, done = await _closed_loop(
                    c,
                    int(cmd["closed_requests"]),
                    n,
                    lambda i, k, p=prompts: drv.deltas(i, k, p),
                )
                reply = {"closed": _closed_summary(elapsed, done, f"{engine} closed loop {c}")}
            else:
                t0 = time.perf_counter()
                got = await asyncio.gather(
                    *(_first_and_count(drv.deltas(i, n, prompts), t0) for i in range(c))
                )
                elapsed = time.perf_counter() - t0
                reply = {
                    "elapsed": elapsed,
                    "counts": [g[0] for g in got],
                    "ttft": [g[1] for g in got],
                }
            after = drv.stats()
            stats = {
                k: after[k] - before.get(k, 0)
                for k in ("steps", "prefills", "prefill_passes")
                if k in after
            }
            if "max_batch_size" in after:
                stats["max_batch_size_so_far"] = after["max_batch_size"]
            reply["stats"] = stats
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        await drv.close()


def _direct_child(engine: str, model_dir: str, kv_bytes: int) -> int:
    # Results go to the original stdout; everything libraries print goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.WARNING)
    _run_async(_serve_direct(engine, model_dir, kv_bytes, out))
    return 0


# ------------------------------------------------------------------ processes (bench side)


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _by_role(used: dict[str, float]) -> dict[str, float]:
    """CpuMeter seconds summed per role (``worker/1234`` counts as ``worker``)."""
    roles: dict[str, float] = {}
    for k, v in used.items():
        role = k.split("/", 1)[0]
        roles[role] = roles.get(role, 0.0) + v
    return roles


def _cpu_total(pids: dict[str, int]) -> float:
    total = 0.0
    for pid in pids.values():
        try:
            total += cpu_seconds(pid)
        except (FileNotFoundError, ProcessLookupError):
            pass  # a helper process that has ended
    return total


def _settle(
    pids: dict[str, int], window: float = 0.1, quiet: float = 0.05, timeout: float = 5.0
) -> float:
    """Wait until ``pids`` together use under ``quiet`` of a core over ``window``.

    vLLM's executor worker spins (``sched_yield``) for a second after its last
    step, and OpenMP threads spin briefly after a parallel region: a run that
    starts before the previous side has gone quiet shares the cores with it.
    Returns the seconds waited.
    """
    t0 = time.monotonic()
    prev = _cpu_total(pids)
    while time.monotonic() - t0 < timeout:
        time.sleep(window)
        now = _cpu_total(pids)
        if now - prev < quiet * window:
            break
        prev = now
    return time.monotonic() - t0


class DirectProc:
    """The direct side: ``python -m bench.engines --direct ENGINE`` in its own process group."""

    def __init__(self, engine: str, model_dir: Path, log_path: Path, kv_bytes: int) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as logf:
            self.proc = Proc(
                [
                    sys.executable,
                    "-m",
                    "bench.engines",
                    "--direct",
                    engine,
                    "--model-dir",
                    str(model_dir),
                    "--kv-bytes",
                    str(kv_bytes),
                ],
                name=f"direct-{engine}",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=logf,
                text=True,
            )

    def _reply(self, timeout: float, what: str) -> dict[str, Any]:
        out = self.proc.popen.stdout
        assert out is not None
        deadline = time.monotonic() + timeout
        while True:
            if not self.proc.alive():
                raise RuntimeError(f"{self.proc.name} exited while {what}:\n{_tail(self.log_path)}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.proc.name}: {what} took over {timeout:.0f} s")
            ready, _, _ = select.select([out], [], [], min(left, 0.5))
            if ready:
                line = out.readline()
                if line:
                    return dict(json.loads(line))

    def wait_ready(self) -> None:
        self._reply(START_TIMEOUT, "starting")

    def run(self, concurrency: int, max_tokens: int, **extra: Any) -> dict[str, Any]:
        stdin = self.proc.popen.stdin
        assert stdin is not None
        cmd = {"concurrency": concurrency, "max_tokens": max_tokens, **extra}
        stdin.write(json.dumps(cmd) + "\n")
        stdin.flush()
        return self._reply(RUN_TIMEOUT, f"running {concurrency} requests")

    def stop(self) -> None:
        stdin = self.proc.popen.stdin
        if stdin is not None and self.proc.alive():
            try:
                stdin.close()  # EOF: the child shuts its engine down and exits
                self.proc.popen.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.proc.stop()
        if self.proc.popen.stdout is not None:
            self.proc.popen.stdout.close()


def _worker_args(engine: str, model_dir: Path | str, kv_bytes: int) -> list[str]:
    args = [
        "--engine",
        engine,
        "--model",
        str(model_dir),
        "--model-names",
        MODEL,
        "--dtype",
        DTYPE,
        "--capacity",
        str(CAPACITY),
    ]
    if engine == "hf":
        args += ["--device", "cpu", f"--engine-arg=threads={HF_THREADS}"]
    else:
        vargs = {**VLLM_ENGINE_ARGS, "kv_cache_memory_bytes": kv_bytes}
        args += [f"--engine-arg={k}={json.dumps(v)}" for k, v in vargs.items()]
    return args


def _wait_served(frontend: str, worker: Proc, log_path: Path) -> None:
    from zserve.client import Client

    deadline = time.monotonic() + START_TIMEOUT
    with Client(frontend, timeout=5) as c:
        while MODEL not in c.models():
            if not worker.alive():
                raise RuntimeError(f"the zserve worker exited:\n{_tail(log_path)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the zserve worker did not register in {START_TIMEOUT:.0f} s")
            time.sleep(0.2)


async def _zserve_run(
    frontend: str,
    concurrency: int,
    n: int,
    side: Side | None = None,
    prompts: list[str] = PROMPTS,
    ttft: list[float] | None = None,
) -> tuple[float, list[int]]:
    """``concurrency`` streams through one AsyncClient; (seconds, tokens per stream).
    ``ttft``, when given, receives each stream's seconds to its first delta."""
    from zserve import AsyncClient

    async def one(ac: AsyncClient, i: int) -> int:
        got = 0
        stream = ac.stream(
            MODEL, prompts[i % len(prompts)], max_tokens=n, temperature=0.0, ignore_eos=True
        )
        async for d in stream:
            if not got and ttft is not None:
                ttft.append(time.perf_counter() - t0)
            got += len(d.token_ids or ())
        return got

    async with AsyncClient(frontend, timeout=60) as ac:
        await ac.models()  # connected and the broker answering before the clock starts
        if side is not None:
            side.start()
        t0 = time.perf_counter()
        counts = await asyncio.wait_for(
            asyncio.gather(*(one(ac, i) for i in range(concurrency))), RUN_TIMEOUT
        )
        elapsed = time.perf_counter() - t0
        if side is not None:
            side.stop()
    return elapsed, list(counts)


async def _zserve_closed(frontend: str, users: int, total: int, mean: int) -> dict[str, Any]:
    """The closed loop of ``_closed_loop`` through zserve, one AsyncClient."""
    from zserve import AsyncClient

    async with AsyncClient(frontend, timeout=60) as ac:
        await ac.models()  # connected and the broker answering before the clock starts

        async def stream(i: int, n: int) -> AsyncIterator[int]:
            async for d in ac.stream(
                MODEL,
                TTFT_PROMPTS[i % len(TTFT_PROMPTS)],
                max_tokens=n,
                temperature=0.0,
                ignore_eos=True,
            ):
                yield len(d.token_ids or ())

        elapsed, done = await _closed_loop(users, total, mean, stream)
    return _closed_summary(elapsed, done, f"zserve closed loop {users}")


def _token_messages(frontend: str) -> int:
    from zserve.client import Client

    with Client(frontend, timeout=5) as c:
        return int(c.status()["counters"].get("token_messages", 0))


# ------------------------------------------------------------------ one engine


@dataclass
class Side:
    """What one side measured at one concurrency level."""

    rates: list[float]
    meter: CpuMeter  # this side's processes while it runs
    idle_meter: CpuMeter  # the other side's processes while this side runs
    extra: list[dict[str, Any]]

    def start(self) -> None:
        self.meter.start()
        self.idle_meter.start()

    def stop(self) -> None:
        self.meter.stop()
        self.idle_meter.stop()

    def add(self, rate: float, extra: dict[str, Any]) -> None:
        self.rates.append(rate)
        self.extra.append(extra)

    def summary(self, tokens_per_run: int) -> dict[str, Any]:
        runs = len(self.rates)
        used = _by_role(self.meter.used)
        idle = _by_role(self.idle_meter.used)
        return {
            "tok_s": round(median(self.rates), 1),
            "best_tok_s": round(max(self.rates), 1),
            "runs_tok_s": [round(x, 1) for x in self.rates],
            "cpu_us_per_token": {
                k: round(v * 1e6 / (tokens_per_run * runs), 2) for k, v in used.items()
            },
            "idle_side_cpu_ms_per_run": {k: round(v * 1e3 / runs, 2) for k, v in idle.items()},
            **({"per_run": self.extra} if any(self.extra) else {}),
        }


def bench_engine(
    engine: str,
    model_dir: Path,
    s: Settings,
    logs: Path,
    size: str = "tiny",
    ttft_repeats: int = 0,
    closed: ClosedLoop | None = None,
) -> dict[str, Any]:
    kv_bytes = VLLM_KV_BYTES[size]
    with ExitStack() as stack:
        t0 = time.monotonic()
        # Both sides load at once (the slow part for vLLM); nothing is measured yet.
        direct = DirectProc(engine, model_dir, logs / f"direct-{engine}-{size}.log", kv_bytes)
        stack.callback(direct.stop)
        broker, fe, be = start_broker(log_level="error")
        stack.callback(broker.stop)
        wlog = logs / f"worker-{engine}-{size}.log"
        with open(wlog, "wb") as f:
            worker = start_worker(
                be,
                *_worker_args(engine, model_dir, kv_bytes),
                log_level="warning",
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        stack.callback(worker.stop)
        direct.wait_ready()
        _wait_served(fe, worker, wlog)
        startup_s = time.monotonic() - t0

        direct_pids = tree_pids("direct", direct.proc.pid)
        zserve_pids = {
            "client": os.getpid(),
            "broker": broker.pid,
            **tree_pids("worker", worker.pid),
        }
        # Every engine process of both sides (this process, the client, excluded).
        quiet_pids = {**direct_pids, **{k: v for k, v in zserve_pids.items() if k != "client"}}
        settles: list[float] = []
        n = s.max_tokens

        sides: dict[int, dict[str, Side]] = {
            c: {
                "direct": Side([], CpuMeter(direct_pids), CpuMeter(zserve_pids), []),
                "zserve": Side([], CpuMeter(zserve_pids), CpuMeter(direct_pids), []),
            }
            for c in s.concurrency
        }

        def run_direct(c: int, side: Side | None) -> None:
            settles.append(_settle(quiet_pids))
            if side is not None:
                side.start()
            r = direct.run(c, n)
            if side is not None:
                side.stop()
            _check(r["counts"], n, f"{engine} direct {c}x{n}")
            if side is not None:
                side.add(c * n / r["elapsed"], r.get("stats") or {})

        def run_zserve(c: int, side: Side | None) -> None:
            m0 = _token_messages(fe)
            settles.append(_settle(quiet_pids))
            elapsed, counts = _run_async(_zserve_run(fe, c, n, side))
            _check(counts, n, f"{engine} zserve {c}x{n}")
            if side is not None:
                side.add(c * n / elapsed, {"token_messages": _token_messages(fe) - m0})

        for c in s.concurrency:  # warm-up: every batch size once or more on each side
            for _ in range(s.warmup):
                run_direct(c, None)
                run_zserve(c, None)

        runners: dict[str, Callable[[int, Side | None], None]] = {
            "direct": run_direct,
            "zserve": run_zserve,
        }
        for r in range(s.repeats):
            order = ("direct", "zserve") if r % 2 == 0 else ("zserve", "direct")
            for c in s.concurrency:
                for name in order:
                    runners[name](c, sides[c][name])
        ttft = _ttft_rounds(engine, direct, fe, quiet_pids, ttft_repeats) if ttft_repeats else None
        closed_ttft = _closed_rounds(engine, direct, fe, quiet_pids, closed) if closed else None
        levels: dict[str, Any] = {}
        for c in s.concurrency:
            d = sides[c]["direct"].summary(c * n)
            z = sides[c]["zserve"].summary(c * n)
            paired = [
                zr / dr
                for zr, dr in zip(sides[c]["zserve"].rates, sides[c]["direct"].rates, strict=True)
            ]
            z_msgs = [e.get("token_messages", 0) for e in sides[c]["zserve"].extra]
            z["tokens_per_message"] = round(c * n / median(z_msgs), 2) if median(z_msgs) else None
            levels[str(c)] = {
                "concurrency": c,
                "tokens_per_request": n,
                "direct": d,
                "zserve": z,
                "ratio": round(z["tok_s"] / d["tok_s"], 3),
                "ratio_paired_median": round(median(paired), 3),
            }
        return {
            "direct_baseline": BASELINES[engine],
            "model": size,
            "zserve_side": "zserve broker + zserve worker "
            f"{' '.join(_worker_args(engine, '-', kv_bytes))} "
            "(model path elided), one AsyncClient in the bench process",
            "startup_s": round(startup_s, 1),
            "settle_s_before_run": {
                "median": round(median(settles), 2),
                "max": round(max(settles), 2),
            },
            "levels": levels,
            **({"ttft": ttft} if ttft else {}),
            **({"ttft_closed_loop": closed_ttft} if closed_ttft else {}),
        }


def _modes(engine: str) -> tuple[str, ...]:
    """The direct engine's prefill modes: one-by-one ("before", hf only) and batched ("after")."""
    return ("before", "after") if engine == "hf" else ("after",)


def _turns(engine: str, rounds: int, levels: tuple[int, ...]) -> Iterator[tuple[int, int, str]]:
    """(round, level, mode) of time-to-first-token runs in the order they take
    turns: the direct engine's modes, swapping order each round, then zserve."""
    modes = _modes(engine)
    for r in range(rounds):
        for c in levels:
            for mode in (*(modes if r % 2 == 0 else modes[::-1]), "zserve"):
                yield r, c, mode


def _ttft_rounds(
    engine: str, direct: DirectProc, frontend: str, quiet_pids: dict[str, int], repeats: int
) -> dict[str, Any]:
    """Time to first token at each of TTFT_CONCURRENCY, requests sent at once:
    direct with batched prefill (``after``) and one at a time (``before``),
    alternating, and through zserve (batched). Medians over rounds of each
    run's median and max."""
    modes = _modes(engine)
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        m: {c: [] for c in TTFT_CONCURRENCY} for m in (*modes, "zserve")
    }

    def summary(xs: list[float]) -> dict[str, float]:
        return {"p50_ms": median(xs) * 1e3, "max_ms": max(xs) * 1e3}

    for r, c, mode in _turns(engine, repeats + 1, TTFT_CONCURRENCY):  # round 0 warms up
        _settle(quiet_pids)
        if mode == "zserve":
            got: list[float] = []
            _, counts = _run_async(
                _zserve_run(frontend, c, TTFT_TOKENS, prompts=TTFT_PROMPTS, ttft=got)
            )
        else:
            rep = direct.run(c, TTFT_TOKENS, ttft_prompts=True, batch_prefill=mode == "after")
            counts, got = rep["counts"], rep["ttft"]
        _check(counts, TTFT_TOKENS, f"{engine} ttft {mode} {c}")
        if r:
            runs[mode][c].append(summary(got))
    out: dict[str, Any] = {
        "prompts": "about 64 tokens each",
        "tokens": TTFT_TOKENS,
        "rounds": repeats,
    }
    for mode, by_c in runs.items():
        out[mode] = {
            str(c): {k: round(median([x[k] for x in xs]), 2) for k in ("p50_ms", "max_ms")}
            for c, xs in by_c.items()
        }
    return out


def _closed_rounds(
    engine: str, direct: DirectProc, frontend: str, quiet_pids: dict[str, int], cl: ClosedLoop
) -> dict[str, Any]:
    """Closed-loop time to first token at each of ``cl.concurrency`` users: direct
    with batched prefill (``after``) and one at a time (``before``), alternating,
    and through zserve (batched). Medians over rounds of each run's figures."""
    modes = _modes(engine)
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {
        m: {c: [] for c in cl.concurrency} for m in (*modes, "zserve")
    }
    for _, c, mode in _turns(engine, cl.rounds, cl.concurrency):
        _settle(quiet_pids)
        if mode == "zserve":
            got = _run_async(_zserve_closed(frontend, c, cl.requests(c), cl.tokens))
        else:
            rep = direct.run(
                c,
                cl.tokens,
                ttft_prompts=True,
                batch_prefill=mode == "after",
                closed_requests=cl.requests(c),
            )
            got = {**rep["closed"], **rep["stats"]}
        runs[mode][c].append(got)
    out: dict[str, Any] = {
        "prompts": "about 64 tokens each",
        "tokens": f"{cl.tokens // 2}..{cl.tokens // 2 + cl.tokens} per request (mean {cl.tokens})",
        "requests_per_run": {str(c): cl.requests(c) for c in cl.concurrency},
        "rounds": cl.rounds,
    }
    keys = ("ttft_p50_ms", "ttft_p90_ms", "itl_p50_ms")
    for mode, by_c in runs.items():
        out[mode] = {
            str(c): {
                **{k: round(median([x[k] for x in xs]), 2) for k in keys},
                **(
                    {
                        "prefill_passes": xs[-1]["prefill_passes"],
                        "prefills": xs[-1]["prefills"],
                        "steps": xs[-1]["steps"],
                    }
                    if "prefills" in xs[-1]
                    else {}
                ),
            }
            for c, xs in by_c.items()
        }
    return out


# ------------------------------------------------------------------ report


def _ttft_p50_rows(
    engine: str, t: dict[str, Any] | None, key: str, what: str
) -> list[dict[str, Any]]:
    """One row per level of a time-to-first-token run: one-by-one prefill
    ("before", the direct column) against batched ("after")."""
    if not t or "before" not in t:
        return []
    return [
        {
            "workload": f"{engine}: time to first token, {n} {what}, p50 (ms)",
            "direct": t["before"][n][key],
            "zserve": t["after"][n][key],
            "ratio": round(t["after"][n][key] / t["before"][n][key], 3)
            if t["before"][n][key]
            else None,
            "target": "-",
            "pass": None,
            "baseline": "one-at-a-time prefill (batch_prefill=false), same process",
            "after_is": "batched prefill, same process",
            "through_zserve_ms": t["zserve"][n][key],
        }
        for n in t["after"]
    ]


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for engine, e in m.items():
        small = e.get("model") == "small"
        at, least = (RATIO_AT_SMALL, RATIO_MIN_SMALL) if small else (RATIO_AT, RATIO_MIN)
        for key, lv in e["levels"].items():
            c = int(key)
            target = c in at
            rows.append(
                {
                    "workload": f"{engine}: {c} concurrent x {lv['tokens_per_request']} (tok/s)",
                    "direct": lv["direct"]["tok_s"],
                    "zserve": lv["zserve"]["tok_s"],
                    "ratio": lv["ratio"],
                    "target": f">= {least}x direct" if target else "-",
                    "pass": lv["ratio"] >= least if target else None,
                }
            )
        t = e.get("ttft")
        rows += _ttft_p50_rows(engine, t, "p50_ms", "at once")
        cl = e.get("ttft_closed_loop")
        rows += _ttft_p50_rows(engine, cl, "ttft_p50_ms", "users closed loop")
        rows += _ttft_ratio_rows(engine, cl, "ttft_p50_ms", "closed loop, users", target=True)
        rows += _ttft_ratio_rows(engine, t, "p50_ms", "burst, sent at once", target=False)
        hi, lo = (str(x) for x in HF_SCALING)
        if engine.startswith("hf") and hi in e["levels"] and lo in e["levels"]:
            lv = e["levels"]
            xd = round(lv[hi]["direct"]["tok_s"] / lv[lo]["direct"]["tok_s"], 2)
            xz = round(lv[hi]["zserve"]["tok_s"] / lv[lo]["zserve"]["tok_s"], 2)
            rows.append(
                {
                    "workload": f"{engine}: tok/s at {hi} concurrent / at {lo} (x)",
                    "direct": xd,
                    "zserve": xz,
                    "ratio": None,
                    "target": f">= {HF_SCALING_MIN:g}x (both)",
                    "pass": xd >= HF_SCALING_MIN and xz >= HF_SCALING_MIN,
                }
            )
    return rows


def _ttft_ratio_rows(
    engine: str, t: dict[str, Any] | None, key: str, kind: str, target: bool
) -> list[dict[str, Any]]:
    """The row "time to first token at 16 / at 1": the direct engine with
    batched prefill and zserve; the one-at-a-time figure beside them."""
    hi, lo = (str(x) for x in TTFT_AT)
    if not t or "before" not in t or not all(c in t["after"] for c in (hi, lo)):
        return []

    def x(mode: str) -> float:
        return round(t[mode][hi][key] / t[mode][lo][key], 2)

    a, z = x("after"), x("zserve")
    return [
        {
            "workload": f"{engine}: time to first token at {hi} / at {lo}, {kind} (x)",
            "direct": a,
            "zserve": z,
            "ratio": None,
            "target": f"<= {TTFT_MAX_RATIO:g}x (both)" if target else "-",
            "pass": (a <= TTFT_MAX_RATIO and z <= TTFT_MAX_RATIO) if target else None,
            "baseline": "the direct engine, batched prefill, same process",
            "one_at_a_time_x": x("before"),
        }
    ]


def render(rows: list[dict[str, Any]], m: dict[str, Any]) -> str:
    table = targets_table(rows, "direct")
    cpu_rows: list[list[Any]] = []
    for engine, e in m.items():
        for lv in e["levels"].values():
            d, z = lv["direct"]["cpu_us_per_token"], lv["zserve"]["cpu_us_per_token"]
            cpu_rows.append(
                [
                    f"{engine} x{lv['concurrency']}",
                    d.get("direct"),
                    z.get("client"),
                    z.get("broker"),
                    z.get("worker"),
                    lv["zserve"]["tokens_per_message"],
                    sum(lv["direct"]["idle_side_cpu_ms_per_run"].values()),
                    sum(lv["zserve"]["idle_side_cpu_ms_per_run"].values()),
                ]
            )
    cpu = format_table(
        [
            "CPU us/token",
            "direct",
            "zs client",
            "zs broker",
            "zs worker",
            "tok/msg",
            "idle zs ms/run",
            "idle direct ms/run",
        ],
        cpu_rows,
    )
    ttft_rows: list[list[Any]] = []
    for engine, e in m.items():
        t = e.get("ttft") or {}
        for key in t.get("after", {}):
            ttft_rows.append([
                f"{engine} x{key}", (t.get("before") or {}).get(key, {}).get("p50_ms"),
                t["after"][key]["p50_ms"], t["zserve"][key]["p50_ms"],
                (t.get("before") or {}).get(key, {}).get("max_ms"), t["after"][key]["max_ms"],
                t["zserve"][key]["max_ms"],
            ])  # fmt: skip
    closed_rows: list[list[Any]] = []
    for engine, e in m.items():
        cl = e.get("ttft_closed_loop") or {}
        for key in cl.get("after", {}):
            b, a, z = ((cl.get(mode) or {}).get(key, {}) for mode in ("before", "after", "zserve"))
            closed_rows.append(
                [
                    f"{engine} x{key}",
                    b.get("ttft_p50_ms"),
                    a["ttft_p50_ms"],
                    z["ttft_p50_ms"],
                    b.get("ttft_p90_ms"),
                    a["ttft_p90_ms"],
                    z["ttft_p90_ms"],
                    a["itl_p50_ms"],
                    z["itl_p50_ms"],
                    f"{a.get('prefills')}/{a.get('prefill_passes')}",
                ]
            )
    lines = [table, "", cpu, ""]
    if closed_rows:
        lines += [
            "time to first token (ms), closed loop: N users, each sending its next request "
            "(~64 prompt tokens, 16-48 tokens) when its last one ends:",
            format_table(
                [
                    "TTFT",
                    "p50 one-by-one",
                    "p50 batched",
                    "p50 zserve",
                    "p90 one-by-one",
                    "p90 batched",
                    "p90 zserve",
                    "ITL p50 batched",
                    "ITL p50 zserve",
                    "prefills/passes",
                ],
                closed_rows,
            ),
            "",
        ]
    if ttft_rows:
        lines += [
            "time to first token (ms), requests of ~64 prompt tokens sent at once:",
            format_table(
                [
                    "TTFT",
                    "p50 one-by-one",
                    "p50 batched",
                    "p50 zserve",
                    "max one-by-one",
                    "max batched",
                    "max zserve",
                ],
                ttft_rows,
            ),
            "(one-by-one / batched: the direct engine with batch_prefill off / on, same "
            "process, alternating; zserve: through broker + worker, batched)",
            "",
        ]
    lines += ["direct baselines:"]
    for engine, e in m.items():
        lines.append(
            f"  {engine}: {e['direct_baseline']} (loaded in {e['startup_s']} s "
            "together with the zserve side)"
        )
    lines += [
        "zserve: broker + worker processes on loopback, one AsyncClient in the bench process.",
        "ratio = median zserve tok/s / median direct tok/s; runs alternate and never overlap,",
        "each starts once both sides' engine processes are quiet (vLLM's worker spins ~1 s);",
        "'idle ... ms/run' = CPU the other side's processes used during a run (fairness check);",
        "CPU of the direct side and of the zserve worker includes vLLM's engine-core child.",
    ]
    return "\n".join(lines)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit, so the ExitStacks still stop the children."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.engines",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--quick", action="store_true", help="fewer, shorter runs (a few minutes)")
    ap.add_argument(
        "--engines",
        default=",".join(ENGINES),
        help="comma-separated, from: hf, vllm (default: both; vllm is skipped "
        "with a note when it is not installed)",
    )
    ap.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated, from: tiny, small (default: both)",
    )
    ap.add_argument("--out", default="engines.json", help="file name under bench/results/")
    ap.add_argument("--direct", choices=ENGINES, help=argparse.SUPPRESS)  # the child side
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--kv-bytes", type=int, default=VLLM_KV_BYTES["tiny"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.direct:
        return _direct_child(a.direct, a.model_dir, a.kv_bytes)
    sizes = [x.strip() for x in a.models.split(",") if x.strip()]
    if set(sizes) - set(MODELS):
        ap.error(f"unknown model(s): {', '.join(sorted(set(sizes) - set(MODELS)))}")

    engines = [x.strip() for x in a.engines.split(",") if x.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        ap.error(f"unknown engine(s): {', '.join(unknown)}")
    skipped: dict[str, str] = {}
    if "vllm" in engines and importlib.util.find_spec("vllm") is None:
        if a.engines != ",".join(ENGINES):
            ap.error("vllm is not installed")
        engines.remove("vllm")
        skipped["vllm"] = "not installed"
        print("note: vllm is not installed; measuring hf only", flush=True)

    mode = "quick" if a.quick else "full"
    t0 = time.monotonic()
    load_before = os.getloadavg()
    measured: dict[str, Any] = {}
    with _sigterm_as_exit(), tempfile.TemporaryDirectory(prefix="zserve-bench-") as tmp:
        from zserve.tiny_model import write_tiny_model

        for size in sizes:
            model_dir = write_tiny_model(Path(tmp) / size, size=size)
            s = (
                {"tiny": QUICK, "small": QUICK_SMALL}[size]
                if a.quick
                else {"tiny": FULL, "small": FULL_SMALL}[size]
            )
            for engine in engines:
                key = engine if size == "tiny" else f"{engine}-{size}"
                print(f"{key}: loading both sides ...", flush=True)
                measured[key] = bench_engine(
                    engine,
                    model_dir,
                    s,
                    Path(tmp),
                    size,
                    ttft_repeats=TTFT_REPEATS[mode] if engine == "hf" else 0,
                    closed=CLOSED[mode, size] if engine == "hf" else None,
                )
    rows = evaluate(measured)
    result = result_record(
        "engines",
        a.quick,
        t0,
        {
            "load_average_1_5_15": {
                "before": [round(x, 2) for x in load_before],
                "after": [round(x, 2) for x in os.getloadavg()],
            },
            "hf_threads": HF_THREADS,
            "torch_threads_env": {
                k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ
            },
            "models": {
                "tiny": "zserve tiny-model (random Llama: hidden 128, 2 layers, float32)",
                "small": "write_tiny_model(size='small') (random Llama: hidden 768, 8 layers, "
                "12 heads, float32, 58 M parameters)",
            },
            "settings": {
                "tiny": asdict(QUICK if a.quick else FULL),
                "small": asdict(QUICK_SMALL if a.quick else FULL_SMALL),
                "ttft": {
                    "concurrency": TTFT_CONCURRENCY,
                    "tokens": TTFT_TOKENS,
                    "rounds": TTFT_REPEATS[mode],
                },
                "ttft_closed_loop": {size: asdict(CLOSED[mode, size]) for size in sizes},
            },
            "skipped": skipped,
            "rows": rows,
            "pass": all_met(rows),
            "measured": measured,
        },
    )
    path = write_json(a.out, result)
    print(render(rows, measured))
    print(
        f"\nall targets met: {'yes' if result['pass'] else 'NO'}   ({result['wall_s']} s, {path})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
