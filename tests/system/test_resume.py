"""Exact resumption: a stream whose worker dies mid-stream continues on
another worker from the prompt plus the ids delivered, and the caller sees
one unbroken stream, equal id for id to an uninterrupted run (greedy).

Real broker and worker processes; the serving worker is SIGKILLed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_HB
from zserve.launcher import wait_for

PROMPT = "Once upon a time there was a small dragon"


def serving_pid(stack: Any, model: str) -> int:
    """The pid of the one worker that runs a request for ``model``."""
    busy = wait_for(
        lambda: [w for w in stack.status()["workers"] if w["in_flight"] and model in w["models"]],
        20,
        "a worker running the request",
    )
    assert len(busy) == 1
    return int(busy[0]["pid"])


def kill_pid(stack: Any, pid: int) -> None:
    for proc in stack.procs:
        if proc.pid == pid:
            proc.kill(signal.SIGKILL)
            return
    os.kill(pid, signal.SIGKILL)  # a child of a worker process


def read(stream: Any, n: int | None = None) -> tuple[list[Any], list[int], str]:
    deltas = []
    for d in stream:
        deltas.append(d)
        if n is not None and sum(len(x.token_ids or []) for x in deltas) >= n:
            break
    ids = [t for d in deltas for t in d.token_ids or []]
    return deltas, ids, "".join(d.text for d in deltas)


def test_a_null_stream_reads_as_if_nothing_happened(stack):
    stack.start_broker(*FAST_HB)
    for _ in range(2):
        stack.worker("--model", "m", "--capacity", "4", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(2)
    with stack.client() as c:
        s = c.stream("m", "x", max_tokens=60)
        head, head_ids, head_text = read(s, 20)
        kill_pid(stack, serving_pid(stack, "m"))
        tail, tail_ids, tail_text = read(s)
        assert head_ids + tail_ids == list(range(60))
        assert head_text + tail_text == "".join(f"t{i} " for i in range(60))
        assert tail[-1].finish_reason == "length"
        assert tail[-1].usage["completion_tokens"] == 60  # each token counted once
        assert c.resumes == 1


def test_a_stop_string_held_back_at_the_kill_is_kept(stack):
    """The dying worker held back text that might start a stop string; the
    caller had its ids but not its text. The continuation restores it."""
    stack.start_broker(*FAST_HB)
    for _ in range(2):
        stack.worker("--model", "m", "--capacity", "4", "--token-delay", "0.3", *FAST_HB)
    stack.wait_workers(2)
    stop = "t22 t23 t24 t25 never"  # held from t22 until t26 shows it is no stop
    with stack.client() as c:
        s = c.stream("m", "x", max_tokens=30, stop=stop)
        head, head_ids, head_text = read(s, 24)  # ids of t22, t23 in, their text held
        assert head_ids[-1] >= 23 and "t22" not in head_text
        kill_pid(stack, serving_pid(stack, "m"))
        tail, tail_ids, tail_text = read(s)
        assert head_ids + tail_ids == list(range(30))
        assert head_text + tail_text == "".join(f"t{i} " for i in range(30))
        assert c.resumes == 1


def _greedy_stack(
    stack: Any, engine: str, model_dir: Path, *extra: str, hb: list[str] = FAST_HB
) -> None:
    # round_robin: the test knows which worker a request goes to without
    # asking while it runs (the engines finish 64 tokens in a fraction of a
    # second, sooner than a status query on a loaded machine)
    stack.start_broker("--dispatch", "round_robin", *hb)
    for _ in range(2):
        stack.worker(
            "--model", str(model_dir), "--model-names", "tiny", "--dtype", "float32",
            "--capacity", "4", *extra, *hb, engine=engine,
        )  # fmt: skip
    stack.wait_workers(2, timeout=300)


def _resumed_equals_uninterrupted(stack: Any, n: int = 64) -> None:
    kw = {"max_tokens": n, "temperature": 0, "ignore_eos": True}
    with stack.client(timeout=120) as c:
        whole = c.generate("tiny", PROMPT, **kw)  # uninterrupted, through the stack
        want = whole.token_ids
        assert want is not None and len(want) == n
        # round robin: the next request goes to the worker that has had none
        (pid,) = [w["pid"] for w in stack.status()["workers"] if w["dispatched"] == 0]
        s = c.stream("tiny", PROMPT, **kw)
        # killed on the first tokens: 64 tokens take the engines a few dozen
        # ms, and a loaded machine can hold the reader back as long
        head, head_ids, head_text = read(s, 1)
        kill_pid(stack, pid)
        tail, tail_ids, tail_text = read(s)
        assert c.resumes == 1, f"the worker finished before it was killed ({len(head_ids)} read)"
        assert head_ids + tail_ids == want
        assert head_text + tail_text == whole.text
        assert tail[-1].usage["completion_tokens"] == n


@pytest.fixture(scope="module")
def medium_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model streams 64 tokens in ~0.1 s (hf and vLLM alike), faster
    than a test can find the serving worker and kill it mid-stream on a
    loaded machine; the medium random model (7.5 M parameters) is slower."""
    from zserve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("medium-model"), size="medium")


def test_two_hf_workers_greedy(stack, medium_model_dir):
    _greedy_stack(stack, "hf", medium_model_dir, "--engine-arg", "threads=1")
    _resumed_equals_uninterrupted(stack)


def test_two_vllm_workers_greedy(stack, medium_model_dir):
    _greedy_stack(
        stack, "vllm", medium_model_dir,
        "--engine-arg", "kv_cache_memory_bytes=67108864", "--engine-arg", "enforce_eager=true",
    )  # fmt: skip
    _resumed_equals_uninterrupted(stack)
