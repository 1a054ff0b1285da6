"""``make bench``: every benchmark in turn, then one summary table.

    python -m bench [--quick] [--only overhead,http,engines,serving,vllm_server,scale,failover,
                                      rolling,affinity,soak]

Each benchmark measures zserve side by side with its baseline in the same
run and writes ``bench/results/<name>.json``; this runner reads those files
back and prints one table (also written as ``bench/results/summary.md``),
writes ``docs/benchmarks.md`` from them (``bench/docs_page.py``), then draws
the PNG plots beside them
(``bench/plots.py``). A benchmark that fails is reported and the others
still run; the exit status is non-zero if any failed to run (a missed target
is reported in the table, not as a failure).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench.common import RESULTS_DIR, cell, machine_info

BENCHES = (
    "overhead", "http", "engines", "serving", "vllm_server", "scale", "failover", "rolling",
    "affinity", "soak", "structured", "structured_serve", "tenants",
)  # fmt: skip
# Results written by a benchmark above as a second file (``http --responses-only``).
EXTRA_RESULTS = ("http_responses",)
Summarizer = Callable[[dict[str, Any]], list[list[str]]]


def _met(v: Any) -> str:
    return "-" if v is None else "yes" if v else "**no**"


def _target_rows(bench: str, key: str, name: Callable[[str], str]) -> Summarizer:
    """Rows of a benchmark whose JSON holds ``rows`` of {workload, ``key`` (the
    baseline's figure), zserve, ratio, target, pass}; ``name`` names the baseline."""

    def rows(r: dict[str, Any]) -> list[list[str]]:
        out = []
        for x in r.get("rows", []):
            ratio = x.get("ratio")
            if not x.get(key) or not ratio or ratio < 0 or "RSS" in x["workload"]:
                ratio = None  # e.g. RSS growth: a ratio of two near-zeros means nothing
            out.append([
                bench, x["workload"], x.get("baseline") or name(x["workload"]), cell(x.get(key)),
                cell(x.get("zserve")), "-" if ratio is None else f"{ratio:g}x",
                x.get("target", "-"), _met(x.get("pass")),
            ])  # fmt: skip
        return out

    return rows


def _responses_rows(r: dict[str, Any]) -> list[list[str]]:
    """/v1/responses against /v1/chat/completions on one gateway, same rounds."""
    m = r["responses_vs_chat"]
    chat, resp, v = m["chat"], m["responses"], m["verdict"]
    base = "/v1/chat/completions, same gateway and rounds"
    p50 = v["p50_ratio"] <= v["p50_target"]
    tps = v["tok_s_ratio"] >= v["tok_s_target"]
    return [
        ["http_responses", "/v1/responses streamed, 1-token p50 (ms)", base,
         cell(chat["stream_1_token"]["p50_ms"]), cell(resp["stream_1_token"]["p50_ms"]),
         f"{v['p50_ratio']:g}x", f"<= {v['p50_target']:g}x", _met(p50)],
        ["http_responses", "/v1/responses, 32 x 128 streamed (tok/s)", base,
         cell(chat["stream"]["tok_s"]), cell(resp["stream"]["tok_s"]),
         f"{v['tok_s_ratio']:g}x", f">= {v['tok_s_target']:g}x", _met(tps)],
    ] + ([
        ["http_responses", "/v1/responses, 32 x 128: CPU us per token (gateway + broker + "
         "worker + load generator)", base, cell(chat["cpu_us_per_token"]["all"]),
         cell(resp["cpu_us_per_token"]["all"]), f"{v['cpu_ratio']:g}x (chat / responses)",
         "-", "-"],
    ] if "cpu_ratio" in v else [])  # fmt: skip


def _http_rows(r: dict[str, Any]) -> list[list[str]]:
    m = r["measured"]
    z, fc, fl = m.get("zserve"), m.get("fastchat"), m.get("starlette_floor")
    rows = []
    if z and fc:
        rows.append([
            "http", "1-token request p50 (ms)", "FastChat 0.2.36",
            cell(fc["latency_1_token"]["p50_ms"]), cell(z["latency_1_token"]["p50_ms"]),
            f"{r['p50_ratio']}x lower", f">= {r['p50_target']:g}x lower",
            _met(r["p50_ratio"] >= r["p50_target"]),
        ])  # fmt: skip
        rows.append([
            "http", "32 concurrent x 128 (tok/s)", "FastChat 0.2.36",
            cell(fc["stream"]["tok_s"]), cell(z["stream"]["tok_s"]),
            f"{r['tok_s_ratio']}x", f">= {r['tok_s_target']:g}x",
            _met(r["tok_s_ratio"] >= r["tok_s_target"]),
        ])  # fmt: skip
    floor = r.get("floor")
    if z and fl:
        zl, fll = z["latency_1_token"]["p50_ms"], fl["latency_1_token"]["p50_ms"]
        target = f"<= {floor['target']:g}x" if floor else "-"
        rows.append([
            "http", "1-token request p50 (ms)", "bare Starlette SSE floor",
            cell(fll), cell(zl), f"{zl / fll:.2f}x", target, _met(floor and floor["pass"]),
        ])  # fmt: skip
    if z and fl and "latency_1_token_raw_client" in z:
        zr, fr = (x["latency_1_token_raw_client"]["p50_ms"] for x in (z, fl))
        rows.append([
            "http", "1-token request p50, bare-socket client (ms)", "bare Starlette SSE floor",
            cell(fr), cell(zr), f"{zr / fr:.2f}x", "-", "-",
        ])  # fmt: skip
    fb = m.get("starlette_broker")
    if z and fb:
        zl, fbl = z["latency_1_token"]["p50_ms"], fb["latency_1_token"]["p50_ms"]
        rows.append([
            "http", "1-token request p50 (ms)", "bare Starlette + one AsyncClient round trip",
            cell(fbl), cell(zl), f"{zl / fbl:.2f}x", "-", "-",
        ])  # fmt: skip
    return rows


def _soak_rows(r: dict[str, Any]) -> list[list[str]]:
    from bench.soak import summary_rows

    return summary_rows(r)


_ENGINE_BASELINES = {
    "hf": "zserve's HFEngine in one process",
    "vllm": "vLLM's AsyncLLM in one process",
}


SUMMARIZE: dict[str, Summarizer] = {
    "overhead": _target_rows(
        "overhead", "floor",
        lambda w: "zserve, CURVE off" if w.startswith("CURVE") else "bare ROUTER/ROUTER forwarder",
    ),
    "http": _http_rows,
    "engines": _target_rows(
        "engines", "direct",
        lambda w: _ENGINE_BASELINES.get(
            w.split(":", 1)[0].split("-", 1)[0], "same engine, in one process"
        ),
    ),
    "serving": _target_rows("serving", "direct", lambda w: "vllm serve (vLLM's own server)"),
    "vllm_server": _target_rows(
        "vllm_server", "direct", lambda w: "vllm serve, same engine settings"
    ),
    "scale": _target_rows("scale", "base", lambda w: "-"),
    "failover": _target_rows("failover", "base", lambda w: "-"),
    "rolling": _target_rows("rolling", "base", lambda w: "-"),
    "affinity": _target_rows("affinity", "base", lambda w: "shortest_queue, same run"),
    "soak": _soak_rows,
    "structured": _target_rows(
        "structured", "base", lambda w: "the same requests unconstrained, same run"
    ),
    "structured_serve": _target_rows(
        "structured_serve", "direct", lambda w: "vllm serve, same requests and engine settings"
    ),
    "tenants": _target_rows("tenants", "base", lambda w: "no tenants, same run"),
    "http_responses": _responses_rows,
}  # fmt: skip


def markdown(rows: list[list[str]]) -> str:
    head = ["bench", "workload", "baseline (same run)", "baseline", "zserve", "ratio",
            "target", "met"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def rows_of(result: dict[str, Any]) -> list[list[str]]:
    """One benchmark's summary rows, from its JSON record."""
    return SUMMARIZE[result["benchmark"]](result)


def load_results(
    names: tuple[str, ...] | list[str] = BENCHES + EXTRA_RESULTS,
) -> dict[str, dict[str, Any]]:
    """The committed (or latest) JSON record of each benchmark that has one."""
    out = {}
    for n in names:
        path = RESULTS_DIR / f"{n}.json"
        if path.exists():
            out[n] = json.loads(path.read_text())
    return out


def write_page() -> None:
    """``docs/benchmarks.md`` from every benchmark's latest results."""
    from bench.docs_page import PAGE, render

    PAGE.write_text(render(load_results(), rows_of))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="fewer samples, each bench in minutes")
    ap.add_argument("--only", default=",".join(BENCHES), help="comma-separated subset")
    ap.add_argument("--report", action="store_true",
                    help="run nothing: print the table from the last results")  # fmt: skip
    a = ap.parse_args(argv)
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = set(names) - set(BENCHES)
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    failed: list[str] = []
    rows: list[list[str]] = []
    results: dict[str, dict[str, Any]] = {}
    t0 = time.monotonic()
    for name in names:
        if not a.report:
            print(f"\n=== bench/{name}.py {'--quick' if a.quick else ''}".rstrip(), flush=True)
            mod = __import__(f"bench.{name}", fromlist=["main"])
            try:
                mod.main(["--quick"] if a.quick else [])
            except (Exception, SystemExit) as e:  # one broken bench must not hide the others
                if isinstance(e, SystemExit) and not e.code:
                    pass
                else:
                    traceback.print_exc()
                    failed.append(name)
                    continue
        path = RESULTS_DIR / f"{name}.json"
        if not path.exists():
            print(f"no results for {name} ({path})", file=sys.stderr)
            continue
        results[name] = json.loads(path.read_text())
        rows += SUMMARIZE[name](results[name])
    info = machine_info()
    table = markdown(rows)
    if a.report:  # the times the results were measured, not now
        when = ", ".join(f"{n} {results[n]['machine']['time']}" for n in names if n in results)
        modes = sorted({results[n].get("mode", "?") for n in names if n in results})
        head = f"`make bench` results ({'/'.join(modes)}: {when})"
    else:
        head = (
            f"`make bench`{' --quick' if a.quick else ''} on {info['cpus']} CPUs, "
            f"Python {info['python']}, libzmq {info['libzmq']}, {info['time']} "
            f"({time.monotonic() - t0:.0f} s)"
        )
    summary = f"{head}:\n\n{table}\n"
    (RESULTS_DIR / "summary.md").write_text(summary)
    print("\n" + summary)
    write_page()
    try:
        from bench.plots import main as plots

        plots([str(RESULTS_DIR)])
    except Exception:  # noqa: BLE001 - the numbers above still stand
        traceback.print_exc()
        failed.append("plots")
    if failed:
        print(f"failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
