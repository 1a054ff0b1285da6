"""A rolling upgrade under load, as an orchestrator does it: 2 brokers, 3
workers and a gateway carrying 32 concurrent streams; every process is
SIGTERMed and restarted (the gateway: replaced, a new one first) one at a
time, each only once the one before is back. No caller sees an error and
every text equals an uninterrupted run.

The workers run the null engine paced like a model (token i is id i, so a
stream continued from its ids is exact, as greedy decoding is on hf and
vllm): three tiny-model hf workers on this 2-core machine would take the
run well past a minute. ``bench/rolling.py`` runs the same with the crash
baseline and reports the stalls.
"""

from __future__ import annotations

from bench.rolling import Load, Rolling, Settings, planned_steps, run_load
from zserve.client import Client


def test_rolling_upgrade_under_32_streams_loses_nothing() -> None:
    s = Settings(callers=32, tokens=60, settle=0.3, tail=0.3, crash=False)
    st = Rolling(s)
    try:
        load = Load(backends=[st.gateways[0][1]])
        m = run_load(s, planned_steps(st, load), load)
        # Both brokers were back before the workers' turn: each saw 3 drains.
        with Client(st.frontends[1], timeout=10) as c:
            counters = c.status()["counters"]
    finally:
        st.stop()
    print(
        f"\nrolling upgrade: {m['requests']} requests, longest stall {m['longest_stall_s']} s, "
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
    assert counters["drains"] == 3 and counters.get("worker_lost", 0) == 0
