"""Callers must not get ``cancelled`` they never asked for (issue 19, defect 6).

(a) The broker honours the heartbeat interval a client advertises on every
REQUEST, routing frame (a prompt of 256+ bytes, a session id) or not.
(b) A client heartbeats independently of its caller: a caller that takes
longer than the broker's expiry over one delta, or an event loop that
stalls that long, keeps its streams.
(c) A client that does go silent past its expiry has its requests ended with
``client_expired``, never ``cancelled``; the Python client continues such a
stream from what it received.
"""

from __future__ import annotations

import asyncio
import time

import zmq

from tests.conftest import FAST_HB
from zserve import AsyncClient
from zserve import protocol as p
from zserve._client_core import ClientCore
from zserve.launcher import wait_for

TOKENS = 30
TOKEN_DELAY = 0.05  # 1.5 s a stream
STALL = 1.5  # seconds: well past the broker's expiry of a 0.2 s client (0.6 s)
LONG_PROMPT = "x" * 300  # a routing frame goes with it (a prefix hash)


def _start(stack) -> None:
    stack.start_broker(*FAST_HB)  # 0.2 s x 3
    stack.worker("--model", "m", "--token-delay", str(TOKEN_DELAY), *FAST_HB)
    stack.wait_workers(1)


def _nobody_expired(stack) -> None:
    st = stack.status()
    assert st["counters"].get("clients_expired", 0) == 0, st["counters"]
    assert st["counters"].get("cancels", 0) == 0, st["counters"]


def test_advertised_interval_is_honoured_on_a_request_with_a_routing_frame(stack):
    _start(stack)
    # 1 s: five broker intervals; expiry 3 s, not the broker's 0.6 s
    with stack.client(heartbeat_interval=1.0) as c:
        r = c.generate("m", LONG_PROMPT, max_tokens=TOKENS)
        assert r.token_ids == list(range(TOKENS))
        r = c.generate("m", "x", max_tokens=TOKENS, session_id="s1")
        assert r.token_ids == list(range(TOKENS))
    _nobody_expired(stack)


def test_sync_client_keeps_its_stream_through_a_slow_caller(stack):
    _start(stack)
    with stack.client(heartbeat_interval=0.2) as c:
        ids: list[int] = []
        finals = []
        with c.stream("m", "x", max_tokens=TOKENS) as s:
            for d in s:
                ids.extend(d.token_ids or [])
                if len(ids) == 3:
                    time.sleep(STALL)  # the caller is away: the client must not be
                if d.finish_reason is not None:
                    finals.append(d.finish_reason)
        assert ids == list(range(TOKENS))
        assert finals == ["length"]
    _nobody_expired(stack)


def test_async_client_keeps_its_streams_through_a_stalled_loop(stack):
    _start(stack)

    async def run() -> list[list[int]]:
        async with AsyncClient(stack.frontend, heartbeat_interval=0.2, timeout=20) as ac:
            stalled = False

            async def one() -> list[int]:
                nonlocal stalled
                ids: list[int] = []
                async for d in ac.stream("m", "x", max_tokens=TOKENS):
                    ids.extend(d.token_ids or [])
                    if len(ids) >= 3 and not stalled:
                        stalled = True
                        time.sleep(STALL)  # the whole loop stalls (a blocking call)
                return ids

            return await asyncio.gather(one(), one(), one())

    assert asyncio.run(run()) == [list(range(TOKENS))] * 3
    _nobody_expired(stack)


def test_a_silent_client_gets_client_expired_not_cancelled(stack):
    _start(stack)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(stack.frontend)
    try:
        body = p.encode_generate("x", None, p.SamplingParams(max_tokens=TOKENS).encode())
        # A 0.2 s interval, then never a word more: expired after 0.6 s.
        sock.send_multipart([p.CLIENT, p.C_REQUEST, b"r1", b"m", body, b"200"])
        finals = []
        deadline = time.monotonic() + 10
        while not finals and time.monotonic() < deadline:
            if not sock.poll(200):
                continue
            frames = sock.recv_multipart()
            if frames[1] == p.C_TOKENS:
                finals += [r for r in p.decode_tokens(frames[2]) if r[3] is not None]
        assert len(finals) == 1, finals
        rid, _, _, reason, extra = finals[0]
        code = ((extra or {}).get("error") or {}).get("code")
        assert (rid, reason, code) == (b"r1", "error", "client_expired")
        # Nothing more for it: not the worker's ``cancelled`` final.
        while sock.poll(500):
            frames = sock.recv_multipart()
            if frames[1] == p.C_TOKENS:
                assert not [r for r in p.decode_tokens(frames[2]) if r[0] == b"r1"]
    finally:
        sock.close(0)
    wait_for(lambda: stack.status()["requests_in_flight"] == 0, 10, "the worker to stop it")
    assert stack.status()["counters"]["clients_expired"] == 1


def test_client_core_continues_a_stream_its_broker_expired():
    """A ``client_expired`` (or ``broker_unreachable``) final goes again from
    the ids received, under a new id, to the same broker; not a resume."""
    core = ClientCore(0.2)
    rid, _ = core.request_frames("m", "x", None, (5, None, None, None, None, None, None), {})
    core.mark_sent(rid, 1.0)
    part = [rid, "t0 t1 ", [0, 1], None, None]
    core.on_message([p.CLIENT, p.C_TOKENS, p.encode_tokens([part])], 1.1)
    expired = p.error_record(rid, "client_expired", "silent")
    core.on_message([p.CLIENT, p.C_TOKENS, p.encode_tokens([expired])], 1.2)
    st = next(iter(core.streams.values()))
    assert [list(r) for r in st.records] == [part]  # the final is not the caller's
    ((link, frames),) = core.take_resends()
    assert link == 0 and frames[2] != rid and frames[2] == st.rid
    assert p.Request.decode(frames[4]).continue_ids == [0, 1]
    assert core.resumes == 0 and core.links[0].in_flight == 1
