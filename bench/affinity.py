"""Cache-aware dispatch against shortest_queue on multi-turn conversations.

``python -m bench.affinity [--quick]`` starts two ``zserve worker --engine
vllm`` (CPU build, prefix caching on, an explicit KV cache size) on a
random-weight Llama (``zserve tiny-model --size medium``: prefilling 1,000
tokens takes about 0.1 s here), each registered with two brokers, one
dispatching by ``shortest_queue`` and one by ``cache_aware``. In the same
run, policy after policy (the order alternating round by round), each on a
system prompt of its own so that neither inherits the other's cache:

* N conversations (32) of T turns (6), all at once, sharing a system prompt
  of about 1,000 tokens; each turn adds a user message of about 300 tokens
  and is sent as soon as the previous answer (32 tokens, greedy) arrives
  (the last turn's prompt: about 3,000 tokens). Run twice: as the issue
  has it (the next turn at once), and with a pause before each next turn
  (exponential, mean 1 s, seeded), as users type. At once, shortest_queue
  is sticky by accident: the worker that just answered has just freed a
  slot, so it is the least loaded when the next turn arrives. A third
  variant, beyond the issue, gives each conversation a 1,000-token document
  of its own instead of the shared system prompt (with the pauses): the
  case where a conversation's own context dominates.
  Measured: time to first token p50 / p99 (every turn, and turns 2 on),
  tokens/s over the whole run, vLLM's own prefix cache hit rate (the
  ``cached_tokens`` the vLLM engine reports in each request's usage, from
  vLLM's ``num_cached_tokens``: prompt tokens it did not prefill), and how
  the broker spread the requests;
* the broker's own cost: sequential 1-token requests on a null worker with a
  ~4 KB chat prompt (so the client sends a routing frame of 16 hashes), the
  two brokers alternating block by block: p50 / p99.

The KV cache (400 MiB, about 34,000 tokens of this model) holds one
worker's share of the conversations (16 x 2,000 tokens of their own, plus
the system prompt) but not all of them: with shortest_queue every worker
sees every conversation and evicts.

The machine is small and shared: every figure is noisy; compare the two
policies within one run only. Writes bench/results/affinity.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import latency_summary_ms, median, run_and_report
from zserve import AsyncClient, Client
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for

MODEL = "m"
POLICIES = ("shortest_queue", "cache_aware")
START_TIMEOUT = 600.0
TTFT_RATIO_MIN = 2.0  # cache_aware's TTFT p50 at least this many times lower
OVERHEAD_RATIO_MAX = 1.1  # cache_aware's 1-token p50 within 10 % of shortest_queue's


@dataclass
class Settings:
    conversations: int = 32
    turns: int = 6
    system_tokens: int = 1000
    user_tokens: int = 300
    answer_tokens: int = 32
    size: str = "medium"
    kv_mib: int = 400
    capacity: int = 32  # per worker
    rounds: int = 2  # runs of each policy, the order alternating
    latency_samples: int = 2000  # 1-token requests per policy
    prefill_samples: int = 3
    think_s: float = 1.0  # the "think" variant: mean pause before each next turn


FULL = Settings()
QUICK = Settings(rounds=1, latency_samples=600)


@dataclass
class Phase:
    ttft: list[float] = field(default_factory=list)  # seconds, every turn
    ttft_later: list[float] = field(default_factory=list)  # turns 2 on
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0


# ------------------------------------------------------------------ text


def _words() -> list[str]:
    from zserve.tiny_model import CORPUS

    return re.findall(r"[A-Za-z']+[,.]?", CORPUS)


class Texts:
    """Random English-like text of a given token length, from the model's tokenizer."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.words = _words()

    def make(self, rng: random.Random, tokens: int) -> str:
        ids: list[int] = []
        while len(ids) < tokens:
            text = " ".join(rng.choice(self.words) for _ in range(tokens))
            ids += self.tok(text, add_special_tokens=False)["input_ids"]
        ids = ids[:tokens]
        return str(self.tok.decode(ids))


# ------------------------------------------------------------------ stack


class Stack:
    """Two brokers (one per policy) and the workers registered with both."""

    def __init__(self) -> None:
        self.eps = {pol: (f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
                    for pol in POLICIES}  # fmt: skip
        self.brokers: list[Proc] = []
        self.workers: list[Proc] = []
        for pol, (fe, be) in self.eps.items():
            self.brokers.append(
                start_broker("--dispatch", pol, frontend=fe, backend=be, log_level="error")[0]
            )

    def frontend(self, pol: str) -> str:
        return self.eps[pol][0]

    def worker(self, *args: str, log: Any = None, env: dict[str, str] | None = None) -> None:
        (_, be0), (_, be1) = self.eps.values()
        self.workers.append(start_worker(
            be0, "--broker", be1, *args, log_level="warning", stdout=log, stderr=log,
            env={**os.environ, **(env or {})},
        ))  # fmt: skip

    def wait(self, model: str, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for pol in POLICIES:
            with Client(self.frontend(pol), timeout=10) as c:

                def ready(c: Client = c) -> bool:
                    if any(not w.alive() for w in self.workers):
                        raise RuntimeError("a worker exited while loading")
                    ws = [w for w in c.status()["workers"] if model in w["models"]]
                    return len(ws) == n

                wait_for(ready, max(1.0, deadline - time.monotonic()), f"{n} {model} workers")

    def stop(self) -> None:
        for p in [*self.workers, *self.brokers]:
            p.stop()
        self.workers.clear()


def _dispatched(frontend: str) -> dict[str, int]:
    with Client(frontend, timeout=10) as c:
        return {w["worker_id"] or w["id"]: w["dispatched"] for w in c.status()["workers"]}


def _status(frontend: str) -> dict[str, Any]:
    with Client(frontend, timeout=10) as c:
        return c.status()


# ------------------------------------------------------------------ workloads


async def _turn(ac: AsyncClient, msgs: list[dict[str, str]], s: Settings,
                ph: Phase, later: bool) -> str:  # fmt: skip
    t0 = time.perf_counter()
    first = None
    parts: list[str] = []
    usage: dict[str, int] = {}
    async with ac.stream(MODEL, messages=msgs, max_tokens=s.answer_tokens, temperature=0,
                         ignore_eos=True) as st:  # fmt: skip
        async for d in st:
            if first is None and d.token_ids:
                first = time.perf_counter() - t0
            parts.append(d.text)
            if d.usage and d.finish_reason is not None:
                usage = d.usage
    if first is None:
        raise RuntimeError("a turn produced no token")
    ph.ttft.append(first)
    if later:
        ph.ttft_later.append(first)
    ph.prompt_tokens += usage.get("prompt_tokens", 0)
    ph.cached_tokens += usage.get("cached_tokens", 0)
    ph.completion_tokens += usage.get("completion_tokens", 0)
    return "".join(parts)


async def _conversations(
    frontend: str, texts: Texts, s: Settings, seed: int, think: float, shared: bool = True
) -> Phase:
    rng = random.Random(seed)
    system = f"[run {seed}] " + texts.make(rng, s.system_tokens)
    # shared=False: each conversation opens on a document of its own instead
    systems = [system if shared else f"[run {seed}.{i}] " + texts.make(rng, s.system_tokens)
               for i in range(s.conversations)]  # fmt: skip
    users = [[texts.make(rng, s.user_tokens) for _ in range(s.turns)]
             for _ in range(s.conversations)]  # fmt: skip
    ph = Phase()
    async with AsyncClient(frontend, timeout=300) as ac:

        async def conversation(i: int) -> None:
            pace = random.Random(i)  # the same pauses under either policy
            msgs = [{"role": "system", "content": systems[i]}]
            for t in range(s.turns):
                if t and think:  # a user reading the answer: workload pacing
                    await asyncio.sleep(pace.expovariate(1 / think))
                msgs.append({"role": "user", "content": users[i][t]})
                answer = await _turn(ac, msgs, s, ph, t > 0)
                msgs.append({"role": "assistant", "content": answer})

        t0 = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(s.conversations)))
        ph.wall_s = time.perf_counter() - t0
    return ph


def _phase_summary(ph: Phase, spread: dict[str, int], prefix_map: Any) -> dict[str, Any]:
    return {
        "ttft": {k: v for k, v in latency_summary_ms(ph.ttft).items() if k != "cdf_ms"},
        "ttft_turns_2_on": {
            k: v for k, v in latency_summary_ms(ph.ttft_later).items() if k != "cdf_ms"
        },
        "tok_s": round(ph.completion_tokens / ph.wall_s, 1),
        "wall_s": round(ph.wall_s, 2),
        "prompt_tokens": ph.prompt_tokens,
        "cached_tokens": ph.cached_tokens,
        "vllm_prefix_hit_rate": round(ph.cached_tokens / ph.prompt_tokens, 4)
        if ph.prompt_tokens else None,
        "dispatched_per_worker": sorted(spread.values()),
        "broker_prefix_map": prefix_map,
    }


def _prefill_ms(frontend: str, texts: Texts, s: Settings) -> float:
    """TTFT of a fresh 1,000-token prompt on an idle worker (nothing cached)."""
    rng = random.Random(99)
    out = []
    with Client(frontend, timeout=120) as c:
        for i in range(s.prefill_samples + 1):
            prompt = f"[prefill {i}] " + texts.make(rng, 1000)
            t0 = time.perf_counter()
            with c.stream(MODEL, prompt, max_tokens=1, temperature=0, ignore_eos=True) as st:
                for _ in st:
                    break
            if i:  # the first one warms up
                out.append((time.perf_counter() - t0) * 1000)
    return round(median(out), 1)


def _one_token_overhead(st: Stack, s: Settings) -> dict[str, Any]:
    """1-token requests with a routing frame, null worker, the brokers alternating."""
    msgs = [{"role": "system", "content": "A prompt long enough to hash. " * 140},
            {"role": "user", "content": "hi"}]  # fmt: skip
    lat: dict[str, list[float]] = {pol: [] for pol in POLICIES}
    clients = {pol: Client(st.frontend(pol), timeout=30) for pol in POLICIES}
    try:
        for c in clients.values():
            for _ in range(50):
                c.generate("null", messages=msgs, max_tokens=1)
        order = list(POLICIES)
        block = 100
        while len(lat[POLICIES[0]]) < s.latency_samples:
            for pol in order:
                c = clients[pol]
                for _ in range(block):
                    t0 = time.perf_counter()
                    c.generate("null", messages=msgs, max_tokens=1)
                    lat[pol].append(time.perf_counter() - t0)
            order.reverse()
    finally:
        for c in clients.values():
            c.close()
    return {pol: {k: v for k, v in latency_summary_ms(xs).items() if k != "cdf_ms"}
            for pol, xs in lat.items()}  # fmt: skip


def run(s: Settings) -> dict[str, Any]:
    from zserve.tiny_model import write_tiny_model

    tmp = tempfile.TemporaryDirectory(prefix="zserve-affinity-")
    st = Stack()
    logs: list[Any] = []
    try:
        model_dir = write_tiny_model(Path(tmp.name) / s.size, size=s.size)
        texts = Texts(model_dir)
        # The broker's cost first, on a null worker (nothing else running).
        st.worker("--engine", "null", "--model", "null", "--capacity", "256")
        st.wait("null", 1, 60)
        overhead = _one_token_overhead(st, s)
        vargs = {"enforce_eager": True, "enable_prefix_caching": True,
                 "kv_cache_memory_bytes": s.kv_mib << 20}  # fmt: skip
        cores = sorted(os.sched_getaffinity(0))
        for i in range(2):
            log = open(Path(tmp.name) / f"vllm-{i}.log", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            # vLLM's CPU backend binds its threads to core 0 by default: give
            # each worker a core of its own, as if each had its own machine.
            st.worker(
                "--engine", "vllm", "--model", str(model_dir), "--model-names", MODEL,
                "--dtype", "float32", "--capacity", str(s.capacity),
                *[f"--engine-arg={k}={json.dumps(v)}" for k, v in vargs.items()], log=log,
                env={"VLLM_CPU_OMP_THREADS_BIND": str(cores[i % len(cores)])},
            )  # fmt: skip
        try:
            st.wait(MODEL, 2, START_TIMEOUT)
        except Exception:
            for log in logs:
                log.flush()
                print(Path(log.name).read_text()[-3000:])
            raise
        prefill = _prefill_ms(st.frontend("cache_aware"), texts, s)
        variants = {"closed": (0.0, True), "think": (s.think_s, True),
                    "own": (s.think_s, False)}  # fmt: skip
        runs: dict[str, list[dict[str, Any]]] = {}
        phases: dict[str, list[Phase]] = {}
        order = list(POLICIES)
        seed = 0
        for _ in range(s.rounds):
            for variant, (think, shared) in variants.items():
                for pol in order:
                    seed += 1
                    key = f"{variant}/{pol}"
                    fe = st.frontend(pol)
                    before, c0 = _dispatched(fe), _status(fe)["counters"]
                    ph = asyncio.run(_conversations(fe, texts, s, seed, think, shared))
                    after, c1 = _dispatched(fe), _status(fe)["counters"]
                    spread = {w: after[w] - before.get(w, 0) for w in after if w in before}
                    spread = {w: n for w, n in spread.items() if n}
                    hits = {k: c1.get(k, 0) - c0.get(k, 0) for k in
                            ("cache_hits", "cache_misses", "cache_overridden")}  # fmt: skip
                    phases.setdefault(key, []).append(ph)
                    runs.setdefault(key, []).append(
                        _phase_summary(ph, spread, hits if pol == "cache_aware" else None)
                    )
                    print(f"  {key} run {len(runs[key])}: {json.dumps(runs[key][-1])}",
                          flush=True)  # fmt: skip
                order.reverse()
    finally:
        st.stop()
        for log in logs:
            log.close()
        tmp.cleanup()
    pooled = {}
    for pol, phs in phases.items():
        merged = Phase()
        for ph in phs:
            merged.ttft += ph.ttft
            merged.ttft_later += ph.ttft_later
            merged.prompt_tokens += ph.prompt_tokens
            merged.cached_tokens += ph.cached_tokens
            merged.completion_tokens += ph.completion_tokens
            merged.wall_s += ph.wall_s
        pooled[pol] = _phase_summary(merged, {}, None)
    return {"prefill_1000_ms": prefill, "think_s": s.think_s, "policies": pooled, "runs": runs,
            "overhead": overhead}  # fmt: skip


def _conversation_rows(variant: str, label: str, m: dict[str, Any]) -> list[dict[str, Any]]:
    sq, ca = m["policies"][f"{variant}/shortest_queue"], m["policies"][f"{variant}/cache_aware"]
    base = "shortest_queue, same run"
    t50 = _ratio(sq["ttft"]["p50_ms"], ca["ttft"]["p50_ms"])
    tok = _ratio(ca["tok_s"], sq["tok_s"])
    return [
        {"workload": f"{label}: TTFT p50 (ms)", "base": sq["ttft"]["p50_ms"],
         "baseline": base, "zserve": ca["ttft"]["p50_ms"], "ratio": t50,
         "target": f">= {TTFT_RATIO_MIN:g}x lower (ratio = sq / ca)",
         "pass": t50 is not None and t50 >= TTFT_RATIO_MIN},
        {"workload": f"{label}: TTFT p99 (ms)", "base": sq["ttft"]["p99_ms"],
         "baseline": base, "zserve": ca["ttft"]["p99_ms"],
         "ratio": _ratio(sq["ttft"]["p99_ms"], ca["ttft"]["p99_ms"]), "target": "-",
         "pass": None},
        {"workload": f"{label}: TTFT p50, turns 2-6 (ms)",
         "base": sq["ttft_turns_2_on"]["p50_ms"], "baseline": base,
         "zserve": ca["ttft_turns_2_on"]["p50_ms"],
         "ratio": _ratio(sq["ttft_turns_2_on"]["p50_ms"], ca["ttft_turns_2_on"]["p50_ms"]),
         "target": "-", "pass": None},
        {"workload": f"{label}: tokens/s", "base": sq["tok_s"], "baseline": base,
         "zserve": ca["tok_s"], "ratio": tok, "target": ">= 1x (not lower)",
         "pass": tok is not None and tok >= 1.0},
        {"workload": f"{label}: vLLM prefix cache hit rate",
         "base": sq["vllm_prefix_hit_rate"], "baseline": base,
         "zserve": ca["vllm_prefix_hit_rate"], "target": "-", "pass": None},
    ]  # fmt: skip


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    o_sq, o_ca = m["overhead"]["shortest_queue"], m["overhead"]["cache_aware"]
    base = "shortest_queue, same run"
    lower = _ratio
    o50 = lower(o_ca["p50_ms"], o_sq["p50_ms"])
    think = m.get("think_s", 1.0)
    return [
        {"workload": "prefill of 1,000 tokens, vLLM medium model (ms)", "base": 50,
         "baseline": "the issue's floor", "zserve": m["prefill_1000_ms"], "target": ">= 50",
         "pass": m["prefill_1000_ms"] >= 50},
        *_conversation_rows("closed", "32 conversations x 6 turns, next turn at once", m),
        *_conversation_rows("think", f"... next turn after a pause (mean {think:g} s)", m),
        *_conversation_rows("own", "... pauses, each on a document of its own", m),
        {"workload": "broker: 1-token p50, routing frame, null worker (ms)",
         "base": o_sq["p50_ms"], "baseline": base, "zserve": o_ca["p50_ms"], "ratio": o50,
         "target": f"<= {OVERHEAD_RATIO_MAX:g}x", "pass": o50 is not None
         and o50 <= OVERHEAD_RATIO_MAX},
        {"workload": "broker: 1-token p99, routing frame, null worker (ms)",
         "base": o_sq["p99_ms"], "baseline": base, "zserve": o_ca["p99_ms"],
         "ratio": lower(o_ca["p99_ms"], o_sq["p99_ms"]), "target": "-", "pass": None},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return run_and_report(
        "affinity", __doc__, argv, (FULL, QUICK), run, evaluate,
        quick_help="one run per policy (a few minutes)", column="cache_aware",
    )  # fmt: skip


if __name__ == "__main__":
    main()
