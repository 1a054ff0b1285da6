"""Defaults that serve well: ``zserve run --model M [--engine hf|vllm]`` serves
any model in one command, and a worker's capacity comes from its engine."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import pytest

from tests.conftest import Stack, start_run
from zserve.launcher import Proc, wait_for

CHAT = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "ignore_eos": True}


def workers(frontend: str) -> list[dict]:
    from zserve.client import Client

    with Client(frontend, timeout=10) as c:
        return c.status()["workers"]


def check_serves(proc: Proc, frontend: str, gw: int, lines: list[str], name: str) -> dict:
    """The page's address comes first, the gateway answers a chat on ``name``,
    and Ctrl-C stops it all; returns the worker's status entry."""
    try:
        # The page's address comes before the rest of what `zserve run` prints
        # once it is up (an engine's own logs may come earlier).
        page = next(i for i, ln in enumerate(lines) if ln.startswith("Chat page:"))
        assert lines[page].split()[-1] == f"http://127.0.0.1:{gw}/"
        assert page < lines.index("zserve is up.\n")
        assert f"zserve chat --broker {frontend} --model {name}" in "".join(lines)
        root = f"http://127.0.0.1:{gw}"
        assert httpx.get(root + "/", timeout=10).status_code == 200
        assert httpx.get(root + "/ready", timeout=10).status_code == 200
        r = httpx.post(root + "/v1/chat/completions", json={"model": name, **CHAT}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
        (w,) = workers(frontend)
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(60) == 0
        return w
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from zserve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.mark.slow
def test_run_model_on_hf_uses_its_name_and_the_engines_capacity(tiny: Path) -> None:
    proc, fe, gw, lines = start_run("--model", str(tiny), deadline_s=240)
    w = check_serves(proc, fe, gw, lines, "tiny-llama")  # served under the basename
    assert w["engine"] == "hf" and w["models"] == ["tiny-llama"]
    assert w["capacity"] == 256  # the hf engine's max_batch_size


@pytest.mark.slow
@pytest.mark.vllm
@pytest.mark.timeout(900)
def test_run_engine_vllm_serves_the_tiny_model(tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    proc, fe, gw, lines = start_run(
        "--engine", "vllm", "--model-dir", str(tmp_path / "tiny"),
        # engine options pass through to the worker
        "--max-model-len", "512", "--engine-arg", "enforce_eager=true",
        "--engine-arg", f"kv_cache_memory_bytes={64 << 20}",
        deadline_s=800,
    )  # fmt: skip
    assert any(ln.startswith("writing the tiny model") for ln in lines)
    w = check_serves(proc, fe, gw, lines, "tiny")
    assert w["engine"] == "vllm" and w["models"] == ["tiny"]
    assert w["capacity"] == 128  # vLLM's max_num_seqs for a server on CPU


def test_worker_capacity_defaults_to_the_engines_and_is_logged(
    stack: Stack, tmp_path: Path
) -> None:
    stack.start_broker()
    log = tmp_path / "worker.log"
    with open(log, "w") as f:
        stack.worker("--model", "big", log_level="info", stderr=f)
        stack.worker("--model", "small", "--capacity", "3")
        stack.wait_workers(2)
    caps = {w["models"][0]: w["capacity"] for w in stack.status()["workers"]}
    assert caps == {"big": 1024, "small": 3}
    wait_for(lambda: "capacity 1024 (the null engine's default)" in log.read_text(), 10, "log")
