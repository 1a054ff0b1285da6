"""Structured outputs through zserve against ``vllm serve``: the same JSON-schema
requests, the same engine, the share of replies that are valid JSON within
``max_tokens``.

``python -m bench.structured_serve [--quick]`` serves the tiny model with
``bench/vllm_server.py``'s engine settings two ways (``bench/serving.py``'s
``both_sides``: gateway -> broker -> ``zserve worker --engine vllm``, and
``vllm serve`` with its defaults for structured outputs, which is what a user
of it gets), both up at once, taking turns (the order flips every round, each
turn after both sides have gone idle).

Each turn sends N = 8 or 32 requests at once to ``POST /v1/chat/completions``,
non-streaming, ``response_format: {"type": "json_schema", "json_schema":
{"name", "schema", "strict": true}}`` with ``bench/structured.py``'s schema
(a free string, an integer, a boolean and an array of strings, all
required), prompts that differ per request, ``max_tokens`` 64 or 128, greedy
or sampled (temperature 1, a seed per request). The tiny model's weights are
random: it never writes JSON on its own, so whatever comes back valid was
made valid by the server.

Per side: the share of replies whose content parses and validates against
the schema (and their finish reasons), tokens/s over the turn (reported, not
a target: two servers on 2 cores), and CPU per 1,000 completion tokens, the
serving layer (zserve: gateway + broker + the worker's own process; ``vllm
serve``: its API server process) apart from vLLM's engine, from ``/proc``.

Target (issue 21): zserve's valid share 100 % at every setting, reported
beside ``vllm serve``'s. Writes ``bench/results/structured_serve.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import CpuMeter, format_table, median
from bench.serving import MODEL, _settle, both_sides, cpu_split, write_result
from bench.structured import SCHEMA, valid
from bench.vllm_server import ENGINE, SIDES

PROMPT = "Record {i}: a short description of a person, written as data."


@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...] = (8, 32)
    budgets: tuple[int, ...] = (64, 128)  # max_tokens
    temperatures: tuple[float, ...] = (0.0, 1.0)
    rounds: int = 2


FULL = Settings()
QUICK = Settings(levels=(8,), rounds=1)


def _body(i: int, max_tokens: int, temperature: float) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": PROMPT.format(i=i)}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "person", "schema": SCHEMA, "strict": True}},
    }  # fmt: skip
    if temperature > 0:
        body["seed"] = 1000 + i
    return body


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await client.post(url, json=body)
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    data = r.json()
    choice = data["choices"][0]
    return {"content": choice["message"].get("content"), "finish": choice["finish_reason"],
            "tokens": int(data["usage"]["completion_tokens"])}  # fmt: skip


async def _turn(
    root: str, n: int, max_tokens: int, temperature: float, meter: CpuMeter
) -> dict[str, Any]:
    url = root + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await _one(client, url, _body(0, 4, 0.0))  # the connection, and the grammar's compile
        meter.start()
        t0 = time.perf_counter()
        got = await asyncio.gather(
            *(_one(client, url, _body(i, max_tokens, temperature)) for i in range(n))
        )
        wall = time.perf_counter() - t0
        meter.stop()
    for g in got:  # checked after the clock stops
        g["valid"] = valid(g["content"])
    invalid = [(g["content"] or "")[:80] for g in got if not g["valid"]]
    tokens = sum(g["tokens"] for g in got)
    finishes: dict[str, int] = {}
    for g in got:
        finishes[g["finish"]] = finishes.get(g["finish"], 0) + 1
    return {"replies": n, "valid": sum(g["valid"] for g in got), "finish": finishes,
            "tok_s": tokens / wall, "tokens": tokens, "cpu": cpu_split(meter, tokens),
            "invalid_samples": invalid[:2]}  # fmt: skip


def _key(n: int, max_tokens: int, temperature: float) -> str:
    return f"{n} streams, max_tokens {max_tokens}, temperature {temperature:g}"


def run(s: Settings, logs: Path) -> dict[str, Any]:
    turns: dict[str, dict[str, list[dict[str, Any]]]] = {k: {} for k in SIDES}
    with both_sides(logs, ENGINE) as sides:
        pids = [sides.pids[k] for k in SIDES]
        print(f"  both up in {sides.startup_s} s", flush=True)
        for r in range(s.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for n in s.levels:
                for budget in s.budgets:
                    for temp in s.temperatures:
                        key = _key(n, budget, temp)
                        for side in order:
                            _settle(pids)
                            t = asyncio.run(_turn(sides.roots[side], n, budget, temp,
                                                  sides.meter(side)))  # fmt: skip
                            turns[side].setdefault(key, []).append(t)
                        print(f"  round {r}, {key}: " + ", ".join(
                            f"{k} {turns[k][key][-1]['valid']}/{n} valid, serving CPU "
                            f"{turns[k][key][-1]['cpu']['serving']} ms/1k tok"
                            for k in SIDES), flush=True)  # fmt: skip
    measured: dict[str, Any] = {"startup_s_both": sides.startup_s}
    for side in SIDES:
        out: dict[str, Any] = {}
        for key, ts in turns[side].items():
            finish: dict[str, int] = {}
            for t in ts:
                for k, v in t["finish"].items():
                    finish[k] = finish.get(k, 0) + v
            tokens = sum(t["tokens"] for t in ts)
            replies = sum(t["replies"] for t in ts)
            out[key] = {
                "replies": replies,
                "valid": sum(t["valid"] for t in ts),
                "valid_share": round(sum(t["valid"] for t in ts) / replies, 4),
                "finish": finish,
                "tokens_per_reply": round(tokens / replies, 1),
                "tok_s": round(median([t["tok_s"] for t in ts]), 1),
                # turns of unequal tokens: weigh each by its tokens
                "cpu_ms_per_1k_tokens": {
                    part: round(sum(t["cpu"][part] * t["tokens"] for t in ts) / tokens, 1)
                    for part in ("serving", "engine", "whole")
                },
                "invalid_samples": [x for t in ts for x in t["invalid_samples"]][:2],
            }
        measured[side] = out
    return measured


def rows(m: dict[str, Any]) -> list[dict[str, Any]]:
    z, v = m["zserve"], m["vllm_serve"]
    out: list[dict[str, Any]] = []
    for key in z:
        zk, vk = z[key], v[key]
        out.append({"workload": f"json_schema, {key}: valid replies (%)",
                    "direct": round(100 * vk["valid_share"], 1),
                    "zserve": round(100 * zk["valid_share"], 1), "ratio": None,
                    "target": "zserve 100 %", "pass": zk["valid"] == zk["replies"]})  # fmt: skip
        zc, vc = zk["cpu_ms_per_1k_tokens"], vk["cpu_ms_per_1k_tokens"]
        out.append({"workload": f"json_schema, {key}: serving-layer CPU (ms / 1k tokens)",
                    "direct": vc["serving"], "zserve": zc["serving"],
                    "ratio": round(zc["serving"] / vc["serving"], 3) if vc["serving"] else None,
                    "target": "-", "pass": None})  # fmt: skip
        out.append({"workload": f"json_schema, {key}: tokens per reply",
                    "direct": vk["tokens_per_reply"], "zserve": zk["tokens_per_reply"],
                    "ratio": None, "target": "-", "pass": None})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.structured_serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 streams only, 1 round")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    about = {
        "settings": {**asdict(s), "engine": ENGINE, "schema": SCHEMA},
        "sides": {
            "zserve": "zserve gateway -> zserve broker -> zserve worker --engine vllm",
            "vllm_serve": "python -m vllm.entrypoints.openai.api_server, structured "
            "outputs at their defaults",
        },
    }
    result = write_result("structured_serve", a.quick, lambda logs: run(s, logs), rows, about)
    print(format_table(
        ["workload", "vllm serve", "zserve", "ratio", "target", "pass?"],
        [[r["workload"], r["direct"], r["zserve"], r["ratio"], r["target"], r["pass"]]
         for r in result["rows"]],
    ))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
