"""zserve + vLLM against vLLM's own OpenAI server: latency and tokens/s, same settings.

``python -m bench.vllm_server [--quick]`` serves the tiny model (``zserve
tiny-model``) with the same vLLM engine settings two ways:

* gateway -> broker -> ``zserve worker --engine vllm`` (``bench/serving.py``'s
  ``zserve_side``);
* ``vllm serve`` (vLLM's OpenAI server, ``serving.vllm_side``),

both started by ``serving.both_sides``.

Settings on both sides (``ENGINE``): ``kv_cache_memory_bytes`` 256 MiB,
``dtype`` float32, ``max_model_len`` 2048, ``enforce_eager`` (no
torch.compile: both start in under a minute on CPU). Both servers are up at
once and take turns (the order flips every round, each turn after both sides
have gone idle), with one httpx load generator through ``POST
/v1/chat/completions``:

* **1-token requests**: sequential non-streaming requests with
  ``max_tokens=1``, p50 / p99 (seconds from send to the parsed body);
* **streams** at 1, 8, 32 and 128 concurrent (greedy, ``ignore_eos``):
  time to first token (send to the first content chunk) p50 / p99, time
  per output token p50 / p99 (each stream's last chunk minus its first, over
  its tokens less one: ``vllm bench serve``'s TPOT, which bursts do not
  blur), inter-token latency p50 / p99 (the gap between content chunks divided by
  the tokens in the later chunk: a chunk carrying k tokens counts k gaps of
  gap/k), and tokens/s (every stream's tokens, counted from its usage, over
  the time from the first request to the last token).

Targets (issue 11): tokens/s >= 1.0x ``vllm serve`` at 8, 32 and 128
streams; 1-token p50 no more than 0.5 ms above vLLM's own. Writes
``bench/results/vllm_server.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import format_table, latency_summary_ms, median
from bench.serving import MODEL, PROMPT, _settle, both_sides, write_result

ENGINE: dict[str, Any] = {
    "kv_cache_memory_bytes": 256 << 20,
    "dtype": "float32",
    "max_model_len": 2048,
    "enforce_eager": True,
}
TOK_S_MIN = 1.0  # zserve / vllm serve, at these levels
TOK_S_AT = (8, 32, 128)
P50_MAX_ABOVE_MS = 0.5  # zserve's 1-token p50 minus vLLM's own
SIDES = ("zserve", "vllm_serve")


@dataclass(frozen=True)
class Settings:
    levels: tuple[int, ...]
    max_tokens: int
    rounds: int  # measured turns per side and level
    one_token: int  # 1-token requests per side and round


FULL = Settings(levels=(1, 8, 32, 128), max_tokens=128, rounds=4, one_token=200)
QUICK = Settings(levels=(1, 8, 32, 128), max_tokens=64, rounds=2, one_token=60)


def _body(max_tokens: int, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "stream": stream,
    }  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one_token(client: httpx.AsyncClient, url: str, n: int) -> list[float]:
    body = _body(1, stream=False)
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = await client.post(url, json=body)
        data = r.json()
        out.append(time.perf_counter() - t0)
        if r.status_code != 200 or data["usage"]["completion_tokens"] != 1:
            raise RuntimeError(f"1-token request: HTTP {r.status_code} {str(data)[:300]}")
    return out


async def _stream(
    client: httpx.AsyncClient, url: str, max_tokens: int, itl: list[float]
) -> tuple[float, int, float]:
    """One stream; (seconds to its first content chunk, tokens, time per
    output token after the first: (last chunk - first chunk) / (tokens - 1),
    what ``vllm bench serve`` calls TPOT)."""
    t0 = time.perf_counter()
    first = last = 0.0
    chunks = 0
    tokens = -1
    async with client.stream("POST", url, json=_body(max_tokens, stream=True)) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line.endswith("[DONE]"):
                continue
            now = time.perf_counter()
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            choices = chunk.get("choices") or []
            if not (choices and (choices[0].get("delta") or {}).get("content")):
                continue
            chunks += 1
            if chunks == 1:
                first = now - t0
            else:
                itl.append(now - last)
            last = now
    if tokens != max_tokens:
        raise RuntimeError(f"expected {max_tokens} tokens, usage says {tokens}")
    # A chunk may carry several tokens: spread its gap over them.
    k = max(1, chunks - 1)
    per = (tokens - 1) / k if chunks > 1 else 1.0
    if per > 1.0:
        gaps = itl[-k:]
        del itl[-k:]
        for g in gaps:
            itl.extend([g / per] * round(per))
    tpot = (last - t0 - first) / (tokens - 1) if tokens > 1 else 0.0
    return first, tokens, tpot


async def _turn(root: str, n: int, s: Settings, warm: bool) -> dict[str, Any]:
    url = root + "/v1/chat/completions"
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        if warm:
            await asyncio.gather(*(_stream(client, url, 4, []) for _ in range(n)))
        itl: list[float] = []
        t0 = time.perf_counter()
        got = await asyncio.gather(*(_stream(client, url, s.max_tokens, itl) for _ in range(n)))
        wall = time.perf_counter() - t0
    return {"tok_s": sum(g[1] for g in got) / wall, "ttft": [g[0] for g in got],
            "tpot": [g[2] for g in got], "itl": itl}  # fmt: skip


async def _latency_turn(root: str, n: int) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as client:
        url = root + "/v1/chat/completions"
        await _one_token(client, url, 5)  # warm the connection
        return await _one_token(client, url, n)


def run(s: Settings, logs: Path) -> dict[str, Any]:
    lat: dict[str, list[float]] = {k: [] for k in SIDES}
    streams: dict[str, dict[int, list[dict[str, Any]]]] = {
        k: {n: [] for n in s.levels} for k in SIDES
    }
    with both_sides(logs, ENGINE) as sides:
        startup, roots = sides.startup_s, sides.roots
        zpid, vpid = sides.pids["zserve"], sides.pids["vllm_serve"]
        print(f"  both up in {startup} s", flush=True)
        for r in range(s.rounds):
            order = SIDES if r % 2 == 0 else SIDES[::-1]
            for name in order:
                _settle([zpid, vpid])
                lat[name] += asyncio.run(_latency_turn(roots[name], s.one_token))
            for n in s.levels:
                for name in order:
                    _settle([zpid, vpid])
                    streams[name][n].append(asyncio.run(_turn(roots[name], n, s, warm=r == 0)))
                print(f"  round {r} x{n}: " + ", ".join(
                    f"{k} {streams[k][n][-1]['tok_s']:,.0f} tok/s" for k in SIDES), flush=True)
    measured: dict[str, Any] = {"startup_s_both": startup}
    for name in SIDES:
        one = latency_summary_ms(lat[name])
        levels: dict[str, Any] = {}
        for n, turns in streams[name].items():
            ttft = latency_summary_ms([x for t in turns for x in t["ttft"]])
            tpot = latency_summary_ms([x for t in turns for x in t["tpot"]])
            itl = latency_summary_ms([x for t in turns for x in t["itl"]]) if any(
                t["itl"] for t in turns) else None
            levels[str(n)] = {
                "tok_s": round(median([t["tok_s"] for t in turns]), 1),
                "runs_tok_s": [round(t["tok_s"], 1) for t in turns],
                "ttft_ms": {k: ttft[k] for k in ("p50_ms", "p99_ms", "max_ms")},
                "tpot_ms": {k: tpot[k] for k in ("p50_ms", "p99_ms", "max_ms")},
                "itl_ms": {k: itl[k] for k in ("p50_ms", "p99_ms", "max_ms")} if itl else None,
            }
        measured[name] = {"latency_1_token": one, "levels": levels}
    return measured


def rows(m: dict[str, Any], s: Settings) -> list[dict[str, Any]]:
    z, v = m["zserve"], m["vllm_serve"]
    zl, vl = z["latency_1_token"], v["latency_1_token"]
    out = [
        {"workload": "vllm: 1-token request p50 (ms), HTTP", "direct": vl["p50_ms"],
         "zserve": zl["p50_ms"], "ratio": round(zl["p50_ms"] / vl["p50_ms"], 3),
         "target": f"<= vllm serve + {P50_MAX_ABOVE_MS:g} ms",
         "pass": zl["p50_ms"] - vl["p50_ms"] <= P50_MAX_ABOVE_MS},
        {"workload": "vllm: 1-token request p99 (ms), HTTP", "direct": vl["p99_ms"],
         "zserve": zl["p99_ms"], "ratio": round(zl["p99_ms"] / vl["p99_ms"], 3),
         "target": "-", "pass": None},
    ]  # fmt: skip
    for n in s.levels:
        zn, vn = z["levels"][str(n)], v["levels"][str(n)]
        target = n in TOK_S_AT
        out.append({
            "workload": f"vllm: {n} concurrent x {s.max_tokens} (tok/s), HTTP",
            "direct": vn["tok_s"], "zserve": zn["tok_s"],
            "ratio": round(zn["tok_s"] / vn["tok_s"], 3),
            "target": f">= {TOK_S_MIN:g}x vllm serve" if target else "-",
            "pass": zn["tok_s"] / vn["tok_s"] >= TOK_S_MIN if target else None,
        })  # fmt: skip
        for what, key in (("time to first token", "ttft_ms"),
                          ("time per output token", "tpot_ms"),
                          ("inter-token latency", "itl_ms")):  # fmt: skip
            if zn.get(key) and vn.get(key):
                for q in ("p50_ms", "p99_ms"):
                    out.append({
                        "workload": f"vllm: {n} concurrent, {what} {q[:3]} (ms)",
                        "direct": vn[key][q], "zserve": zn[key][q],
                        "ratio": round(zn[key][q] / vn[key][q], 3) if vn[key][q] else None,
                        "target": "-", "pass": None,
                    })  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.vllm_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    s = QUICK if a.quick else FULL
    about = {
        "settings": {**asdict(s), "engine": ENGINE},
        "sides": {
            "zserve": "zserve gateway -> zserve broker -> zserve worker --engine vllm",
            "vllm_serve": "python -m vllm.entrypoints.openai.api_server (what vllm serve runs)",
        },
    }
    result = write_result(
        "vllm_server", a.quick, lambda logs: run(s, logs), lambda m: rows(m, s), about
    )
    table = result["rows"]
    print(format_table(
        ["workload", "vllm serve", "zserve", "ratio", "target", "pass?"],
        [[r["workload"], r["direct"], r["zserve"], r["ratio"], r["target"], r["pass"]]
         for r in table],
    ))  # fmt: skip
    return result


if __name__ == "__main__":
    main()
