"""The worker runtime between an engine and a real broker: what it passes on.

A scripted engine runs inside the real ``Worker`` runtime (in a thread of the
test process, with its own event loop), connected over loopback TCP to a real
broker process; a real ``Client`` reads the result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator

import pytest

from zserve import protocol as p
from zserve.protocol import Delta
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.runtime import Worker, WorkerConfig

LP = [{"token": "\\xe2", "logprob": -0.5, "top_logprobs": []}]


class ScriptedEngine(Engine):
    """Yields the deltas the prompt names; ``max_tokens`` picks nothing."""

    name = "scripted"

    def __init__(self) -> None:
        super().__init__()
        self.models = ["s"]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        script = request.prompt
        if script == "logprobs-only":
            # A multi-byte character split over two tokens: the first token's
            # logprob comes before any text exists.
            yield Delta("a", [1], usage={"prompt_tokens": 7})
            yield Delta("", None, logprobs=list(LP))
            yield Delta("\u00e9", [2, 3], logprobs=list(LP))
            yield Delta("", [], p.FINISH_STOP, usage={"prompt_tokens": 7, "completion_tokens": 42})
        elif script == "engine-count-then-more":
            # The engine reports its count mid-stream; two more tokens follow.
            yield Delta("x", [1], usage={"prompt_tokens": 1, "completion_tokens": 10})
            yield Delta("y", [2])
            yield Delta("z", [3], p.FINISH_STOP)
        else:  # no count from the engine: the runtime counts token ids
            yield Delta("u", [1])
            yield Delta("v", [2, 3])
            yield Delta("", [4], p.FINISH_STOP, usage={"prompt_tokens": 2})


@pytest.fixture
def scripted(stack) -> Iterator[object]:
    stack.start_broker()
    worker = Worker(ScriptedEngine(), WorkerConfig(broker=stack.backend))
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    t.start()
    try:
        stack.wait_workers(1)
        yield stack
    finally:
        loop.call_soon_threadsafe(worker.stop)
        t.join(10)
        loop.close()
        assert not t.is_alive()


def test_logprobs_only_delta_reaches_the_client_and_engine_count_is_kept(scripted):
    with scripted.client() as c:
        deltas = list(c.stream("s", "logprobs-only"))
        r = c.generate("s", "logprobs-only")
    # every logprob entry arrives, including the one with no text
    assert [e for d in deltas for e in d.logprobs or []] == LP * 2
    assert r.logprobs == LP * 2
    assert r.text == "a\u00e9" and r.token_ids == [1, 2, 3]
    # the engine said 42: the runtime does not recount (it would say 3)
    assert r.usage == {"prompt_tokens": 7, "completion_tokens": 42}


def test_engine_count_reported_mid_stream_is_carried_forward(scripted):
    with scripted.client() as c:
        r = c.generate("s", "engine-count-then-more")
    assert r.text == "xyz"
    assert r.usage == {"prompt_tokens": 1, "completion_tokens": 12}


def test_runtime_counts_when_the_engine_does_not(scripted):
    with scripted.client() as c:
        r = c.generate("s", "count")
    assert r.usage == {"prompt_tokens": 2, "completion_tokens": 4}
