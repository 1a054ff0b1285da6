"""PNG plots of the benchmark results, beside them in ``bench/results/``.

``python -m bench.plots`` (run at the end of ``make bench``) reads
``bench/results/*.json`` and writes:

* ``latency_cdf.png``: the 1-token request's latency distribution, zserve
  against its floors (the bare pyzmq forwarder for the native path, a bare
  Starlette SSE server for HTTP) and FastChat. Where a result holds the
  whole distribution (``cdf_ms``, 101 percentiles) it is drawn as a CDF;
  older results hold p50 / p90 / p99 / max only, and those points are drawn.
* ``throughput_concurrency.png``: tokens/s against concurrent streams:
  vLLM served by zserve and by its own ``vllm serve`` (``serving.json``),
  hf and vllm through zserve and driven directly (``engines.json``), and
  the null engine over HTTP for zserve, FastChat and the Starlette floor
  (``http.json``).
* ``engine_ratios.png``: zserve's tokens/s over its baseline's, per engine
  and concurrency.
* ``scale.png``: the broker at scale (``scale.json``): tokens/s and the p99
  latency zserve adds to each token against concurrent streams, one line per
  worker count.

A plot whose results are missing is skipped (and said so).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

COLORS = {
    "zserve": "#2f6fde",
    "floor": "#7a7a7a",
    "floor_broker": "#2b2b2b",
    "fastchat": "#d9822b",
    "vllm": "#2a9d5c",
    "hf": "#8e44ad",
}


def _load(directory: Path, name: str) -> dict[str, Any] | None:
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _dist(summary: dict[str, Any]) -> tuple[list[float], list[float], bool]:
    """(latencies in ms, cumulative fractions, whole distribution?)."""
    cdf = summary.get("cdf_ms")
    if cdf:
        return list(cdf), [i / (len(cdf) - 1) for i in range(len(cdf))], True
    marks = (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("max_ms", 1.0))
    points = [(summary[k], q) for k, q in marks if k in summary]
    return [p[0] for p in points], [p[1] for p in points], False


def latency_cdf(directory: Path) -> Path | None:
    overhead, http = _load(directory, "overhead"), _load(directory, "http")
    series = []
    if overhead:
        lat = overhead["measured"]["latency_1_token"]
        series += [
            ("zserve native (client, broker, null worker)", lat["zserve"], "zserve", "-"),
            ("bare ROUTER/ROUTER forwarder (floor)", lat["floor"], "floor", "-"),
        ]
    if http:
        m = http["measured"]
        for key, label, color in (
            ("zserve", "zserve over HTTP (gateway)", "zserve"),
            ("starlette_floor", "bare Starlette SSE (HTTP floor)", "floor"),
            ("starlette_broker", "bare Starlette + AsyncClient round trip", "floor_broker"),
            ("fastchat", "FastChat 0.2.36", "fastchat"),
        ):
            if m.get(key):
                series.append((label, m[key]["latency_1_token"], color, "--"))
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    partial = False
    for label, summary, color, style in series:
        xs, ys, whole = _dist(summary)
        partial |= not whole
        ax.plot(xs, ys, style, color=COLORS[color], marker=None if whole else "o",
                drawstyle="steps-post" if whole else "default", label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("1-token request latency (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    title = "1-token request latency: zserve against its floors and FastChat"
    if partial:
        title += "\n(points: p50, p90, p99, max)"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(plt, fig, directory / "latency_cdf.png")


def throughput_concurrency(directory: Path) -> Path | None:
    serving, engines, http = (_load(directory, n) for n in ("serving", "engines", "http"))
    if not (serving or engines or http):
        return None
    plt = _pyplot()
    panels = [p for p in (serving or engines, http) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    ax = axes[0][0]
    if serving:
        sides = (("zserve", "vLLM through zserve, HTTP (serving)", "zserve", "-"),
                 ("vllm_serve", "vllm serve, HTTP (serving)", "vllm", "--"))  # fmt: skip
        for key, label, color, style in sides:
            levels = serving["measured"][key]["levels"]
            xs = sorted(int(n) for n in levels)
            ax.plot(xs, [levels[str(n)]["tok_s"] for n in xs], style, marker="o",
                    color=COLORS[color], label=label)  # fmt: skip
    if engines:
        for eng, m in engines["measured"].items():
            levels = m.get("levels") or {}
            xs = sorted(int(n) for n in levels)
            if not xs:
                continue
            for side, style in (("zserve", ":"), ("direct", "-.")):
                ys = [_tok_s(levels[str(n)], side) for n in xs]
                if all(y is not None for y in ys):
                    ax.plot(xs, ys, style, marker=".", color=COLORS.get(eng, "#444"), alpha=0.8,
                            label=f"{eng}: {'through zserve, native client' if side == 'zserve' else 'in one process'} (engines)")  # noqa: E501  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("tokens/s")
    ax.set_title("Real engines, CPU (tiny and small models)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    if http and len(panels) > 1:
        ax = axes[0][1]
        m = http["measured"]
        n = http["settings"]["concurrency"]
        names = [("zserve", "zserve gateway"), ("starlette_floor", "bare Starlette"),
                 ("fastchat", "FastChat 0.2.36")]  # fmt: skip
        got = [(label, m[k]["stream"]["tok_s"], k) for k, label in names if m.get(k)]
        colors = [COLORS["zserve" if k == "zserve" else "floor" if "floor" in k else "fastchat"]
                  for _, _, k in got]  # fmt: skip
        by_level = m.get("zserve", {}).get("stream_by_concurrency")
        if by_level:  # newer results: a sweep per system
            for k, label in names:
                levels = (m.get(k) or {}).get("stream_by_concurrency") or {}
                xs = sorted(int(c) for c in levels)
                ax.plot(xs, [levels[str(c)]["tok_s"] for c in xs], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent streams")
            ax.legend(fontsize=8)
        else:
            bars = ax.bar([g[0] for g in got], [g[1] for g in got], color=colors)
            ax.bar_label(bars, labels=[f"{g[1]:,.0f}" for g in got], fontsize=8)
            ax.set_xlabel(f"{n} concurrent streams x {http['settings']['max_tokens']} tokens")
        ax.set_ylabel("tokens/s")
        ax.set_title("Null engine over HTTP (the serving stack alone)")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("Tokens/s against concurrency (each bench's lines: one run, one load generator; "
                 "(name) = bench/results/name.json)", fontsize=10)  # fmt: skip
    return _save(plt, fig, directory / "throughput_concurrency.png")


def _tok_s(level: dict[str, Any], side: str) -> float | None:
    v = level.get(side)
    if isinstance(v, dict):
        v = v.get("tok_s")
    return float(v) if isinstance(v, (int, float)) else None


def engine_ratios(directory: Path) -> Path | None:
    engines, serving = _load(directory, "engines"), _load(directory, "serving")
    bars: list[tuple[str, float, str]] = []
    if engines:
        for eng, m in engines["measured"].items():
            for n, level in sorted((m.get("levels") or {}).items(), key=lambda kv: int(kv[0])):
                z, d = _tok_s(level, "zserve"), _tok_s(level, "direct")
                if z and d:
                    bars.append((f"{eng}\n{n} conc.\nvs in-process", z / d, eng))
    if serving:
        for n, level in sorted(serving["measured"]["zserve"]["levels"].items(),
                               key=lambda kv: int(kv[0])):  # fmt: skip
            v = serving["measured"]["vllm_serve"]["levels"][n]["tok_s"]
            bars.append((f"vllm\n{n} conc.\nvs vllm serve", level["tok_s"] / v, "zserve"))
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * len(bars)), 4.8))
    drawn = ax.bar([b[0] for b in bars], [b[1] for b in bars],
                   color=[COLORS.get(b[2], "#444") for b in bars])  # fmt: skip
    ax.bar_label(drawn, labels=[f"{b[1]:.2f}x" for b in bars], fontsize=8)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(0.95, color="#a4161a", linewidth=0.8, linestyle="--", label="0.95x")
    ax.set_ylabel("zserve tokens/s / baseline tokens/s")
    ax.set_title("Engines: zserve against the same engine without it")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(plt, fig, directory / "engine_ratios.png")


def scale(directory: Path, name: str = "scale.json") -> Path | None:
    path = directory / name
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    for nw in sorted({c["workers"] for c in r["cells"]}):
        cs = sorted((c for c in r["cells"] if c["workers"] == nw), key=lambda c: c["streams"])
        xs = [c["streams"] for c in cs]
        ax1.plot(xs, [c["tok_s"] for c in cs], marker="o", label=f"{nw} worker(s)")
        ax2.plot(xs, [c["added_ms"]["p99_ms"] for c in cs], marker="o", label=f"{nw} worker(s)")
    xs = sorted({c["streams"] for c in r["cells"]})
    ax1.plot(xs, [x / r["settings"]["step_s"] for x in xs], "--", color=COLORS["floor"],
             label="ideal (streams / step)")  # fmt: skip
    ax2.axhline(2.0, color="#a4161a", linestyle="--", linewidth=0.8, label="target p99 2 ms")
    for ax, label in ((ax1, "tokens/s"), (ax2, "added latency per token, p99 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    ax2.set_yscale("log")
    step_ms = r["settings"]["step_s"] * 1e3
    fig.suptitle(f"Broker at scale ({r['mode']} run, {r['machine']['cpus']} CPUs): null workers "
                 f"stepping every {step_ms:g} ms, capacity {r['settings']['capacity']} each, "
                 f"{r['settings']['clients']} client processes", fontsize=10)  # fmt: skip
    return _save(plt, fig, directory / name.replace(".json", ".png"))


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = (latency_cdf, throughput_concurrency, engine_ratios, scale)


def main(argv: list[str] | None = None) -> list[Path]:
    directory = Path(argv[0]) if argv else RESULTS_DIR
    written = []
    for plot in PLOTS:
        path = plot(directory)
        if path is None:
            print(f"plots: {plot.__name__}: no results in {directory}", file=sys.stderr)
        else:
            print(f"plots: wrote {path}")
            written.append(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
