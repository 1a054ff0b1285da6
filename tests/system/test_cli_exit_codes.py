"""``zserve generate``'s exit statuses 4-9, each from a real state of a real
stack (2 and 3 are in test_cli.py): the mapping in cli.py is the contract
scripts rely on, so each code is produced the way a user would meet it."""

from __future__ import annotations

import signal
import subprocess
from typing import Any

import pytest

from tests.conftest import FAST_HB
from zserve.launcher import Proc, free_port, wait_for, zserve_cmd

SLOW = ["--token-delay", "60"]  # no first token while the test looks on


def generate(frontend: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        zserve_cmd("generate", "--broker", frontend, "--model", "m", *args, "hi"),
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start_generate(frontend: str, *args: str) -> Proc:
    return Proc(
        zserve_cmd("generate", "--broker", frontend, "--model", "m", *args, "hi"),
        name="generate", stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: Proc) -> tuple[int, str]:
    _, err = proc.popen.communicate(timeout=60)
    return proc.popen.returncode, err


def in_flight(stack: Any) -> int:
    return sum(w["in_flight"] for w in stack.status()["workers"])


def test_4_overloaded(stack):
    """The one slot is taken and the broker queues nothing (--max-queue 0)."""
    stack.start_broker("--max-queue", "0", *FAST_HB)
    stack.worker("--model", "m", "--capacity", "1", *SLOW, *FAST_HB)
    stack.wait_workers(1)
    with stack.client(heartbeat_interval=5.0) as c:
        held = c.stream("m", "x", max_tokens=2)
        wait_for(lambda: in_flight(stack) == 1, 10, "the slot taken")
        r = generate(stack.frontend)
        held.close()
    assert r.returncode == 4, r.stderr
    assert "overloaded" in r.stderr


def test_5_worker_lost(stack):
    """The only worker for the model dies with the request on it."""
    stack.start_broker(*FAST_HB)
    w = stack.worker("--model", "m", *SLOW, *FAST_HB)
    stack.wait_workers(1)
    gen = start_generate(stack.frontend)
    try:
        wait_for(lambda: in_flight(stack) == 1, 20, "the request on the worker")
        w.kill()
        code, err = finish(gen)
    finally:
        gen.stop()
    assert code == 5, err
    assert "worker_lost" in err


def test_6_timeout(stack):
    """No token within the client's --timeout."""
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", *SLOW, *FAST_HB)
    stack.wait_workers(1)
    r = generate(stack.frontend, "--timeout", "1")
    assert r.returncode == 6, r.stderr
    assert "timeout" in r.stderr
    wait_for(lambda: in_flight(stack) == 0, 10, "the timed-out request cancelled on the worker")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_7_cancelled(stack, sig):
    """The user interrupts ``zserve generate`` (Ctrl-C, or SIGTERM) while the
    answer streams: it cancels the request on the worker and exits 7."""
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    gen = start_generate(stack.frontend, "--max-tokens", "100000")
    try:
        assert gen.popen.stdout is not None
        assert gen.popen.stdout.read(3) == "t0 "  # streaming
        gen.popen.send_signal(sig)
        code, err = finish(gen)
    finally:
        gen.stop()
    assert code == 7, err
    assert "cancelled" in err
    # 100,000 tokens at 50 ms would hold the slot for over an hour
    wait_for(lambda: in_flight(stack) == 0, 15, "the request cancelled on the worker")


def test_8_broker_unreachable():
    """Nothing listens at --broker."""
    r = generate(f"tcp://127.0.0.1:{free_port()}")
    assert r.returncode == 8, r.stderr
    assert "broker_unreachable" in r.stderr


def test_8_broker_goes_silent_mid_stream(stack):
    """The broker freezes (SIGSTOP) while the answer streams."""
    broker = stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(1)
    gen = start_generate(stack.frontend, "--max-tokens", "100000")
    try:
        assert gen.popen.stdout is not None
        assert gen.popen.stdout.read(3) == "t0 "
        broker.kill(signal.SIGSTOP)
        try:
            code, err = finish(gen)
        finally:
            broker.kill(signal.SIGCONT)
    finally:
        gen.stop()
    assert code == 8, err
    assert "broker_unreachable" in err


def test_9_engine_error(stack):
    """The engine raises (the null engine's fail_after)."""
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--engine-arg", "fail_after=2", *FAST_HB)
    stack.wait_workers(1)
    r = generate(stack.frontend, "--max-tokens", "5")
    assert r.returncode == 9, r.stderr
    assert r.stdout.startswith("t0 t1 ")  # what came before the failure is printed
    assert "engine_error" in r.stderr and "fail_after" in r.stderr
