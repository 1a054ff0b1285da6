"""Session affinity through the gateway: X-Session-ID or OpenAI's ``user``
reaches a cache_aware broker, whose requests then stay on one worker."""

from __future__ import annotations

import httpx

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from zserve.client import Client
from zserve.launcher import start_broker, start_worker, wait_for, wait_models


def _dispatched(fe: str) -> dict[str, int]:
    with Client(fe, timeout=10) as c:
        return {w["id"]: w["dispatched"] for w in c.status()["workers"]}


def test_session_header_and_user_field_keep_a_conversation_on_one_worker() -> None:
    broker, fe, be = start_broker("--dispatch", "cache_aware", *FAST_HB)
    procs = [broker]
    try:
        for _ in range(3):
            procs.append(start_worker(be, "--engine", "null", "--model", "m", *FAST_HB))
        gateway, root = start_gateway(fe, *FAST_HB)
        procs.append(gateway)
        wait_models(fe, ["m"], 30)
        with Client(fe, timeout=10) as c:  # the model shows with its first worker
            wait_for(lambda: len(c.status()["workers"]) == 3, 30, "three workers")
        with httpx.Client(base_url=root + "/v1", timeout=30) as http:
            for s in range(6):
                before = _dispatched(fe)
                for t in range(4):  # short prompts: no prefix hashes, the session alone
                    body = {"model": "m", "max_tokens": 2,
                            "messages": [{"role": "user", "content": f"turn {t}"}]}
                    if s % 2:
                        r = http.post("/chat/completions", json={**body, "user": f"u{s}"})
                    else:
                        r = http.post("/chat/completions", json=body,
                                      headers={"X-Session-ID": f"conv-{s}"})
                    assert r.status_code == 200, r.text
                after = _dispatched(fe)
                grew = {w: after[w] - before[w] for w in after if after[w] != before[w]}
                assert list(grew.values()) == [4], grew
        with Client(fe, timeout=10) as c:
            assert c.status()["prefix_map"]["sessions"] == 24
    finally:
        for pr in reversed(procs):
            pr.stop()
