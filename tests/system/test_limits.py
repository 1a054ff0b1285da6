"""Limits that keep one caller from taking everything: requests in flight
per client (the broker) and a per-request deadline (the worker)."""

from __future__ import annotations

import pytest

from tests.conftest import FAST_HB
from zserve import BadRequest, Overloaded, Timeout
from zserve.launcher import wait_for


def in_flight(stack) -> int:
    return sum(w["in_flight"] for w in stack.status()["workers"])


def test_max_inflight_per_client_answers_overloaded_at_once(stack):
    stack.start_broker("--max-inflight-per-client", "2", *FAST_HB)
    stack.worker("--model", "m", "--capacity", "8", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    with stack.client() as c, stack.client() as other:
        a = c.stream("m", "a", max_tokens=10_000)
        b = c.stream("m", "b", max_tokens=10_000)
        next(a), next(b)
        with pytest.raises(Overloaded, match="2 requests of this client"):
            c.generate("m", "c", max_tokens=1)
        # the limit is per client: another one is served
        assert other.generate("m", "d", max_tokens=2).text == "t0 t1 "
        a.close()
        wait_for(lambda: in_flight(stack) == 1, 10, "the closed stream to end")
        assert c.generate("m", "e", max_tokens=2).text == "t0 t1 "
        b.close()
    assert stack.status()["counters"]["overloaded"] == 1


def test_a_request_past_its_deadline_is_stopped_by_the_worker(stack):
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--capacity", "2", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    with stack.client() as c:
        got = []
        with pytest.raises(Timeout, match="deadline"):
            for d in c.stream("m", "x", max_tokens=100_000, deadline=0.5):
                got.append(d.text)
        assert got[:3] == ["t0 ", "t1 ", "t2 "]  # it ran until the deadline
        assert len(got) < 1000
        # the engine was stopped, not only the stream: the slot is free again
        wait_for(lambda: in_flight(stack) == 0, 10, "the worker's slot freed")
        assert c.generate("m", "y", max_tokens=2, deadline=30).text == "t0 t1 "
        with pytest.raises(BadRequest, match="deadline"):
            c.generate("m", "z", deadline=0)
