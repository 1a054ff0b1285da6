"""``docs/benchmarks.md``: the latest results as a page, written by the run.

``python -m bench`` (and ``python -m bench --report``) writes the page from
``bench/results/*.json`` after each run: the machine, the date and the commit
of each benchmark's results, one table per benchmark with every figure beside
its same-run baseline, and the plots. ``tests/test_docs.py`` renders it again
from the committed JSON and fails when the committed page differs, so the
page cannot drift from the results it claims to show.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

# What each benchmark measures, against what (one paragraph each).
ABOUT = {
    "overhead": "The native path (client → broker → null worker) against a bare pyzmq "
    "ROUTER/ROUTER forwarder with no bookkeeping, the floor of a Python broker; CURVE on "
    "against off. The issue-25 row's profile: [performance.md](performance.md).",
    "http": "The OpenAI API through the gateway (null engine) against FastChat 0.2.36 from "
    "PyPI (controller, openai_api_server and a null worker in `bench/.venv-fastchat`), a bare "
    "Starlette SSE endpoint (the HTTP floor), and the same endpoint taking its tokens from the "
    "gateway's broker through one `AsyncClient`; 1-token latency from httpx and from a bare "
    "socket.",
    "engines": "Tokens/s of the hf and vllm engines served through zserve against the same "
    "engine driven directly in one process, on the tiny model and on a 58 M-parameter one; hf "
    "time to first token in a closed loop and in a burst, batched prefill on and off. Where the "
    "tiny model's missing 5-16 % goes: [performance.md](performance.md).",
    "serving": "The same vLLM engine served through zserve (worker + gateway) and by `vllm "
    "serve`, default flags on both sides, same model and KV cache, 1 / 8 / 32 streams over "
    "HTTP.",
    "vllm_server": "zserve + vLLM against `vllm serve` with the same explicit engine settings: "
    "1-token p50/p99, time to first token, time per output token, inter-token latency (p50 / "
    "p99 / p99.9), stalls over 100 ms, tokens/s and CPU per 1,000 tokens (the serving layer "
    "apart from vLLM's engine) at 1 / 8 / 32 / 128 streams. Where the missed targets' time goes, "
    "with profiles: [performance.md](performance.md).",
    "scale": "The broker with 1-8 null workers paced like a batched model (one 20 ms step, "
    "capacity 256) and up to 2048 streams from several client processes: tokens/s, latency "
    "added per token, broker CPU per token and memory per 1000 requests in flight.",
    "failover": "A broker killed under 32 streams with a second one up (longest stall, "
    "errors), and what a second broker costs a client.",
    "rolling": "A rolling upgrade under 32 streams through the gateway (2 brokers, 3 paced "
    "null workers): every process SIGTERMed and restarted in turn, against a worker "
    "SIGKILLed, a broker SIGKILLed and a broker SIGSTOPped (silent) in the same run: errors, "
    "exact texts, the longest stall per stop.",
    "affinity": "`cache_aware` against `shortest_queue` dispatch on two vLLM workers with "
    "prefix caching: 32 conversations of 6 turns on a shared ~1,000-token system prompt.",
    "soak": "Steady load through the gateway for 10 minutes (1 with `--quick`) while a worker "
    "is SIGKILLed and restarted every minute: errors by code, resumes, broker RSS.",
}

ABOUT.update({
    "structured": "Constrained decoding's cost on the hf and vllm engines: tokens/s with a JSON "
    "schema against the same requests unconstrained (as many tokens each), in one process, "
    "1 / 8 / 32 streams, the tiny model (9 rounds) and the small one (3). Where the grammar's "
    "time goes on the tiny model: [performance.md](performance.md).",
    "structured_serve": "JSON-schema chat requests through zserve (vllm engine) and `vllm serve` "
    "(its structured-output defaults), same engine, 8 / 32 streams, max_tokens 64 / 128, greedy "
    "and sampled: the share of replies that parse and validate, and the serving layer's CPU per "
    "1,000 tokens.",
    "tenants": "The broker with a tenants file of 10 tenants (all within their limits) against "
    "none: 1-token latency, 256-stream tokens/s, broker CPU; and a flood (tenant A 64 streams, "
    "B 8) with fair sharing against one FIFO queue.",
    "http_responses": "`/v1/responses` streamed against `/v1/chat/completions` on the same "
    "gateway, in the same rounds (`python -m bench.http --responses-only`); the tokens/s ratio is "
    "the median of the rounds' paired ratios (48 in a full run: one figure swings 10-20 % between "
    "rounds on this machine), the tokens/s shown are the totals; the CPU row sums each process's "
    "CPU seconds over the throughput phases.",
})

SOURCE = {"http_responses": "http"}  # a result another benchmark's module writes

PLOTS = (
    ("latency_cdf.png", "1-token latency: zserve against its floors and FastChat"),
    ("throughput_concurrency.png", "tokens/s against concurrency"),
    ("engine_ratios.png", "engines: zserve against the same engine without it"),
    ("scale.png", "broker at scale: tokens/s and added p99 against streams"),
)

HEAD = ["workload", "baseline (same run)", "baseline", "zserve", "ratio", "target", "met"]


def _provenance(r: dict[str, Any]) -> str:
    m = r.get("machine", {})
    commit = m.get("commit") or "not recorded"
    return (
        f"{r.get('mode', '?')} run, {m.get('time', '?')}, commit `{commit}`, "
        f"{m.get('cpus', '?')} CPUs, Python {m.get('python', '?')}, "
        f"libzmq {m.get('libzmq', '?')}, {m.get('platform', '?')}"
    )


def render(
    results: dict[str, dict[str, Any]], rows_of: Callable[[dict[str, Any]], list[list[str]]]
) -> str:
    """The page, from each benchmark's JSON record (``rows_of`` gives its table
    rows, as in ``bench/results/summary.md``: bench, workload, baseline, ...)."""
    out = [
        "# Benchmarks",
        "",
        "<!-- Written by `python -m bench` (or `python -m bench --report`) from",
        "     bench/results/*.json; tests/test_docs.py fails when it is stale. -->",
        "",
        "`make bench` runs every benchmark with its baseline side by side in the same "
        "run; `python -m bench --only http,scale` runs a subset, `--quick` a short pass, "
        "`--report` rewrites this page from the last results. Each benchmark writes "
        "`bench/results/<name>.json` with every percentile and setting. On a 2-core "
        "machine shared by every process, read a ratio as ±5-10 %.",
        "",
        "| benchmark | results from |",
        "|---|---|",
    ]
    out += [f"| [{n}](#{n}) | {_provenance(r)} |" for n, r in results.items()]
    for name, r in results.items():
        rows = rows_of(r)
        source = f"Source: `bench/{SOURCE.get(name, name)}.py`."
        out += ["", f"## {name}", "", ABOUT.get(name, ""), "", source, ""]
        out += ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
        out += ["| " + " | ".join(row[1:]) + " |" for row in rows]
    plots = [(f, t) for f, t in PLOTS if (PAGE.parent.parent / "bench" / "results" / f).exists()]
    if plots:
        out += ["", "## Plots", ""]
        out += [f"![{t}](../bench/results/{f})\n" for f, t in plots]
    return "\n".join(out).rstrip("\n") + "\n"
