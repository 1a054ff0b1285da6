"""Sizes and ranges a peer could push past what the wire takes (issue 19,
defects 4 and 8c).

* An oversized request id (or model name) is refused by the broker with
  ``bad_request``: it would travel in every TOKENS header and record of the
  request, and a worker frame past the broker's MAX_MESSAGE_SIZE makes the
  broker drop that worker, with every other caller's stream on it.
* No worker message passes MAX_PAYLOAD, header included, however its records
  are made (many long ids, one huge delta).
* Integers msgpack cannot carry (seed 2**64, max_tokens 10**20, token ids
  past 2**31) are a ``BadRequest`` with a clear message, not OverflowError.
"""

from __future__ import annotations

import time

import pytest
import zmq

from tests.conftest import FAST_HB
from zserve import BadRequest, Client
from zserve import protocol as p
from zserve.worker.outbox import encode_message

TOKENS = 40


def _raw(endpoint: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def _final(sock: zmq.Socket, timeout: float = 10) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.poll(100):
            frames = sock.recv_multipart()
            if frames[1] == p.C_TOKENS:
                for r in p.decode_tokens(frames[2]):
                    if r[3] is not None:
                        return r
    raise AssertionError("no final record")


def test_an_oversized_request_id_is_refused_and_streams_on_the_worker_go_on(stack):
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--token-delay", "0.02", *FAST_HB)
    stack.wait_workers(1)
    body = p.encode_generate("x", None, p.SamplingParams(max_tokens=1).encode())
    big = b"i" * (9 << 20)  # its TOKENS header (started and finished) would pass 16 MiB
    raw = _raw(stack.frontend)
    try:
        with stack.client(max_resumes=0) as c:
            ids: list[int] = []
            with c.stream("m", "x", max_tokens=TOKENS) as s:
                for d in s:
                    ids.extend(d.token_ids or [])
                    if len(ids) == 5:
                        raw.send_multipart([p.CLIENT, p.C_REQUEST, big, b"m", body, b"1000"])
                        rid, _, _, reason, extra = _final(raw)
                        assert rid == big and reason == "error"
                        assert extra["error"]["code"] == "bad_request"
                        assert "request id" in extra["error"]["message"]
            assert ids == list(range(TOKENS))
        # a model name past its limit, the same
        raw.send_multipart([p.CLIENT, p.C_REQUEST, b"r2", b"m" * 300, body, b"1000"])
        rid, _, _, reason, extra = _final(raw)
        assert (rid, extra["error"]["code"]) == (b"r2", "bad_request")
        assert "model name" in extra["error"]["message"]
    finally:
        raw.close(0)
    counters = stack.status()["counters"]
    assert counters.get("workers_lost", 0) == 0, counters
    assert counters.get("dispatched") == 1, counters  # only the good one reached the worker


def test_the_client_refuses_an_oversized_model_name_itself():
    with Client("tcp://127.0.0.1:1") as c, pytest.raises(BadRequest, match="model name"):
        c.generate("m" * (p.MAX_MODEL_NAME + 1), "x")


def _parts(msg, limit):
    out = encode_message(msg, limit)
    for _, header, payload in out:
        assert len(header) + len(payload) <= limit
    return [(p.decode_header(h), p.decode_tokens(pl)) for _, h, pl in out]


def test_no_worker_message_passes_the_limit_with_its_header():
    # Many requests with long ids: the header (started and finished lists)
    # is as big as the payload.
    limit = 64 * 1024
    rids = [b"%0256d" % i for i in range(400)]
    recs = [[r, "t ", [1], "stop", None] for r in rids]
    parts = _parts((b"c", rids, rids, recs), limit)
    assert len(parts) > 1
    assert [r for (started, _), _ in parts for r in started] == rids
    assert [r for (_, finished), _ in parts for r in finished] == rids
    assert [r[0] for _, rs in parts for r in rs] == rids


def test_one_huge_delta_goes_as_several_records_of_its_request():
    limit = 64 * 1024
    text = "é" * 100_000  # 200 KB of UTF-8 in one record
    rec = [b"r", text, [7, 8], "length", {"usage": {"prompt_tokens": 1}}]
    parts = _parts((b"c", [b"r"], [b"r"], [rec]), limit)
    recs = [r for _, rs in parts for r in rs]
    assert len(parts) > 1 and len(recs) > 1
    assert "".join(r[1] for r in recs) == text
    assert recs[0][2] == [7, 8] and all(r[2] == [] for r in recs[1:])  # resumable: ids kept
    assert [r[3] for r in recs] == [None] * (len(recs) - 1) + ["length"]
    assert recs[-1][4] == {"usage": {"prompt_tokens": 1}}
    assert parts[0][0] == ([b"r"], []) and parts[-1][0] == ([], [b"r"])


@pytest.mark.parametrize(
    "kw, what",
    [
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 10**20}, "max_tokens"),
        ({"top_k": 2**40}, "top_k"),
        ({"stop_token_ids": [2**64]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ],
)
def test_out_of_range_integers_are_bad_requests(kw, what):
    with Client("tcp://127.0.0.1:1") as c, pytest.raises(BadRequest, match=what):
        c.stream("m", "x", **kw)
    with pytest.raises(ValueError, match=what):
        p.SamplingParams.from_dict(kw)
