"""Constrained decoding cost: tokens/s with a JSON schema against the same
requests unconstrained, the hf engine in-process, in the same run.

``python -m bench.structured [--quick]``

For each model (``tiny``: a decode step of a few ms, so any per-token grammar
cost shows; ``small``: 58 M parameters, a step of 10-20 ms on one core, nearer
a real model on a GPU) and N = 1, 8, 32 concurrent requests, greedy, prompts
that differ per request, ``max_tokens`` 128:

* **plain**: unconstrained, ``ignore_eos`` (exactly 128 tokens each);
* **schema**: ``structured`` = a JSON schema (an object with a free string,
  an integer, a boolean and an array of strings, all required), compact JSON,
  the budget rule on. A reply ends when its JSON is complete, so requests
  generate different numbers of tokens; the rate counts the tokens produced.

A run's rate is its tokens / (first request sent to last token received).
Runs alternate plain / schema (the order flips every round) after a warm-up
of each (which also compiles the grammar once); rates are medians over the
rounds. Every schema reply is checked: it parses, validates and ends ``stop``.
Target (issue 21): schema >= 0.9x plain at 8 and 32 streams. Writes
bench/results/structured.json.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import median, run_and_report

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["name", "age", "member", "tags"],
}
PROMPT = "Record {i}: a short description of a person, written as data."
TARGET = 0.9


@dataclass
class Settings:
    models: tuple[str, ...] = ("tiny", "small")
    levels: tuple[int, ...] = (1, 8, 32)
    rounds: int = 3
    max_tokens: int = 128
    threads: int = 1  # torch threads of the engine (the machine is shared with the bench)


QUICK = Settings(models=("tiny",), rounds=2)


async def _one(engine: Any, i: int, s: Settings, structured: bool) -> int:
    from zserve.protocol import SamplingParams
    from zserve.worker.engine import GenerateRequest

    params: dict[str, Any] = {"max_tokens": s.max_tokens, "temperature": 0}
    if structured:
        params["structured"] = {"type": "json", "value": SCHEMA}
    else:
        params["ignore_eos"] = True
    req = GenerateRequest(f"r{time.monotonic_ns()}-{i}", "m", PROMPT.format(i=i), None,
                          SamplingParams(**params))  # fmt: skip
    ids: list[int] = []
    text: list[str] = []
    last = None
    async for d in engine.generate(req):
        ids += d.token_ids or []
        text.append(d.text)
        last = d
    if structured:
        import jsonschema

        assert last is not None and last.finish_reason == "stop", ("".join(text), last)
        jsonschema.validate(json.loads("".join(text)), SCHEMA)
    else:
        assert len(ids) == s.max_tokens
    return len(ids)


async def _run(engine: Any, n: int, s: Settings, structured: bool) -> tuple[float, int]:
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(_one(engine, i, s, structured) for i in range(n)))
    return sum(counts) / (time.perf_counter() - t0), sum(counts)


async def _bench_model(model_dir: Path, s: Settings) -> dict[str, Any]:
    from zserve.worker.engines.hf import HFEngine

    engine = HFEngine([(str(model_dir), ["m"])], engine_args={"threads": s.threads})
    await engine.start()
    out: dict[str, Any] = {}
    try:
        for n in s.levels:
            await _run(engine, n, s, False)  # warm-up (and the grammar's compile)
            await _run(engine, n, s, True)
            rates: dict[str, list[float]] = {"plain": [], "schema": []}
            tokens: list[int] = []
            for r in range(s.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                for structured in order:
                    rate, count = await _run(engine, n, s, structured)
                    rates["schema" if structured else "plain"].append(rate)
                    if structured:
                        tokens.append(count)
            out[str(n)] = {
                "plain_tok_s": round(median(rates["plain"]), 1),
                "schema_tok_s": round(median(rates["schema"]), 1),
                "ratio": round(median(rates["schema"]) / median(rates["plain"]), 3),
                "schema_tokens_per_request": round(median(tokens) / n, 1),
                "runs": rates,
            }
            print(f"  {model_dir.name} x{n}: {out[str(n)]['plain_tok_s']} plain, "
                  f"{out[str(n)]['schema_tok_s']} schema tok/s", flush=True)  # fmt: skip
    finally:
        await engine.close()
    return out


def run(s: Settings) -> dict[str, Any]:
    from zserve.tiny_model import write_tiny_model

    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zserve-bench-structured-") as tmp:
        for model in s.models:
            model_dir = write_tiny_model(Path(tmp) / model, size=model)
            measured[model] = asyncio.run(_bench_model(model_dir, s))
    return measured


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for model, levels in m.items():
        for n, r in levels.items():
            target = int(n) >= 8
            rows.append({
                "workload": f"hf {model}, {n} streams, JSON schema vs plain (tok/s)",
                "baseline": "plain", "base": r["plain_tok_s"], "zserve": r["schema_tok_s"],
                "ratio": r["ratio"], "target": f">= {TARGET}x" if target else "-",
                "pass": (r["ratio"] >= TARGET) if target else None,
            })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    run_and_report("structured", __doc__, argv, (Settings(), QUICK), run, evaluate,
                   quick_help="the tiny model only, 2 rounds", column="schema")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
