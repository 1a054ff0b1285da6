"""A rolling upgrade under load, as an orchestrator does it: 2 brokers, 3
hf workers (the tiny model, greedy, float32) and a gateway carrying 32
concurrent streams; every process is SIGTERMed and restarted (the gateway:
replaced, a new one first) one at a time, each only once the one before is
back. No caller sees an error, and every text equals the one uninterrupted
request made first (``Rolling.load``): a stream handed over by a draining
worker, or moved away from a broker that said GOODBYE, goes on from its ids
exactly.

About 110 s on 2 cores (each hf worker restarts in 10 to 20 s under the
load). ``bench/rolling.py`` runs the same on paced null workers with the
crash baseline and reports the stalls.
"""

from __future__ import annotations

from pathlib import Path

from bench.rolling import Rolling, Settings, planned_steps, run_load
from zserve.client import Client


def test_rolling_upgrade_of_hf_workers_under_32_streams_loses_nothing(
    tiny_model_dir: Path,
) -> None:
    s = Settings(
        callers=32, tokens=40, settle=0.3, tail=0.3, crash=False,
        engine="hf", model_dir=str(tiny_model_dir),
    )  # fmt: skip
    st = Rolling(s)
    try:
        load = st.load()
        assert load.want and len(load.want) > 40  # a real greedy text to compare with
        m = run_load(s, planned_steps(st, load), load)
        # Both brokers were back before the workers' turn and held every
        # worker; each worker's DRAIN went to both. (A loaded machine can
        # have one broker drop a worker's session for a moment, so that
        # broker misses a DRAIN: one of them sees all three.)
        counters = []
        for fe in st.frontends:
            with Client(fe, timeout=10) as c:
                counters.append(c.status()["counters"])
    finally:
        st.stop()
    print(
        f"\nrolling upgrade (hf): {m['requests']} requests, longest stall "
        f"{m['longest_stall_s']} s, "
        + ", ".join(f"{k} {v['stall_s']} s" for k, v in m["steps"].items())
    )
    assert m["errors"] == {}
    assert m["requests"] >= 2 * s.callers and m["exact"] == m["requests"]
    steps = m["steps"]
    assert list(steps) == [
        "broker 0 SIGTERM", "broker 1 SIGTERM", "worker 0 SIGTERM", "worker 1 SIGTERM",
        "worker 2 SIGTERM", "gateway SIGTERM",
    ]  # fmt: skip
    assert all(v["errors"] == 0 for v in steps.values())
    assert max(c.get("drains", 0) for c in counters) == 3, counters
    assert all(c.get("worker_lost", 0) == 0 for c in counters), counters
    # streams outlived the 1 s grace and moved
    assert sum(c.get("handovers", 0) for c in counters) > 0, counters
