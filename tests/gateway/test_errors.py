"""Every error status in OpenAI's shape, API keys, and an error mid-stream."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FAST_HB
from tests.gateway.conftest import KEY, KEY2, GatewayStack, start_gateway
from zserve.launcher import free_port, start_worker, wait_for, wait_models

USER = [{"role": "user", "content": "hi"}]


def sdk(gw: GatewayStack, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30)


def assert_error(body: Any, code: str, type_: str, param: str | None = None) -> None:
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["type"] == type_ and err["param"] == param
    assert isinstance(err["message"], str) and err["message"]


def post(gw: GatewayStack, path: str, **kw: Any) -> httpx.Response:
    kw.setdefault("headers", gw.headers)
    return httpx.post(gw.base_url + path, timeout=30, **kw)


# ------------------------------------------------------------------ 400


def test_400_bad_sampling_parameter(gw: GatewayStack) -> None:
    with pytest.raises(openai.BadRequestError) as ei:
        sdk(gw).chat.completions.create(model="m", messages=USER, temperature=-1)
    assert ei.value.status_code == 400
    assert_error(ei.value.response.json(), "bad_request", "invalid_request_error", "temperature")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", {"model": "m"}, "messages"),
        ("/chat/completions", {"messages": USER}, "model"),
        ("/chat/completions", {"model": "m", "messages": USER, "n": 0}, "n"),
        ("/chat/completions", {"model": "m", "messages": USER, "max_tokens": 0}, "max_tokens"),
        ("/chat/completions", {"model": "m", "messages": USER, "top_logprobs": 2}, "top_logprobs"),
        ("/chat/completions", {"model": "m", "messages": [{"content": "x"}]}, "messages"),
        (
            "/chat/completions",
            {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages",
        ),
        ("/chat/completions", {"model": "m", "messages": USER, "stop": 3}, "stop"),
        ("/completions", {"model": "m", "prompt": [1, "two", 3]}, "prompt"),  # (ids are fine)
        ("/completions", {"model": "m", "prompt": [1.5, 2]}, "prompt"),
        ("/completions", {"model": "m"}, "prompt"),
        ("/embeddings", {"model": "m", "input": []}, "input"),
        ("/embeddings", {"model": "m", "input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_400_bad_request_bodies(
    gw: GatewayStack, path: str, body: dict[str, Any], param: str
) -> None:
    r = post(gw, path, json=body)
    assert r.status_code == 400, r.text
    assert_error(r.json(), "bad_request", "invalid_request_error", param)


def test_400_not_json(gw: GatewayStack) -> None:
    for content in (b"{nope", b"[1, 2]"):
        r = post(gw, "/chat/completions", content=content)
        assert r.status_code == 400
        assert_error(r.json(), "bad_request", "invalid_request_error")


# ------------------------------------------------------------------ 401


def test_401_api_keys(gw: GatewayStack) -> None:
    with pytest.raises(openai.AuthenticationError) as ei:
        sdk(gw, "sk-wrong").chat.completions.create(model="m", messages=USER)
    assert ei.value.status_code == 401
    assert_error(ei.value.response.json(), "invalid_api_key", "authentication_error")
    for headers in ({}, {"Authorization": "Basic " + KEY}, {"Authorization": "Bearer"}):
        for path in ("/models", "/chat/completions", "/completions", "/embeddings"):
            get = path == "/models"
            r = (httpx.get if get else httpx.post)(  # type: ignore[operator]
                gw.base_url + path, headers=headers, **({} if get else {"json": {}})
            )
            assert r.status_code == 401, (path, headers)
    # Either key works; /health needs none, /metrics one (test_review_auth).
    for key in (KEY, KEY2):
        r = sdk(gw, key).chat.completions.create(model="m", messages=USER, max_tokens=1)
        assert r.choices[0].message.content == "t0 "
    assert httpx.get(gw.root + "/health").status_code == 200
    assert httpx.get(gw.root + "/metrics").status_code == 401
    assert httpx.get(gw.root + "/metrics", headers=gw.headers).status_code == 200


# ------------------------------------------------------------------ 404


def test_404_unknown_model(gw: GatewayStack) -> None:
    client = sdk(gw)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as ei:
            client.chat.completions.create(model="nope", messages=USER, stream=stream)
        assert_error(ei.value.response.json(), "model_not_found", "invalid_request_error", "model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_404_unknown_route_is_openai_shaped(gw: GatewayStack) -> None:
    r = httpx.get(gw.base_url + "/nothing-here", headers=gw.headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


# ------------------------------------------------------------------ 429


def test_429_when_the_queue_is_full(gw: GatewayStack) -> None:
    """busy: one slot, and the broker queues one request per model."""
    body = {"model": "busy", "messages": USER, "max_tokens": 1000, "stream": True}
    with httpx.Client(base_url=gw.base_url, headers=gw.headers, timeout=30) as http:
        running = http.send(http.build_request("POST", "/chat/completions", json=body), stream=True)
        try:
            wait_for(lambda: gw.in_flight("busy") == 1, 10, "busy's slot taken")
            done = threading.Event()

            def queued_one() -> None:
                short = {**body, "max_tokens": 2}
                with httpx.stream(
                    "POST", gw.base_url + "/chat/completions", json=short, headers=gw.headers
                ) as r:
                    r.read()  # waits in the queue until the slot frees
                done.set()

            t = threading.Thread(target=queued_one, daemon=True)
            t.start()
            wait_for(
                lambda: gw.status()["queued"].get("busy") == 1, 10, "one request queued for busy"
            )
            with pytest.raises(openai.RateLimitError) as ei:
                sdk(gw).chat.completions.create(model="busy", messages=USER, max_tokens=1)
            assert ei.value.status_code == 429
            assert_error(ei.value.response.json(), "overloaded", "rate_limit_error")
        finally:
            running.close()
        t.join(60)
        assert done.is_set()
    gw.wait_idle("busy")


# ------------------------------------------------------------------ 500


def test_500_engine_error(gw: GatewayStack) -> None:
    """broken: a real null worker whose engine raises before the first token."""
    client = sdk(gw)
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as ei:
            client.chat.completions.create(model="broken", messages=USER, stream=stream)
        assert ei.value.status_code == 500
        assert_error(ei.value.response.json(), "engine_error", "server_error")
        assert "RuntimeError" in ei.value.response.json()["error"]["message"]
    gw.wait_idle("broken")


def test_engine_error_mid_stream_is_an_error_event_then_done(gw: GatewayStack) -> None:
    """flaky: two tokens, then the engine raises. Streaming, the tokens come
    first and the error is an event; not streaming, it is a 500."""
    body = {"model": "flaky", "messages": USER, "max_tokens": 10, "stream": True}
    with httpx.stream(
        "POST", gw.base_url + "/chat/completions", json=body, headers=gw.headers, timeout=30
    ) as r:
        assert r.status_code == 200
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert_error(json.loads(events[-2]), "engine_error", "server_error")
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, events[:-2])
        if c.get("choices")
    )
    assert text == "t0 t1 "
    with pytest.raises(openai.InternalServerError) as ei:
        sdk(gw).chat.completions.create(model="flaky", messages=USER, max_tokens=10)
    assert_error(ei.value.response.json(), "engine_error", "server_error")
    gw.wait_idle("flaky")


# ------------------------------------------------------------------ 503


def test_503_broker_unreachable() -> None:
    nowhere = f"tcp://127.0.0.1:{free_port()}"
    proc, root = start_gateway(nowhere, "--connect-timeout", "0.5")
    try:
        client = openai.OpenAI(base_url=root + "/v1", api_key="x", max_retries=0, timeout=30)
        with pytest.raises(openai.InternalServerError) as ei:
            client.chat.completions.create(model="m", messages=USER)
        assert ei.value.status_code == 503
        assert_error(ei.value.response.json(), "broker_unreachable", "server_error")
        for path in ("/health", "/v1/models"):
            r = httpx.get(root + path, timeout=30)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "broker_unreachable"
        metrics = httpx.get(root + "/metrics", timeout=30).text
        assert "zserve_broker_up 0.0" in metrics
    finally:
        proc.stop()


def test_worker_lost_mid_stream_is_an_error_event_then_done(gw: GatewayStack) -> None:
    """A worker killed mid-generation: the stream gets an error event and
    [DONE]; a non-streaming request on it gets a 503."""
    doomed = start_worker(
        gw.backend, "--engine", "null", "--model", "doomed", "--capacity", "2",
        "--token-delay", "0.05", *FAST_HB,
    )  # fmt: skip
    try:
        wait_models(gw.frontend, ["doomed"], 20)
        failure: list[BaseException] = []

        def non_streaming() -> None:
            try:
                sdk(gw).chat.completions.create(model="doomed", messages=USER, max_tokens=1000)
            except BaseException as e:  # noqa: BLE001 - checked below
                failure.append(e)

        t = threading.Thread(target=non_streaming, daemon=True)
        t.start()
        body = {"model": "doomed", "messages": USER, "max_tokens": 1000, "stream": True}
        with httpx.stream(
            "POST", gw.base_url + "/chat/completions", json=body, headers=gw.headers, timeout=30
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            events = []
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                if len(events) == 2:  # the role chunk and one content chunk
                    break
            wait_for(lambda: gw.in_flight("doomed") == 2, 10, "both requests on doomed")
            doomed.kill()
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])
        assert_error(err, "worker_lost", "server_error")
        assert all("error" not in json.loads(e) for e in events[:-2])
        t.join(30)
        assert len(failure) == 1 and isinstance(failure[0], openai.InternalServerError)
        assert failure[0].status_code == 503
        assert failure[0].response.json()["error"]["code"] == "worker_lost"
    finally:
        doomed.stop()
