"""The worker runtime between an engine and a real broker: what it passes on,
and the jobs it does for every engine (``max_tokens``, stop strings, engine
failures, cancel).

A test engine runs inside the real ``Worker`` runtime (in a thread of the
test process, with its own event loop), connected over loopback TCP to a real
broker process; a real ``Client`` reads the result. The test engines do none
of those jobs themselves, so what the client sees is the runtime's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from zserve import protocol as p
from zserve.errors import EngineError
from zserve.launcher import wait_for
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


@contextlib.contextmanager
def running(stack: Any, engine: Engine, capacity: int = 1) -> Iterator[Worker]:
    """``engine`` under the real runtime, on its own loop and thread, registered
    with the stack's broker; stopped (and the thread joined) on exit."""
    worker = Worker(engine, WorkerConfig(broker=stack.backend, capacity=capacity))
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    t.start()
    try:
        stack.wait_workers(1)
        yield worker
    finally:
        loop.call_soon_threadsafe(worker.stop)
        t.join(10)
        assert not t.is_alive()
        loop.close()


@pytest.fixture
def scripted(stack) -> Iterator[object]:
    stack.start_broker()
    with running(stack, ScriptedEngine()):
        yield stack


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


# ------------------------------------------- the runtime's own jobs, for any engine


class ProbeEngine(Engine):
    """An engine that does none of the runtime's jobs and records what the
    runtime does to it. The prompt is ``SCRIPT:tag`` (the tag makes it unique,
    so a test can find its request's engine id).

    * ``endless``: a token every ``delay`` seconds, forever, no finish reason;
    * ``split``: ``Hello, wo`` then ``rld! and on`` then more, never a finish
      reason of its own (a stop string ``world`` spans the first two deltas);
    * ``almost``: ``the wo`` then ``rm turns`` and a finish: a held-back
      partial match of ``world`` that turns out not to be one;
    * ``boom``: one token, then an exception that is no ``ZServeError``.
    """

    name = "probe"

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.models = ["p"]
        self.delay = delay
        self.eids: dict[str, str] = {}  # prompt -> engine request id
        self.produced: dict[str, int] = {}  # engine id -> deltas yielded
        self.ended: dict[str, str] = {}  # engine id -> how its generator ended
        self.aborted: list[str] = []  # engine ids the runtime aborted

    def eid(self, prompt: str) -> str | None:
        return self.eids.get(prompt)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        eid = request.request_id
        prompt = request.prompt or ""
        self.eids[prompt] = eid
        self.produced[eid] = 0
        script = prompt.partition(":")[0]
        try:
            if script == "endless":
                i = 0
                while True:
                    await asyncio.sleep(self.delay)
                    self.produced[eid] += 1
                    yield Delta(f"w{i} ", [i])
                    i += 1
            elif script == "split":
                for i, text in enumerate(["Hello, wo", "rld! and on", " and on"]):
                    self.produced[eid] += 1
                    yield Delta(text, [i])
                while True:  # it would go on: only the runtime's stop ends it
                    await asyncio.sleep(self.delay)
                    self.produced[eid] += 1
                    yield Delta(" on", [9])
            elif script == "almost":
                self.produced[eid] += 2
                yield Delta("the wo", [1])
                yield Delta("rm turns", [2], p.FINISH_STOP)
            elif script == "boom":
                self.produced[eid] += 1
                yield Delta("ok ", [1])
                raise RuntimeError("the probe engine broke")
        except BaseException as e:
            self.ended[eid] = type(e).__name__
            raise
        self.ended[eid] = "returned"

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


@pytest.fixture
def probe(stack) -> Iterator[tuple[Any, ProbeEngine]]:
    stack.start_broker()
    engine = ProbeEngine(delay=0.01)
    with running(stack, engine, capacity=4):
        yield stack, engine


def _stopped_by_the_runtime(engine: ProbeEngine, prompt: str) -> str:
    """Wait until the engine's generator for ``prompt`` was closed from outside
    and the runtime called ``abort`` for it; return its engine id."""
    eid = wait_for(lambda: engine.eid(prompt), 10, f"the engine to see {prompt!r}")
    wait_for(lambda: eid in engine.ended and eid in engine.aborted, 10, f"{prompt!r} stopped")
    # Closed at a yield (GeneratorExit) or cancelled at an await: either way
    # the generator ended on the runtime's say, not by running out.
    assert engine.ended[eid] in ("GeneratorExit", "CancelledError"), engine.ended[eid]
    return eid


def test_max_tokens_caps_an_engine_that_never_stops(probe):
    stack, engine = probe
    with stack.client() as c:
        deltas = list(c.stream("p", "endless:cap", max_tokens=5))
    assert "".join(d.text for d in deltas) == "w0 w1 w2 w3 w4 "
    assert [t for d in deltas for t in d.token_ids or []] == [0, 1, 2, 3, 4]
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == {"prompt_tokens": 0, "completion_tokens": 5}
    eid = _stopped_by_the_runtime(engine, "endless:cap")
    assert engine.produced[eid] == 5  # not one token pulled past the cap


def test_stop_string_split_across_two_deltas(probe):
    stack, engine = probe
    with stack.client() as c:
        deltas = list(c.stream("p", "split:a", stop=["world"], max_tokens=1000))
    # "wo" could start the stop string: it is held back, never sent
    assert [d.text for d in deltas if d.text] == ["Hello, "]
    assert deltas[-1].finish_reason == "stop"
    eid = _stopped_by_the_runtime(engine, "split:a")
    assert engine.produced[eid] == 2  # stopped at the delta that completed it

    with stack.client() as c:  # a held-back partial match that is not one is sent
        r = c.generate("p", "almost:a", stop=["world"])
    assert r.text == "the worm turns" and r.finish_reason == "stop"
    assert r.token_ids == [1, 2]


def test_engine_exception_becomes_engine_error_and_the_worker_goes_on(probe):
    stack, engine = probe
    with stack.client() as c:
        s = c.stream("p", "boom:a")
        assert next(s).text == "ok "  # what came before the failure arrives
        with pytest.raises(EngineError, match="RuntimeError: the probe engine broke"):
            next(s)
        eid = engine.eid("boom:a")
        assert engine.ended[eid] == "RuntimeError"
        assert c.generate("p", "almost:b").text == "the worm turns"  # still serving
    wait_for(lambda: stack.status()["workers"][0]["in_flight"] == 0, 10, "the slot freed")


def test_cancel_stops_the_engine_not_only_the_broker_count(probe):
    stack, engine = probe
    with stack.client() as c:
        s = c.stream("p", "endless:cancel")
        assert [next(s).text for _ in range(3)] == ["w0 ", "w1 ", "w2 "]
        s.close()  # CANCEL to the broker, which forwards it to the worker
        eid = _stopped_by_the_runtime(engine, "endless:cancel")
        produced = engine.produced[eid]
        # The generator is closed: it cannot produce again. The broker's count
        # and the worker's queue length (from its heartbeats) are free too.
        wait_for(
            lambda: (w := c.status()["workers"][0])["in_flight"] == 0 and w["queue_length"] == 0,
            10,
            "the worker idle",
        )
        assert engine.produced[eid] == produced
    # closing a client with a stream open cancels it the same way
    with stack.client() as c2:
        s2 = c2.stream("p", "endless:vanish")
        next(s2)
    _stopped_by_the_runtime(engine, "endless:vanish")
