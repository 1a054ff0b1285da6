"""Random frames on both broker sockets (hypothesis): the broker neither crashes
nor stops serving, and its memory does not grow with the garbage."""

from __future__ import annotations

from collections.abc import Iterator

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack
from zserve import protocol as p
from zserve.launcher import wait_for

psutil = pytest.importorskip("psutil")

# Frames that look almost right reach deeper into the broker than random bytes.
_tags = st.sampled_from([p.CLIENT, p.WORKER, b"ZSC9", b""])
_commands = st.sampled_from(
    [p.C_REQUEST, p.C_CANCEL, p.C_HEARTBEAT, p.C_DISCONNECT, p.C_QUERY, p.W_READY,
     p.W_TOKENS, p.W_HEARTBEAT, p.W_DISCONNECT, b"\x00", b"\xff"]
)  # fmt: skip
_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20)
)  # fmt: skip
_msgpack_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5)
    | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=10,
)
_bodies = st.one_of(
    st.binary(max_size=64),
    _msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
    st.just(p.EMPTY_HEADER),
    st.sampled_from([b"m", b"1", b"999999999999999999999", b"-1", b"\x90"]),
)
_messages = st.builds(
    lambda tag, cmd, rest: [tag, cmd, *rest],
    _tags, _commands, st.lists(_bodies, max_size=6),
) | st.lists(st.binary(max_size=16), min_size=1, max_size=4)  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_stack() -> Iterator[tuple[Stack, zmq.Socket, zmq.Socket]]:
    s = Stack()
    ctx = zmq.Context.instance()
    fe = ctx.socket(zmq.DEALER)
    be = ctx.socket(zmq.DEALER)
    try:
        s.start_broker("--max-message-size", "65536")
        s.worker("--model", "m", "--capacity", "4")
        s.wait_workers(1)
        for sock, ep in ((fe, s.frontend), (be, s.backend)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(ep)
        yield s, fe, be
    finally:
        fe.close()
        be.close()
        s.stop()


def _send(fe: zmq.Socket, be: zmq.Socket, front: list, back: list) -> None:
    for frames in front:
        fe.send_multipart(frames)
    for frames in back:
        be.send_multipart(frames)
    for sock in (fe, be):  # whatever the broker answered
        while sock.poll(0):
            sock.recv_multipart()


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(front=st.lists(_messages, max_size=8), back=st.lists(_messages, max_size=8))
def test_random_frames_never_break_the_broker(
    fuzz_stack: tuple[Stack, zmq.Socket, zmq.Socket], front: list, back: list
) -> None:
    stack, fe, be = fuzz_stack
    _send(fe, be, front, back)
    assert stack.broker is not None and stack.broker.alive()


def test_after_the_fuzz_the_broker_serves_and_its_memory_is_bounded(
    fuzz_stack: tuple[Stack, zmq.Socket, zmq.Socket],
) -> None:
    stack, fe, be = fuzz_stack
    assert stack.broker is not None
    rss = psutil.Process(stack.broker.pid).memory_info().rss
    # A second round of garbage, the same size as the first, must not grow the broker.
    before = stack.status()["counters"].get("malformed", 0)
    _send(
        fe, be,
        [[p.CLIENT, p.C_REQUEST, b"1"]] * 2000,  # too few frames
        [[p.WORKER, p.W_READY, b"\xc1"]] * 2000,
    )  # fmt: skip
    assert stack.broker.alive()
    counters = wait_for(
        lambda: (c := stack.status()["counters"]).get("malformed", 0) >= before + 4000 and c,
        10,
        "the second round counted as malformed",
    )
    assert counters["malformed"] == before + 4000
    grown = psutil.Process(stack.broker.pid).memory_info().rss - rss
    assert grown < 8 << 20, f"broker grew {grown >> 20} MiB on garbage"
    # The registered worker may have been confused by forged frames, never the broker:
    # a fresh worker and client still get served.
    stack.worker("--model", "m2")
    with stack.client() as c:
        wait_for(lambda: "m2" in c.models(), 20, "a fresh worker registered")
        assert c.generate("m2", "hello", max_tokens=3).text == "t0 t1 t2 "
