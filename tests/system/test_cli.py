"""The CLI as users and other tools call it: exact names, output, exit codes."""

from __future__ import annotations

import json
import subprocess

from zserve.launcher import free_port, zserve_cmd


def _run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(zserve_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_status_json_shape(stack):
    stack.start_broker()
    stack.worker("--model", "m", "--model-names", "a,b", "--capacity", "2", "--speed", "1.5")
    stack.wait_workers(1)
    r = _run("status", "--broker", stack.frontend, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["models"] == ["a", "b"]
    (w,) = out["workers"]
    assert set(w) == {
        "id", "models", "capacity", "in_flight", "queue_length", "speed", "last_seen_s",
        "draining",
    }
    assert w["draining"] is False
    assert w["capacity"] == 2 and w["speed"] == 1.5 and sorted(w["models"]) == ["a", "b"]


def test_status_table(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    r = _run("status", "--broker", stack.frontend)
    assert r.returncode == 0 and "null" in r.stdout and "models: m" in r.stdout


def test_generate_streams_to_stdout(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    r = _run("generate", "--broker", stack.frontend, "--model", "m", "--max-tokens", "4", "hi")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "t0 t1 t2 t3"


def test_generate_errors_exit_non_zero_with_the_error(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    r = _run("generate", "--broker", stack.frontend, "--model", "zz", "hi")
    assert r.returncode == 3
    assert "model_not_found" in r.stderr and "zz" in r.stderr
    r = _run("generate", "--broker", stack.frontend, "--model", "m", "--top-p", "9", "hi")
    assert r.returncode == 2 and "bad_request" in r.stderr


def test_generate_without_broker_fails_fast():
    r = _run("status", "--broker", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert r.returncode == 8 and "broker_unreachable" in r.stderr


def test_worker_rejects_unknown_engine_and_bad_capacity():
    r = _run("worker", "--engine", "nope", "--model", "x")
    assert r.returncode == 2 and "unknown engine" in r.stderr
    r = _run("worker", "--engine", "null", "--capacity", "0")
    assert r.returncode == 2 and "capacity" in r.stderr
