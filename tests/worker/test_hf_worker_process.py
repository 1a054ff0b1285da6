"""`zserve worker --engine hf` as a real process behind a real broker, through the client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.worker.reference import greedy_ref, prompt_ids
from zserve.errors import BadRequest, ContextOverflow
from zserve.launcher import wait_for

PROMPT = "Once upon a time there was a small dragon"


def greedy(ref: tuple[Any, Any], prompt: str, n: int) -> list[int]:
    return greedy_ref(ref, prompt_ids(ref, prompt), n, ignore_eos=True)


def test_hf_worker_streams_cancels_and_embeds(
    stack: Any, tiny_model_dir: Path, minilm_dir: Path, ref: Any
) -> None:
    stack.start_broker("--heartbeat-interval", "0.2")
    stack.worker(
        "--model", str(tiny_model_dir), "--model-names", "tiny",
        "--model", str(minilm_dir), "--model-names", "minilm",
        "--dtype", "float32", "--capacity", "1", "--heartbeat-interval", "0.2",
        engine="hf",
    )  # fmt: skip
    (info,) = stack.wait_workers(1, timeout=120)
    assert sorted(info["models"]) == ["minilm", "tiny"]
    with stack.client(timeout=60) as c:
        # Greedy through broker and worker equals transformers' own generate().
        deltas = list(c.stream("tiny", PROMPT, max_tokens=16, temperature=0, ignore_eos=True))
        ids = [t for d in deltas for t in d.token_ids or []]
        assert ids == greedy(ref, PROMPT, 16)
        assert deltas[-1].finish_reason == "length"
        assert all(d.finish_reason is None for d in deltas[:-1])

        # Capacity 1: a stream closed after its first delta frees the only slot.
        s = c.stream("tiny", PROMPT, max_tokens=100_000, ignore_eos=True, temperature=0)
        first = next(iter(s))
        assert first.token_ids
        wait_for(lambda: stack.status()["workers"][0]["in_flight"] == 1, 10, "one in flight")
        s.close()
        wait_for(lambda: stack.status()["workers"][0]["in_flight"] == 0, 10, "the slot freed")
        again = c.generate("tiny", PROMPT, max_tokens=4, temperature=0)
        assert again.token_ids == greedy(ref, PROMPT, 4)

        # Embeddings from the encoder model: unit vectors, similar texts closer.
        a, b, z = c.embed("minilm", ["A man is eating food.", "A man eats a meal.", "Stocks fell."])
        assert len(a) == 384
        assert abs(sum(x * x for x in a) - 1.0) < 1e-4
        dot = lambda u, v: sum(x * y for x, y in zip(u, v, strict=True))  # noqa: E731
        assert dot(a, b) > dot(a, z)

        # Clear errors, and the worker keeps serving after them.
        with pytest.raises(ContextOverflow):
            c.generate("tiny", "word " * 5000, max_tokens=2)
        with pytest.raises(BadRequest):
            c.generate("tiny", PROMPT, max_tokens=2, temperature=-1)
        with pytest.raises(BadRequest):
            c.generate("minilm", PROMPT, max_tokens=2)
        assert c.generate("tiny", PROMPT, max_tokens=2, temperature=0).usage[
            "completion_tokens"
        ] == 2


def test_missing_model_path_fails_the_worker_clearly(stack: Any, tmp_path: Path) -> None:
    stack.start_broker()
    import subprocess

    worker = stack.worker(
        "--model", str(tmp_path / "nowhere"), engine="hf",
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for(lambda: not worker.alive(), 60, "the worker to exit")
    assert worker.popen.returncode != 0
    err = worker.popen.stderr.read()
    assert "nowhere" in err
    assert "Traceback" not in err
    assert stack.status()["workers"] == []
