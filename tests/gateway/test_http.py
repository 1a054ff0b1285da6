"""What the SDK cannot show: disconnects cancel on the worker, choices run
concurrently, the SSE bytes, /health and /metrics; and ``next_batch``."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from typing import Any

import httpx
import pytest

from tests.gateway.conftest import MODELS, GatewayStack
from zserve.client import AsyncClient
from zserve.errors import EngineError, ModelNotFound
from zserve.launcher import wait_for

USER = [{"role": "user", "content": "hi"}]


def chat(model: str, max_tokens: int, **kw: Any) -> dict[str, Any]:
    return {"model": model, "messages": USER, "max_tokens": max_tokens, **kw}


def follow_up_works(gw: GatewayStack) -> None:
    """slow has one slot: this only completes if the slot was freed."""
    r = httpx.post(
        gw.base_url + "/chat/completions", json=chat("slow", 2), headers=gw.headers, timeout=30
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "t0 t1 "


def test_disconnect_mid_stream_frees_the_worker_slot(gw: GatewayStack) -> None:
    with httpx.Client(base_url=gw.base_url, headers=gw.headers, timeout=30) as http:
        req = http.build_request(
            "POST", "/chat/completions", json=chat("slow", 100_000, stream=True)
        )
        resp = http.send(req, stream=True)
        lines = resp.iter_lines()
        assert any('"content":"t' in ln for ln in lines)  # a real token came
        assert gw.in_flight("slow") == 1
        resp.close()  # unread body: httpx drops the connection
    gw.wait_idle("slow")
    follow_up_works(gw)


def test_disconnect_while_waiting_for_a_non_streaming_answer(gw: GatewayStack) -> None:
    body = chat("slow", 100_000)
    with pytest.raises(httpx.ReadTimeout):
        with httpx.Client(headers=gw.headers, timeout=httpx.Timeout(30, read=0.5)) as http:
            http.post(gw.base_url + "/chat/completions", json=body)
    gw.wait_idle("slow")
    follow_up_works(gw)


def test_n_choices_run_concurrently(gw: GatewayStack) -> None:
    """wide has four slots; n=4 must fill them all at once."""
    out: dict[str, Any] = {}

    def call() -> None:
        out["r"] = httpx.post(
            gw.base_url + "/chat/completions",
            json=chat("wide", 40, n=4),
            headers=gw.headers,
            timeout=30,
        )

    t = threading.Thread(target=call, daemon=True)
    t.start()
    wait_for(lambda: gw.in_flight("wide") == 4 or "r" in out, 15, "four choices in flight")
    assert "r" not in out, "finished before all four choices were seen running together"
    t.join(30)
    body = out["r"].json()
    assert len(body["choices"]) == 4 and body["usage"]["completion_tokens"] == 160


def data_lines(text: str) -> list[str]:
    """The SSE payloads, checking the framing: every event is one ``data:``
    line followed by a blank line."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), text
    return [e[6:] for e in events]


def test_sse_bytes_for_a_chat_stream(gw: GatewayStack) -> None:
    body = chat("m", 40, stream=True, stream_options={"include_usage": True})
    with httpx.stream(
        "POST", gw.base_url + "/chat/completions", json=body, headers=gw.headers
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    events = data_lines(text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    first, *content, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in content) == "".join(
        f"t{i} " for i in range(40)
    )
    assert [c["choices"][0]["finish_reason"] for c in content][-1] == "length"
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 1, "completion_tokens": 40, "total_tokens": 41,
    }  # fmt: skip
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1


def test_error_before_the_first_token_is_an_http_status_not_an_event(gw: GatewayStack) -> None:
    body = chat("nope", 4, stream=True)
    r = httpx.post(gw.base_url + "/chat/completions", json=body, headers=gw.headers)
    assert r.status_code == 404 and r.headers["content-type"] == "application/json"


def test_health(gw: GatewayStack) -> None:
    r = httpx.get(gw.root + "/health", headers=gw.headers)
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and "m" in r.json()["models"]


def sample(metrics: str, name: str, **labels: str) -> float:
    for line in metrics.splitlines():
        m = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"no sample {name} {labels}")


def test_metrics(gw: GatewayStack) -> None:
    before = httpx.get(gw.root + "/metrics", headers=gw.headers).text
    h = gw.headers
    url = gw.base_url
    for _ in range(3):
        httpx.post(url + "/chat/completions", json=chat("m", 5), headers=h)
    streamed = chat("m", 5, stream=True)
    with httpx.stream("POST", url + "/chat/completions", json=streamed, headers=h) as r:
        r.read()
    httpx.post(url + "/chat/completions", json=chat("wide", 10), headers=h)  # 20 ms a token
    httpx.post(url + "/chat/completions", json=chat("unknown-model", 5), headers=h)
    httpx.post(url + "/chat/completions", json=chat("m", 5, temperature=-3), headers=h)
    emb = httpx.post(url + "/embeddings", json={"model": "m", "input": ["a b"]}, headers=h)
    after = httpx.get(gw.root + "/metrics", headers=gw.headers).text

    def delta(name: str, **labels: str) -> float:
        try:
            b = sample(before, name, **labels)
        except AssertionError:
            b = 0.0
        return sample(after, name, **labels) - b

    assert delta("zserve_gateway_requests_total", model="m", endpoint="chat") == 4
    assert delta("zserve_gateway_requests_total", model="m", endpoint="embeddings") == 1
    assert delta("zserve_gateway_completion_tokens_total", model="m") == 20
    emb_tokens = emb.json()["usage"]["prompt_tokens"]
    assert delta("zserve_gateway_prompt_tokens_total", model="m") == 4 + emb_tokens
    assert delta("zserve_gateway_time_to_first_token_seconds_count", model="m") == 4
    assert delta("zserve_gateway_inter_token_latency_seconds_count", model="wide") >= 1
    assert delta("zserve_gateway_request_duration_seconds_count", model="m") == 5  # + embeddings
    assert delta("zserve_gateway_errors_total", code="model_not_found", status="404") == 1
    assert delta("zserve_gateway_errors_total", code="bad_request", status="400") == 1
    assert sample(after, "zserve_gateway_requests_in_flight") == 0
    assert "unknown-model" not in after
    # The broker's view.
    assert sample(after, "zserve_broker_up") == 1
    assert sample(after, "zserve_broker_workers") == len(MODELS)  # one worker per model
    assert sample(after, "zserve_broker_worker_capacity", models="slow") == 1
    assert sample(after, "zserve_broker_worker_in_flight", models="m") == 0
    assert sample(after, "zserve_broker_model_workers", model="wide") == 1


def test_metrics_in_flight_gauges_while_streaming(gw: GatewayStack) -> None:
    body = chat("slow", 100_000, stream=True)
    with httpx.stream(
        "POST", gw.base_url + "/chat/completions", json=body, headers=gw.headers, timeout=30
    ) as r:
        lines = r.iter_lines()  # (dropping a half-read iterator closes the connection)
        next(lines)

        def broker_counts_it() -> str | None:  # its status is up to STATUS_TTL old
            text = httpx.get(gw.root + "/metrics", headers=gw.headers).text
            return text if sample(text, "zserve_broker_worker_in_flight", models="slow") else None

        text = wait_for(broker_counts_it, 10, "the broker's in-flight gauge")
        assert sample(text, "zserve_gateway_requests_in_flight") == 1
        assert sample(text, "zserve_broker_worker_in_flight", models="slow") == 1
    gw.wait_idle("slow")


# ------------------------------------------------------------ next_batch


async def wait_done(s: Any) -> None:
    deadline = time.monotonic() + 10
    while not s._state.done:
        assert time.monotonic() < deadline, "the stream never finished"
        await asyncio.sleep(0.01)


async def test_next_batch_returns_everything_buffered(gw: GatewayStack) -> None:
    async with AsyncClient(gw.frontend, timeout=10) as c:
        s = c.stream("m", "x", max_tokens=30)
        await s.start()
        await wait_done(s)  # every delta is in the buffer now
        batch = await s.next_batch()
        assert "".join(d.text for d in batch) == "".join(f"t{i} " for i in range(30))
        assert batch[-1].finish_reason == "length" and batch[-1].usage["completion_tokens"] == 30
        assert all(d.finish_reason is None for d in batch[:-1])
        assert await s.next_batch() == []

        with pytest.raises(ModelNotFound):
            await c.stream("nope", "x").next_batch()


async def test_next_batch_returns_deltas_before_an_error_then_raises(gw: GatewayStack) -> None:
    """flaky's engine sends two tokens, then fails: once all three records are
    buffered, one batch holds the two deltas and the next raises the error."""
    async with AsyncClient(gw.frontend, timeout=10) as c:
        s = c.stream("flaky", "x", max_tokens=10)
        await s.start()
        await wait_done(s)
        assert [d.text for d in await s.next_batch()] == ["t0 ", "t1 "]
        with pytest.raises(EngineError, match="fail_after"):
            await s.next_batch()
        assert await s.next_batch() == []
        await s.aclose()
