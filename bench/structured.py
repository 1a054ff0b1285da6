"""Constrained decoding cost: tokens/s with a JSON schema against the same
requests unconstrained, the hf and vllm engines in-process, in the same run.

``python -m bench.structured [--quick]``

For each engine (``hf``: zserve's batched transformers engine; ``vllm``:
zserve's vllm engine, whose grammar runs in vLLM's engine core as a logits
processor, ``engines/vllm_grammar.py``), each model (``tiny``: a decode step
of a few ms, so any per-token grammar cost shows; ``small``: 58 M
parameters, a step of 10-20 ms on one core, nearer a real model on a GPU)
and N = 1, 8, 32 concurrent requests, greedy, prompts that differ per
request, ``max_tokens`` 128:

* **schema**: ``structured`` = a JSON schema (an object with a free string,
  an integer, a boolean and an array of strings, all required), compact JSON,
  the budget rule on. A reply ends when its JSON is complete.
* **plain**: the same prompts unconstrained, ``ignore_eos``, each request
  generating exactly as many tokens as its schema reply did in the warm-up
  (greedy: the same lengths every round). Both sides then do the same
  decode steps at the same batch sizes, and the ratio is the grammar's cost
  per token, not the shape of the batch's tail (a schema reply of 60 tokens
  against a plain one of 128 would leave the batch half empty at the end).

A run's rate is its tokens / (first request sent to last token received).
Runs alternate plain / schema (the order flips every round) after a warm-up
of each (which also compiles the grammar once); rates are medians over the
rounds (9 on the tiny model, whose runs take under a second, 3 on the small
one). Every schema reply is checked: it parses, validates and ends ``stop``.
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


def _validator() -> Any:
    import jsonschema

    return jsonschema.Draft202012Validator(SCHEMA)


_VALIDATOR = _validator()


def valid(text: str | None) -> bool:
    """Whether ``text`` is JSON that validates against ``SCHEMA``."""
    try:
        value = json.loads(text or "")
    except ValueError:
        return False
    return bool(_VALIDATOR.is_valid(value))


@dataclass
class Settings:
    engines: tuple[str, ...] = ("hf", "vllm")
    models: tuple[str, ...] = ("tiny", "small")
    levels: tuple[int, ...] = (1, 8, 32)
    rounds: int = 3
    # The tiny model's runs take under a second each, and round to round its
    # ratio moves by +-0.1 on this 2-core machine: more rounds, same cost.
    tiny_rounds: int = 9
    max_tokens: int = 128
    threads: int = 1  # torch threads of the engine (the machine is shared with the bench)


QUICK = Settings(models=("tiny",), rounds=2, tiny_rounds=4)
VLLM_KV_BYTES = {"tiny": 64 << 20, "small": 256 << 20}


async def _one(engine: Any, i: int, s: Settings, length: int | None) -> tuple[int, str, Any]:
    """One request: the schema one (``length`` None) or the plain one of
    ``length`` tokens; the tokens it produced, its text and its finish reason."""
    from zserve.protocol import SamplingParams
    from zserve.worker.engine import GenerateRequest

    params: dict[str, Any] = {"max_tokens": length or s.max_tokens, "temperature": 0}
    if length is None:
        params["structured"] = {"type": "json", "value": SCHEMA}
    else:
        params["ignore_eos"] = True
    req = GenerateRequest(f"r{time.monotonic_ns()}-{i}", "m", PROMPT.format(i=i), None,
                          SamplingParams(**params))  # fmt: skip
    n = 0
    text: list[str] = []
    finish = None
    async for d in engine.generate(req):
        n += len(d.token_ids or [])
        text.append(d.text)
        finish = d.finish_reason
    return n, "".join(text), finish


async def _run(
    engine: Any, n: int, s: Settings, lengths: list[int] | None
) -> tuple[float, list[int]]:
    """N requests at once (plain ones of ``lengths``, or schema ones when
    None): tokens/s and each request's token count. The replies are checked
    after the clock stops (a schema reply parses, validates and ends
    ``stop``; a plain one has its length)."""
    t0 = time.perf_counter()
    got = await asyncio.gather(*(
        _one(engine, i, s, None if lengths is None else lengths[i]) for i in range(n)
    ))  # fmt: skip
    rate = sum(g[0] for g in got) / (time.perf_counter() - t0)
    for i, (count, text, finish) in enumerate(got):
        if lengths is None:
            assert finish == "stop", (text, finish)
            _VALIDATOR.validate(json.loads(text))
        else:
            assert count == lengths[i], (count, lengths[i])
    return rate, [g[0] for g in got]


def _engine(kind: str, model_dir: Path, size: str, s: Settings) -> Any:
    if kind == "hf":
        from zserve.worker.engines.hf import HFEngine

        return HFEngine([(str(model_dir), ["m"])], engine_args={"threads": s.threads})
    from zserve.worker.engines.vllm import VLLMEngine

    return VLLMEngine(str(model_dir), ["m"], dtype="float32", engine_args={
        "enforce_eager": True, "kv_cache_memory_bytes": VLLM_KV_BYTES[size],
    })  # fmt: skip


async def _bench_model(kind: str, model_dir: Path, size: str, s: Settings) -> dict[str, Any]:
    engine = _engine(kind, model_dir, size, s)
    await engine.start()
    out: dict[str, Any] = {}
    try:
        for n in s.levels:
            _, lengths = await _run(engine, n, s, None)  # warm-up: the grammar's compile
            await _run(engine, n, s, lengths)
            rates: dict[str, list[float]] = {"plain": [], "schema": []}
            tokens: list[int] = []
            for r in range(s.tiny_rounds if size == "tiny" else s.rounds):
                order = (False, True) if r % 2 == 0 else (True, False)
                for structured in order:
                    rate, counts = await _run(engine, n, s, None if structured else lengths)
                    rates["schema" if structured else "plain"].append(rate)
                    if structured:
                        tokens.append(sum(counts))
            out[str(n)] = {
                "plain_tok_s": round(median(rates["plain"]), 1),
                "schema_tok_s": round(median(rates["schema"]), 1),
                "ratio": round(median(rates["schema"]) / median(rates["plain"]), 3),
                "schema_tokens_per_request": round(median(tokens) / n, 1),
                "plain_tokens_per_request": round(sum(lengths) / n, 1),
                "runs": rates,
            }
            print(f"  {kind} {size} x{n}: {out[str(n)]['plain_tok_s']} plain, "
                  f"{out[str(n)]['schema_tok_s']} schema tok/s", flush=True)  # fmt: skip
    finally:
        await engine.close()
    return out


def run(s: Settings) -> dict[str, Any]:
    import importlib.util

    from zserve.tiny_model import write_tiny_model

    measured: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zserve-bench-structured-") as tmp:
        for kind in s.engines:
            if kind == "vllm" and importlib.util.find_spec("vllm") is None:
                print("note: vllm is not installed; measuring hf only", flush=True)
                continue
            for size in s.models:
                model_dir = Path(tmp) / size
                if not model_dir.exists():
                    write_tiny_model(model_dir, size=size)
                measured.setdefault(kind, {})[size] = asyncio.run(
                    _bench_model(kind, model_dir, size, s)
                )
    return measured


def evaluate(m: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind, models in m.items():
        for model, levels in models.items():
            for n, r in levels.items():
                target = int(n) >= 8
                rows.append({
                    "workload": f"{kind} {model}, {n} streams, JSON schema vs plain (tok/s)",
                    "baseline": "plain", "base": r["plain_tok_s"], "zserve": r["schema_tok_s"],
                    "ratio": r["ratio"], "target": f">= {TARGET}x" if target else "-",
                    "pass": (r["ratio"] >= TARGET) if target else None,
                })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    run_and_report("structured", __doc__, argv, (Settings(), QUICK), run, evaluate,
                   quick_help="the tiny model only (both engines), 4 rounds",
                   column="schema")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
