"""``/health`` and ``/ready`` as load balancers see them, and no empty
content chunk after the role chunk."""

from __future__ import annotations

import json

import httpx

from tests.conftest import FAST_HB
from tests.gateway.conftest import MODELS, GatewayStack, start_gateway
from zserve.launcher import free_port, start_broker, start_worker, wait_for


def test_ready_is_503_until_a_worker_serves() -> None:
    broker, fe, be = start_broker(*FAST_HB)
    procs = [broker]
    try:
        gw, root = start_gateway(fe, *FAST_HB)
        procs.append(gw)
        r = httpx.get(root + "/ready", timeout=10)
        assert r.status_code == 503 and r.json()["ready"] is False and r.json()["workers"] == 0
        h = httpx.get(root + "/health", timeout=10)
        assert h.status_code == 200
        assert h.json() == {"status": "ok", "broker": "reachable", "workers": 0, "models": []}
        procs.append(start_worker(be, "--engine", "null", "--model", "m", *FAST_HB))
        wait_for(lambda: httpx.get(root + "/ready", timeout=10).status_code == 200, 20, "ready")
        assert httpx.get(root + "/ready", timeout=10).json()["workers"] == 1
        assert httpx.get(root + "/health", timeout=10).json()["workers"] == 1
        procs.pop().stop()  # the worker leaves: not ready again
        wait_for(lambda: httpx.get(root + "/ready", timeout=10).status_code == 503, 20, "503")
    finally:
        for pr in reversed(procs):
            pr.stop()


def test_ready_is_503_without_a_broker() -> None:
    proc, root = start_gateway(f"tcp://127.0.0.1:{free_port()}", "--connect-timeout", "0.5")
    try:
        r = httpx.get(root + "/ready", timeout=30)
        assert r.status_code == 503 and r.json()["ready"] is False
    finally:
        proc.stop()


def test_health_counts_workers(gw: GatewayStack) -> None:
    def health() -> dict | None:
        body = httpx.get(gw.root + "/health", headers=gw.headers).json()
        assert body["broker"] == "reachable", body
        return body if body["workers"] == len(MODELS) else None

    # the module's stack: one worker per served model. (With 0.6 s of
    # liveness, a loaded machine can have a worker re-registering for a
    # moment: the count is waited for, and must come to exactly that.)
    body = wait_for(health, 30, f"/health to count {len(MODELS)} workers")
    assert body["status"] == "ok" and sorted(body["models"]) == sorted(MODELS)


def test_no_empty_content_chunk_after_the_role_chunk(gw: GatewayStack) -> None:
    """A stop string holds tokens back (``t2 `` could start ``t2 t3``): on the
    paced ``slow`` model that token is a delta of its own with no text, and it
    must not become a ``{"content": ""}`` chunk."""
    body = {
        "model": "slow", "max_tokens": 6, "stream": True, "stop": ["t2 t3"],
        "messages": [{"role": "user", "content": "hi"}],
    }  # fmt: skip
    with httpx.stream(
        "POST", gw.base_url + "/chat/completions", json=body, headers=gw.headers, timeout=30
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = ""
    for c in chunks[1:]:
        (choice,) = c["choices"]
        if choice["finish_reason"] is None:
            assert choice["delta"].get("content"), f"empty content chunk: {c}"
        text += choice["delta"].get("content") or ""
    assert text == "t0 t1 " and chunks[-1]["choices"][0]["finish_reason"] == "stop"
