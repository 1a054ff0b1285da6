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
    assert not ob.empty
    msgs = {client: (started, finished, recs) for client, started, finished, recs in ob.take()}
    assert ob.empty
    started, finished, recs = msgs[b"c1"]
    assert started == [b"r1", b"r2"] and finished == []
    assert recs == [[b"r1", "ab", [1, 2], None, None], [b"r2", "x", [9], None, None]]
    started, finished, recs = msgs[b"c2"]
    assert finished == [b"r1"] and recs[0][3] == "stop"
    assert ob.take() == []


async def test_outbox_sends_one_message_per_client_per_step():
    ob = Outbox()
    sent = []
    ob.attach(lambda msg: sent.append(msg))

    async def req(i):
        await asyncio.sleep(0)
        ob.put(b"c", b"%d" % i, Delta("t", [i]), first=True)

    await asyncio.gather(*(req(i) for i in range(50)))
    await asyncio.sleep(0)
    assert len(sent) == 1  # one message for the client
    assert len(sent[0][3]) == 50  # carrying all 50 requests' deltas


async def test_outbox_merges_while_the_socket_is_full():
    ob = Outbox()
    sent = []
    room = asyncio.get_running_loop().create_future()

    def send(msg):
        sent.append(msg)
        return room if len(sent) == 1 else None

    ob.attach(send)
    ob.put(b"c", b"r", Delta("a", [0]), first=True)
    await asyncio.sleep(0)
    for i in range(1, 100):  # the socket is full: these wait and merge
        ob.put(b"c", b"r", Delta("b", [i]), first=False)
        await asyncio.sleep(0)
    assert len(sent) == 1
    room.set_result(None)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(sent) == 2
    (rec,) = sent[1][3]
    assert rec[1] == "b" * 99 and rec[2] == list(range(1, 100))


async def test_outbox_merges_logprobs_and_the_final_record_into_one():
    ob = Outbox()
    ob.put(b"c", b"r", Delta("a", [1], logprobs=[{"token": "a"}], usage={"x": 1}), first=True)
    ob.put(b"c", b"r", Delta("b", [2], logprobs=[{"token": "b"}]), first=False)
    ob.put(
        b"c", b"r",
        Delta("", None, "length", usage={"prompt_tokens": 1, "completion_tokens": 2}),
        first=False,
    )
    ((client, started, finished, recs),) = ob.take()
    assert started == [b"r"] and finished == [b"r"]
    # usage on a partial delta does not travel; the final record's does
    assert recs == [
        [
            b"r", "ab", [1, 2], "length",
            {
                "logprobs": [{"token": "a"}, {"token": "b"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 2},
            },
        ]
    ]


async def test_outbox_final_record_alone_keeps_its_extras():
    ob = Outbox()
    err = {"code": "engine_error", "message": "boom"}
    ob.put(b"c", b"r", Delta(finish_reason="error", error=err), first=True)
    ((_, started, finished, recs),) = ob.take()
    assert started == finished == [b"r"]
    assert recs == [[b"r", "", None, "error", {"error": err}]]
