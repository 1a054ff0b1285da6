"""In-process units: the error mapping, request parsing, chunk encoding."""

from __future__ import annotations

import asyncio
import json

import pytest

from zserve import errors as ze
from zserve.gateway.errors import APIError, to_api_error
from zserve.gateway.schema import (
    Choice,
    GenRequest,
    chat_logprobs,
    completion_logprobs,
    completion_response,
    parse_chat,
    parse_completion,
    total_usage,
)
from zserve.gateway.sse import DONE, ChunkEncoder, error_event
from zserve.protocol import Delta


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (ze.BadRequest("temperature must be in [0, 2]"), 400, "invalid_request_error"),
        (ze.ContextOverflow("too long"), 400, "invalid_request_error"),
        (ze.ModelNotFound("no"), 404, "invalid_request_error"),
        (ze.Overloaded("full"), 429, "rate_limit_error"),
        (ze.WorkerLost("died"), 503, "server_error"),
        (ze.BrokerUnreachable("gone"), 503, "server_error"),
        (ze.Timeout("slow"), 503, "server_error"),
        (ze.EngineError("boom"), 500, "server_error"),
        (ze.ProtocolError("bad"), 500, "server_error"),
        (ze.ZServeError("odd", code="something_new"), 500, "server_error"),
        (RuntimeError("bug"), 500, "server_error"),
    ],
)
def test_error_mapping(exc: Exception, status: int, type_: str) -> None:
    err = to_api_error(exc)
    assert (err.status, err.type) == (status, type_)
    body = json.loads(err.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if isinstance(exc, ze.ZServeError):
        assert body["error"]["code"] == exc.code
    assert to_api_error(ze.BadRequest("temperature must be x")).param == "temperature"
    assert to_api_error(ze.ModelNotFound("x")).param == "model"


def test_parse_chat_maps_fields() -> None:
    req = parse_chat(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, "b"], "name": "u"},
                {"role": "assistant", "content": None},
            ],
            "max_tokens": 9,
            "max_completion_tokens": 3,
            "n": 2,
            "stop": "x",
            "logprobs": True,
            "top_logprobs": 4,
            "top_k": 5,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert req.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab", "name": "u"},
        {"role": "assistant", "content": ""},
    ]
    assert req.params == {"max_tokens": 3, "stop": "x", "top_k": 5, "logprobs": 4}
    assert (req.n, req.stream, req.include_usage, req.choices) == (2, True, True, 2)


def test_parse_completion_prompts_and_errors() -> None:
    req = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 3, "logprobs": 2})
    assert req.prompts == ["a", "b"] and req.choices == 6 and req.params == {"logprobs": 2}
    for bad, param in (
        ({"model": "m", "prompt": "x", "n": 999}, "n"),
        ({"model": "m", "prompt": "x", "logprobs": 50}, "logprobs"),
        ({"model": "m", "prompt": "x", "stream_options": 3}, "stream_options"),
        ({"model": 3, "prompt": "x"}, "model"),
    ):
        with pytest.raises(APIError) as ei:
            parse_completion(bad)
        assert ei.value.status == 400 and ei.value.param == param


def chunk(raw: bytes) -> dict:
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
    return json.loads(raw[6:-2])


def test_deltas_read_together_become_one_chunk() -> None:
    enc = ChunkEncoder(True, "chatcmpl-1", 7, 'mo"del', include_usage=True)
    raw = enc.deltas(0, [Delta("t0 ", [0]), Delta("t1 ", [1]), Delta("t2 ", [2], "length")])
    assert raw.count(b"data: ") == 1
    c = chunk(raw)
    assert c["model"] == 'mo"del' and c["usage"] is None
    assert c["choices"] == [
        {"index": 0, "delta": {"content": "t0 t1 t2 "}, "logprobs": None, "finish_reason": "length"}
    ]
    assert chunk(enc.start(0))["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk(enc.deltas(1, [Delta("", None, "stop")]))["choices"][0]["delta"] == {}
    u = chunk(enc.usage({"prompt_tokens": 1}))
    assert u["choices"] == [] and u["usage"] == {"prompt_tokens": 1}


def test_completion_chunks_echo_and_logprob_offsets() -> None:
    lp = [{"token": "ab", "logprob": -0.5, "top_logprobs": [{"token": "ab", "logprob": -0.5}]}]
    enc = ChunkEncoder(False, "cmpl-1", 7, "m", echo_prompts=["P1", "Q"], n=2)
    assert chunk(enc.start(1))["choices"][0]["text"] == "P1"
    first = chunk(enc.deltas(1, [Delta("ab", [1], logprobs=lp)]))["choices"][0]
    assert first["logprobs"]["text_offset"] == [2]
    second = chunk(enc.deltas(1, [Delta("ab", [1], logprobs=lp)]))["choices"][0]
    assert second["logprobs"]["text_offset"] == [4]
    assert ChunkEncoder(False, "c", 1, "m").start(0) == b""


def test_logprob_shapes() -> None:
    lp = [{"token": "é", "logprob": -1.0, "top_logprobs": [{"token": "x", "logprob": -2.0}]}]
    c = chat_logprobs(lp)["content"][0]
    assert c["bytes"] == [0xC3, 0xA9] and c["top_logprobs"][0]["bytes"] == [ord("x")]
    t = completion_logprobs(lp, 3)
    assert t == {
        "tokens": ["é"], "token_logprobs": [-1.0], "top_logprobs": [{"x": -2.0}],
        "text_offset": [3],
    }  # fmt: skip


def test_usage_counts_each_prompt_once() -> None:
    req = GenRequest("m", prompts=["a", "b"], n=2)
    choices = [Choice(i, "t", "length", None, 10 + i // 2, 3) for i in range(4)]
    assert total_usage(req, choices) == {
        "prompt_tokens": 21, "completion_tokens": 12, "total_tokens": 33,
    }  # fmt: skip
    out = completion_response("cmpl-x", 1, req, choices)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]


def test_error_event_then_done() -> None:
    raw = error_event(APIError("died", "worker_lost"))
    assert raw.endswith(DONE)
    assert json.loads(raw[6 : -len(DONE) - 2])["error"]["code"] == "worker_lost"


def test_metrics_render_from_plain_counters() -> None:
    from zserve.gateway.metrics import _DURATION_BUCKETS, Metrics, Tracker, _observe

    m = Metrics()
    t = Tracker(m, "mo", "chat", 2)
    t.batch(0)
    t.batch(0)
    t.batch(1)
    t.done(3, 7)
    Tracker(m, "never-accepted", "chat", 1).failed("model_not_found", 404)
    m.model("mo").duration.counts[:] = [0] * len(m.model("mo").duration.counts)
    _observe(m.model("mo").duration, _DURATION_BUCKETS, 0.01)  # a bound is inclusive (le)
    text = m.render(None).decode()
    assert 'zserve_gateway_requests_total{endpoint="chat",model="mo"} 1.0' in text
    assert 'zserve_gateway_completion_tokens_total{model="mo"} 7.0' in text
    assert 'zserve_gateway_time_to_first_token_seconds_count{model="mo"} 1.0' in text
    assert 'zserve_gateway_inter_token_latency_seconds_count{model="mo"} 1.0' in text
    assert 'zserve_gateway_inter_token_latency_seconds_bucket{le="+Inf",model="mo"} 1.0' in text
    assert 'zserve_gateway_errors_total{code="model_not_found",status="404"} 1.0' in text
    assert "zserve_gateway_requests_in_flight 0.0" in text
    assert "never-accepted" not in text
    assert 'zserve_gateway_request_duration_seconds_bucket{le="0.005",model="mo"} 0.0' in text
    assert 'zserve_gateway_request_duration_seconds_bucket{le="0.01",model="mo"} 1.0' in text
    assert "zserve_broker_up 0.0" in text


def test_session_id_from_user_field_and_header() -> None:
    from zserve.gateway.app import session_header
    from zserve.gateway.generation import open_streams

    msgs = [{"role": "user", "content": "hi"}]
    assert parse_chat({"model": "m", "messages": msgs, "user": "u-1"}).session_id == "u-1"
    assert parse_chat({"model": "m", "messages": msgs}).session_id is None
    assert parse_completion({"model": "m", "prompt": "x", "user": "u-2"}).session_id == "u-2"
    with pytest.raises(APIError):
        parse_chat({"model": "m", "messages": msgs, "user": 7})
    assert session_header([(b"x-session-id", b"conv-9"), (b"host", b"h")]) == "conv-9"
    assert session_header([(b"host", b"h")]) is None

    class Recorder:
        def __init__(self) -> None:
            self.calls: list[dict] = []

        def stream(self, model, prompt=None, **kw):  # noqa: ANN001, ANN201, ANN003
            self.calls.append(kw)
            return self  # a stream as open_streams sees it: its frames, aclose

        _frames = [b"request"]

        async def aclose(self) -> None:
            pass

    # (the n choices of one input share the first one's request, routing
    # frame included: test_review_limits)
    rec = Recorder()
    req = parse_completion({"model": "m", "prompt": ["a", "b"], "user": "u-3"})
    asyncio.run(open_streams(rec, req))  # type: ignore[arg-type]
    assert [c["session_id"] for c in rec.calls] == ["u-3"] * 2
