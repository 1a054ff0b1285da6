"""Registration, heartbeats, expiry, broker restart, retry, worker_lost."""

from __future__ import annotations

import pytest

from tests.conftest import FAST_HB
from zserve import WorkerLost
from zserve.launcher import wait_for


def test_registration_shows_in_status(stack):
    stack.start_broker()
    stack.worker("--model", "m1", "--model-names", "alpha,beta", "--capacity", "3", "--speed", "2")
    (w,) = stack.wait_workers(1)
    assert sorted(w["models"]) == ["alpha", "beta"]
    assert w["capacity"] == 3 and w["speed"] == 2.0 and w["engine"] == "null"
    with stack.client() as c:
        assert c.models() == ["alpha", "beta"]
        assert c.generate("beta", "hi", max_tokens=3).text == "t0 t1 t2 "


def test_sigkilled_worker_expires_within_liveness(stack):
    stack.start_broker(*FAST_HB)
    victim = stack.worker("--model", "m", *FAST_HB)
    stack.worker("--model", "other", *FAST_HB)
    stack.wait_workers(2)
    victim.kill()
    # A SIGKILLed worker says nothing and ZeroMQ reports no disconnect: only
    # its silence (0.6 s) can remove it. The deadline is generous for loaded
    # machines; without expiry it would never go.
    wait_for(lambda: stack.status()["models"] == ["other"], 20, "the dead worker gone")
    assert stack.status()["counters"]["workers_lost"] == 1


def test_restarted_broker_is_repopulated_by_running_workers(stack):
    broker = stack.start_broker(*FAST_HB)
    fe, be = stack.frontend, stack.backend
    stack.worker("--model", "m", *FAST_HB)
    stack.worker("--model", "n", *FAST_HB)
    stack.wait_workers(2)
    broker.kill()
    broker.stop()
    stack.start_broker(*FAST_HB, frontend=fe, backend=be)  # same endpoints, empty registry
    stack.wait_workers(2, timeout=10)
    with stack.client() as c:
        assert c.generate("n", "x", max_tokens=2).text == "t0 t1 "


def test_request_retried_when_worker_dies_before_first_token(stack):
    stack.start_broker(*FAST_HB)
    slow = stack.worker("--model", "m", "--token-delay", "30", *FAST_HB)
    stack.wait_workers(1)
    with stack.client() as c:
        s = c.stream("m", "x", max_tokens=3)
        wait_for(lambda: stack.status()["workers"][0]["in_flight"] == 1, 20, "dispatch")
        stack.worker("--model", "m", *FAST_HB)  # a healthy second worker
        stack.wait_workers(2)
        slow.kill()
        assert "".join(d.text for d in s) == "t0 t1 t2 "
    counters = stack.status()["counters"]
    assert counters["retried"] == 1 and counters["dispatched"] == 2


@pytest.mark.parametrize("resume", [False, True])
def test_worker_dying_mid_stream_ends_with_worker_lost(stack, resume):
    """With resumption off, or with no other worker to continue on."""
    stack.start_broker(*FAST_HB)
    w = stack.worker("--model", "m", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    with stack.client() as c:
        s = c.stream("m", "x", max_tokens=1000, resume=resume)
        got = [next(s).text for _ in range(3)]
        assert got == ["t0 ", "t1 ", "t2 "]
        w.kill()
        with pytest.raises(WorkerLost, match="mid-stream"):
            for _ in s:
                pass
        assert c.resumes == (1 if resume else 0)
