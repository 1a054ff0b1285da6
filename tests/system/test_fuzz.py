"""Random frames on both broker sockets (hypothesis): the broker neither crashes
nor stops serving, and its memory does not grow with the garbage: not even by
a few dozen bytes per message."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import msgpack
import psutil
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Stack
from zserve import protocol as p
from zserve.launcher import wait_for

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


ROUND = 60_000  # messages per round of the memory check
ROUNDS = 2  # rounds measured after the baseline
# Growth allowed over ROUNDS x ROUND messages, measured against a baseline
# taken in the same run after one round (the allocator has settled by then).
# A leak of 40 bytes a message adds 2 x 60,000 x 40 B = 4.8 MB and fails.
# Checked once by hand (2026-11, not committed): a broker subclass keeping
# bytes(40) per malformed message grew 7.1 MB here and failed, bytes(100)
# 12.3 MB; the unmodified broker grew 0-16 KiB.
ALLOWED_GROWTH = 4 << 20
_rids = itertools.count()


def garbage_round(stack: Stack, fe: zmq.Socket, be: zmq.Socket, n: int) -> None:
    """``n`` messages the broker must refuse, in three kinds that take three
    paths (too few frames, a READY that is not msgpack, a REQUEST for a model
    nobody serves, each with a new request id); returns once the broker has
    counted every one of them."""
    before = stack.status()["counters"]
    kinds = 3
    per = n // kinds
    batch = 500
    for start in range(0, per, batch):
        for _ in range(min(batch, per - start)):
            fe.send_multipart([p.CLIENT, p.C_REQUEST, b"1"])
            be.send_multipart([p.WORKER, p.W_READY, b"\xc1"])
            rid = b"%d" % next(_rids)
            fe.send_multipart([p.CLIENT, p.C_REQUEST, rid, b"nobody", b"\x80"])
        while fe.poll(0):  # the model_not_found answers
            fe.recv_multipart()

    def counted() -> bool:
        while fe.poll(0):
            fe.recv_multipart()
        c = stack.status()["counters"]
        return (
            c.get("malformed", 0) >= before.get("malformed", 0) + 2 * per
            and c.get("model_not_found", 0) >= before.get("model_not_found", 0) + per
        )

    wait_for(counted, 120, f"the broker to refuse {n} messages")


def test_after_the_fuzz_the_broker_serves_and_its_memory_is_bounded(
    fuzz_stack: tuple[Stack, zmq.Socket, zmq.Socket],
) -> None:
    stack, fe, be = fuzz_stack
    assert stack.broker is not None
    broker = psutil.Process(stack.broker.pid)
    garbage_round(stack, fe, be, ROUND)  # the baseline: the allocator settles
    rss = broker.memory_info().rss
    for _ in range(ROUNDS):
        garbage_round(stack, fe, be, ROUND)
    assert stack.broker.alive()
    grown = broker.memory_info().rss - rss
    assert grown < ALLOWED_GROWTH, (
        f"broker grew {grown} bytes over {ROUNDS * ROUND} refused messages "
        f"({grown / (ROUNDS * ROUND):.0f} B each)"
    )
    # The registered worker may have been confused by forged frames, never the broker:
    # a fresh worker and client still get served.
    stack.worker("--model", "m2")
    with stack.client() as c:
        wait_for(lambda: "m2" in c.models(), 20, "a fresh worker registered")
        assert c.generate("m2", "hello", max_tokens=3).text == "t0 t1 t2 "
