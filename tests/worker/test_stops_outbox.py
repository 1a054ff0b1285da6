import asyncio

import pytest

from zserve.protocol import Delta
from zserve.worker.outbox import Outbox
from zserve.worker.stops import StopMatcher


def feed_all(stops, pieces):
    m = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = m.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + m.flush(), False


def test_stop_split_across_deltas_never_leaks():
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)  # "ST" held back
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)


def test_partial_match_released_when_it_is_not_a_stop():
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("AR") == ("STAR", False)


def test_earliest_of_several_stops_wins():
    assert feed_all(["b", "cd"], ["a", "xcdyb"]) == ("ax", True)


def test_no_stop_flushes_everything():
    assert feed_all(["zz"], ["a", "bz"]) == ("abz", False)


@pytest.mark.parametrize(
    "pieces", [["hello wor", "ld"], ["h", "e", "l", "lo world"], ["hello world"]]
)
def test_stop_result_independent_of_chunking(pieces):
    assert feed_all(["o w"], pieces) == ("hell", True)


async def test_outbox_coalesces_per_client_and_merges_per_request():
    ob = Outbox()
    ob.put(b"c1", b"r1", Delta("a", [1]), first=True)
    ob.put(b"c1", b"r1", Delta("b", [2]), first=False)
    ob.put(b"c1", b"r2", Delta("x", [9]), first=True)
    ob.put(b"c2", b"r1", Delta("z", [5], "stop", usage={"prompt_tokens": 1}), first=True)
    assert ob.ready.is_set()
    msgs = {client: (started, finished, recs) for client, started, finished, recs in ob.take()}
    assert not ob.ready.is_set()
    started, finished, recs = msgs[b"c1"]
    assert started == [b"r1", b"r2"] and finished == []
    assert recs == [[b"r1", "ab", [1, 2], None, None], [b"r2", "x", [9], None, None]]
    started, finished, recs = msgs[b"c2"]
    assert finished == [b"r1"] and recs[0][3] == "stop"
    assert ob.take() == []


async def test_outbox_wakes_sender_once_per_step():
    ob = Outbox()
    sent = []

    async def sender():
        await ob.ready.wait()
        sent.append(ob.take())

    async def req(i):
        await asyncio.sleep(0)
        ob.put(b"c", b"%d" % i, Delta("t", [i]), first=True)

    s = asyncio.create_task(sender())
    await asyncio.gather(*(req(i) for i in range(50)))
    await s
    assert len(sent) == 1 and len(sent[0]) == 1  # one message for the client
    assert len(sent[0][0][3]) == 50  # carrying all 50 requests' deltas
