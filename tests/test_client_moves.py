"""Planned stops, as the client core sees them (no sockets, time passed in):
a worker's hand-over, a broker's GOODBYE, and a (restarted) broker that
does not hold a request. Each moves the stream from exactly what it received,
through a live broker, and never ends it while one is live."""

from __future__ import annotations

from typing import Any

from zserve import protocol as p
from zserve._client_core import ClientCore

ARGS = (10, None, None, None, None, None, None)


def tokens(*recs: list[Any]) -> list[bytes]:
    return [p.CLIENT, p.C_TOKENS, p.encode_tokens(list(recs))]


def streaming(core: ClientCore, link: int = 0) -> bytes:
    """A stream sent through ``link`` that has received ids 0 and 1."""
    rid, _ = core.request_frames("m", "x", None, ARGS, {})
    core.mark_sent(rid, 1.0, link)
    core.on_message(tokens([rid, "t0 t1 ", [0, 1], None, None]), 1.1, link)
    return rid


def continued(frames: list[bytes]) -> tuple[list[int], int]:
    """A continuation's ids and characters received."""
    body = p.unpack(frames[4])
    return body.get("continue_ids"), body.get("continue_chars")


def test_a_handover_continues_on_the_same_broker_and_is_no_resume() -> None:
    core = ClientCore(brokers=2, primary=0)
    rid = streaming(core)
    err = {"code": "worker_lost", "message": "draining", p.HANDOVER: True}
    core.on_message(tokens([rid, "", None, p.FINISH_ERROR, {"error": err}]), 1.2)
    ((link, frames),) = core.take_resends()
    assert link == 0 and frames[1] == p.C_REQUEST and frames[2] != rid
    assert continued(frames) == ([0, 1], 6)
    assert core.handovers == 1 and core.resumes == 0
    (st,) = core.streams.values()
    assert [r[3] for r in st.records] == [None]  # the caller sees no final: only its token


def test_a_handover_before_any_token_goes_again_as_sent() -> None:
    core = ClientCore()
    rid, _ = core.request_frames("m", "x", None, ARGS, {})
    core.mark_sent(rid, 1.0)
    err = {"code": "worker_lost", "message": "draining", p.HANDOVER: True}
    core.on_message(tokens([rid, "", None, p.FINISH_ERROR, {"error": err}]), 1.2)
    ((_, frames),) = core.take_resends()
    assert continued(frames) == (None, None)  # (the same request: nothing received)
    assert core.handovers == 1


def test_goodbye_moves_streams_to_the_live_broker_at_once() -> None:
    core = ClientCore(brokers=2, primary=0)
    stalls: list[float] = []
    core.on_stall = stalls.append
    streaming(core)
    core.on_message([p.CLIENT, p.C_GOODBYE], 1.5, 0)
    (link, frames), bye = core.take_resends()
    assert link == 1 and continued(frames) == ([0, 1], 6)
    assert bye == (0, [p.CLIENT, p.C_DISCONNECT])  # moved: the leaving broker may go
    assert not core.links[0].alive and core.choose_link() == 1
    assert core.handovers == 1 and core.resumes == 0
    assert core.links[0].in_flight == 0 and core.links[1].in_flight == 1
    core.on_message(tokens([frames[2], "t2 ", [2], None, None]), 1.75, 1)
    assert stalls == [0.25]  # from the move to the next token
    core.on_message([p.CLIENT, p.C_HEARTBEAT], 2.0, 0)  # it answers again (a probe)
    assert core.links[0].alive


def test_goodbye_from_the_only_broker_ends_streams_at_once() -> None:
    core = ClientCore()
    st = core.streams[streaming(core)]
    core.on_message([p.CLIENT, p.C_GOODBYE], 1.5, 0)
    assert core.take_resends() == [(0, [p.CLIENT, p.C_DISCONNECT])] and not core.streams
    assert st.done and st.records[-1][4]["error"]["code"] == "broker_unreachable"
    assert core.links[0].in_flight == 0


def test_a_broker_that_does_not_hold_a_stream_sends_it_to_a_live_broker() -> None:
    """A restarted broker answers a quiet id with broker_unreachable: the
    stream goes on through the other broker, from its ids."""
    core = ClientCore(brokers=2, primary=0)
    rid = streaming(core)
    unknown = p.error_record(rid, "broker_unreachable", "the broker does not hold it")
    core.on_message(tokens(unknown), 3.0, 0)
    ((link, frames),) = core.take_resends()
    assert link == 1 and continued(frames) == ([0, 1], 6)


def test_a_restarted_broker_without_workers_passes_the_stream_on() -> None:
    """Sent again after a reset to a broker that restarted and has no worker
    yet (model_not_found): the other live broker takes it at once."""
    core = ClientCore(brokers=2, primary=0)
    rid = streaming(core)
    ended, left = core.link_reset(0, 2.0)
    assert not ended and left == [rid]
    ((link, frames),) = core.take_resends()
    assert link == 1  # the reset broker is passed over until it answers again
    core.links[0].alive = True  # it came back (a probe)...
    new = frames[2]
    core.on_message(tokens(p.error_record(new, "model_not_found", "no worker")), 2.5, 1)
    ((link, frames),) = core.take_resends()
    assert link == 0 and continued(frames) == ([0, 1], 6)
    # ...and that one has no worker yet either: it waits (no live broker left
    # that has not said so), to go again when asked about at a heartbeat.
    core.on_message(tokens(p.error_record(frames[2], "model_not_found", "none")), 2.6, 0)
    assert not core.take_resends() and len(core.streams) == 1
