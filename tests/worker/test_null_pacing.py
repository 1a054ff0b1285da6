"""The null engine paced like a batched model (``pacing=step``, ``stamp``), for bench/scale."""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from zserve.protocol import SamplingParams
from zserve.worker.engine import GenerateRequest
from zserve.worker.engines.null import NullEngine
from zserve.worker.options import EngineOptions


def engine(**args: object) -> NullEngine:
    opts = EngineOptions(models=["m"], token_delay=0.01, engine_args=dict(args))
    return NullEngine.from_options(opts)


async def collect(eng: NullEngine, rid: str, n: int) -> list[tuple[str, list[int]]]:
    req = GenerateRequest(rid, "m", "a b c", None, SamplingParams(max_tokens=n))
    return [(d.text, d.token_ids or []) async for d in eng.generate(req)]


async def test_steps_are_shared_and_stamped() -> None:
    eng = engine(pacing="step", stamp=True)
    t0 = time.monotonic()
    async with asyncio.timeout(10):
        outs = await asyncio.gather(*(collect(eng, f"r{i}", 5) for i in range(20)))
    stamps = [[float(m) for m in re.findall(r"@([0-9.]+) ", "".join(t for t, _ in o))]
              for o in outs]  # fmt: skip
    assert all(len(s) == 5 for s in stamps)
    assert all(s == stamps[0] for s in stamps)  # one step served every request
    assert t0 < stamps[0][0] <= stamps[0][-1] <= time.monotonic()
    assert [ids for _, ids in outs[0]] == [[0], [1], [2], [3], [4]]


async def test_step_pacing_without_stamps_reads_like_the_default() -> None:
    out = await collect(engine(pacing="step"), "r", 3)
    assert out == [("t0 ", [0]), ("t1 ", [1]), ("t2 ", [2])]


def test_pacing_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="pacing"):
        engine(pacing="sometimes")
    with pytest.raises(ValueError, match="token-delay"):
        NullEngine.from_options(EngineOptions(models=["m"], engine_args={"stamp": True}))
