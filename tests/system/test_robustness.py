"""Bad input, vanished and slow clients: the broker never crashes, never loses
a final frame silently, and keeps its memory bounded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import msgpack
import pytest
import zmq

from tests.conftest import FAST_HB
from zserve import BadRequest, BrokerUnreachable, Client
from zserve import protocol as p
from zserve.launcher import free_port, wait_for


def _dealer(endpoint: str, **opts: int) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.connect(endpoint)
    return s


def _records(sock: zmq.Socket, timeout: float = 5.0) -> list[list]:
    """Read TOKENS records until a final one arrives."""
    out: list[list] = []
    while sock.poll(timeout * 1000):
        frames = sock.recv_multipart()
        if frames[1] == p.C_TOKENS:
            out.extend(p.decode_tokens(frames[2]))
            if out[-1][3] is not None:
                return out
    raise AssertionError(f"no final record; got {out[-3:]}")


def test_malformed_frames_on_both_sockets_are_counted_and_ignored(stack):
    stack.start_broker("--max-message-size", "65536")
    stack.worker("--model", "m")
    stack.wait_workers(1)
    fe = _dealer(stack.frontend)
    be = _dealer(stack.backend)
    try:
        for frames in (
            [b"garbage"],
            [p.CLIENT],
            [b"ZSC9", p.C_REQUEST, b"1", b"m", b""],
            [p.CLIENT, b"\x99"],
            [p.CLIENT, p.C_REQUEST, b"1"],
            [p.CLIENT, p.C_REQUEST, b"1", b"\xff\xfe", b"x"],
            [p.CLIENT, p.C_CANCEL],
        ):
            fe.send_multipart(frames)
        for frames in (
            [p.WORKER, p.W_READY, b"\xc1not msgpack"],
            [p.WORKER, p.W_READY, msgpack.packb({"models": []})],
            [p.WORKER, p.W_READY, msgpack.packb({"models": ["x"], "capacity": -3})],
            [p.WORKER, b"\x77"],
            [p.WORKER],
        ):
            be.send_multipart(frames)
        # a TOKENS frame from a worker that never said READY: told to reconnect
        be.send_multipart([p.WORKER, p.W_TOKENS, b"c", p.EMPTY_HEADER, b"\x90"])
        assert be.poll(5000)
        assert be.recv_multipart() == [p.WORKER, p.W_DISCONNECT]
        # oversize: refused by the transport, the broker carries on
        big = _dealer(stack.frontend)
        big.send_multipart([p.CLIENT, p.C_REQUEST, b"1", b"m", b"x" * 200_000])
        big.close()
        counters = wait_for(
            lambda: (c := stack.status()["counters"]).get("malformed", 0) >= 11 and c,
            20,
            "malformed messages counted",
        )
        assert counters["malformed"] == 11
        assert stack.broker.alive()
        with stack.client() as c:
            assert c.generate("m", "still fine", max_tokens=2).text == "t0 t1 "
    finally:
        fe.close()
        be.close()


def test_undecodable_request_body_gets_bad_request_from_worker(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    fe = _dealer(stack.frontend)
    try:
        fe.send_multipart([p.CLIENT, p.C_REQUEST, b"r1", b"m", b"\xc1"])
        (rec,) = _records(fe)
        assert rec[0] == b"r1" and rec[3] == "error"
        assert rec[4]["error"]["code"] == "bad_request"
        body = p.pack({"prompt": "x", "params": {"temperature": -5}})
        fe.send_multipart([p.CLIENT, p.C_REQUEST, b"r2", b"m", body])
        (rec,) = _records(fe)
        err = rec[4]["error"]
        assert err["code"] == "bad_request" and "temperature" in err["message"]
    finally:
        fe.close()
    with stack.client() as c, pytest.raises(BadRequest, match="top_p"):
        c.generate("m", "x", top_p=7)


def test_vanished_client_requests_are_cancelled_on_the_worker(stack):
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--capacity", "2", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    script = textwrap.dedent(
        f"""
        import sys
        from zserve import Client
        c = Client({stack.frontend!r}, heartbeat_interval=0.2)
        s1 = c.stream("m", "x", max_tokens=100000)
        s2 = c.stream("m", "x", max_tokens=100000)
        next(s1); next(s2)
        print("streaming", flush=True)
        sys.stdin.read()
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "streaming"
        assert stack.status()["workers"][0]["in_flight"] == 2
        child.kill()
        wait_for(lambda: stack.status()["workers"][0]["in_flight"] == 0, 20, "requests cancelled")
        wait_for(lambda: stack.status()["workers"][0]["queue_length"] == 0, 20, "worker idle")
        counters = stack.status()["counters"]
        # noticed either by its silence or by its connection closing
        assert counters.get("clients_expired", 0) + counters.get("client_send_failed", 0) >= 1
    finally:
        child.kill()
        child.wait()


def test_slow_client_is_cut_with_an_error_frame_not_silently(stack):
    stack.start_broker("--frontend-hwm", "4", *FAST_HB)
    stack.worker("--model", "m", "--capacity", "4", *FAST_HB)
    stack.wait_workers(1)
    sock = _dealer(stack.frontend, RCVHWM=1, RCVBUF=4096)
    try:
        body = p.Request(prompt="x", params=p.SamplingParams(max_tokens=5_000_000)).encode()
        sock.send_multipart([p.CLIENT, p.C_REQUEST, b"big", b"m", body])
        # never read: keep heartbeating so the broker knows we are alive
        def cut() -> bool:
            sock.send_multipart([p.CLIENT, p.C_HEARTBEAT])
            return stack.status()["counters"].get("slow_clients", 0) >= 1

        wait_for(cut, 60, "the broker to notice the slow client")
        wait_for(lambda: stack.status()["workers"][0]["in_flight"] == 0, 20, "request cancelled")
        recs: list[list] = []
        while not recs or recs[-1][3] is None:
            sock.send_multipart([p.CLIENT, p.C_HEARTBEAT])
            assert sock.poll(5000), "the final frame never came"
            frames = sock.recv_multipart()
            if frames[1] == p.C_TOKENS:
                recs.extend(p.decode_tokens(frames[2]))
        finals = [r for r in recs if r[3] is not None]
        assert len(finals) == 1  # exactly one final frame, and it says why
        assert finals[0][4]["error"]["code"] == "overloaded"
        assert not sock.poll(500) or sock.recv_multipart()[1] != p.C_TOKENS
        assert stack.status()["requests_in_flight"] == 0
    finally:
        sock.close()


def test_no_broker_is_a_clear_error_quickly():
    port = free_port()
    with (
        Client(f"tcp://127.0.0.1:{port}", connect_timeout=0.5) as c,
        pytest.raises(BrokerUnreachable, match="no broker"),
    ):
        c.generate("m", "x")


def test_broker_dying_mid_stream_raises_broker_unreachable(stack):
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    with Client(stack.frontend, heartbeat_interval=0.2, heartbeat_liveness=3) as c:
        s = c.stream("m", "x", max_tokens=10_000)
        next(s)
        stack.broker.kill()
        with pytest.raises(BrokerUnreachable, match="silent"):
            for _ in s:
                pass


def test_repeated_parameters_are_still_validated_by_type(stack):
    """The client validates a set of parameters once; 1 and True stay apart."""
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    with stack.client() as c:
        for _ in range(3):
            assert c.generate("m", "x", max_tokens=1).token_ids == [0]
        with pytest.raises(BadRequest, match="max_tokens"):
            c.generate("m", "x", max_tokens=True)
        with pytest.raises(BadRequest, match="stop_token_ids"):
            c.generate("m", "x", max_tokens=1, stop_token_ids=[[1]])
        assert c.generate("m", "x", max_tokens=2, stop=["zz"]).text == "t0 t1 "


def test_bad_heartbeat_interval_frame_is_answered_with_bad_request(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    fe = _dealer(stack.frontend)
    try:
        body = p.Request(prompt="x", params=p.SamplingParams(max_tokens=1)).encode()
        fe.send_multipart([p.CLIENT, p.C_REQUEST, b"1", b"m", body, b"soon"])
        (rec,) = _records(fe)
        assert rec[4]["error"]["code"] == "bad_request"
        fe.send_multipart([p.CLIENT, p.C_REQUEST, b"2", b"m", body, b"500"])
        recs = _records(fe)
        assert recs[-1][3] == "length" and recs[-1][2] == [0]
    finally:
        fe.close()
