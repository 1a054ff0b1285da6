"""Bad input at every edge: the gateway refuses out-of-range fields as
OpenAI does (400, ``param`` set), the Python client refuses the same before
sending anything, and the worker checks again behind a client that skipped
the checks."""

from __future__ import annotations

import httpx
import pytest
import zmq

from tests.gateway.conftest import GatewayStack
from zserve import BadRequest, Client
from zserve import protocol as p

# (field, value, param OpenAI names)
BAD = [
    ("temperature", -0.1, "temperature"),
    ("temperature", 2.5, "temperature"),
    ("top_p", 0, "top_p"),
    ("top_p", 1.5, "top_p"),
    ("n", 0, "n"),
    ("n", 129, "n"),
    ("max_tokens", 0, "max_tokens"),
    ("presence_penalty", -2.5, "presence_penalty"),
    ("presence_penalty", 2.5, "presence_penalty"),
    ("frequency_penalty", 3, "frequency_penalty"),
    ("frequency_penalty", -3, "frequency_penalty"),
    ("stop", ["ok", 7], "stop"),
]


@pytest.mark.parametrize(("field", "value", "param"), BAD)
def test_gateway_refuses_out_of_range_fields(gw: GatewayStack, field, value, param) -> None:
    for path, body in (
        ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/completions", {"prompt": "hi"}),
    ):
        r = httpx.post(
            gw.base_url + path,
            json={"model": "m", **body, field: value},
            headers=gw.headers,
            timeout=30,
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "bad_request" and err["param"] == param, err


@pytest.mark.parametrize("top", [-1, 21])
def test_gateway_refuses_top_logprobs_out_of_range(gw: GatewayStack, top) -> None:
    r = httpx.post(
        gw.base_url + "/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
              "logprobs": True, "top_logprobs": top},
        headers=gw.headers, timeout=30,
    )  # fmt: skip
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "top_logprobs"


def test_client_refuses_the_same_before_sending(gw: GatewayStack) -> None:
    with Client(gw.frontend, timeout=10) as c:
        sent_before = c._last_send
        for field, value, _ in BAD:
            if field == "n":
                continue  # a gateway field: the client has one stream per call
            with pytest.raises(BadRequest, match=field):
                c.stream("m", "hi", **{field: value})
        assert c._last_send == sent_before  # nothing went out


def test_the_worker_checks_again(gw: GatewayStack) -> None:
    """A client that skips the checks still gets bad_request, from the worker."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(gw.frontend)
    try:
        for i, (field, value, _) in enumerate(b for b in BAD if b[0] != "n"):
            body = p.pack({"prompt": "x", "params": {field: value}})
            rid = b"r%d" % i
            s.send_multipart([p.CLIENT, p.C_REQUEST, rid, b"m", body])
            frames = [p.CLIENT, p.C_HEARTBEAT]
            while frames[1] != p.C_TOKENS:  # (a broker heartbeat may come first)
                assert s.poll(10_000), field
                frames = s.recv_multipart()
            (rec,) = p.decode_tokens(frames[2])
            assert rec[0] == rid and rec[3] == "error"
            assert rec[4]["error"]["code"] == "bad_request" and field in rec[4]["error"]["message"]
    finally:
        s.close()
