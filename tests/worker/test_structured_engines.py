"""Structured outputs on the hf engine in-process, on the tiny random-weight
model (it never writes JSON on its own): rows of one batch with and without
grammars, resumption through the grammar, bad specs. The same checks run on
the vllm engine in test_vllm_engine.py, on that module's engine."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.worker.reference import greedy_ref, prompt_ids
from zserve.errors import BadRequest
from zserve.protocol import Delta, SamplingParams
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.engines.hf import HFEngine

PROMPT = "Once upon a time there was a small dragon"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}},
    },
    "required": ["name", "age", "tags"],
}
JSON = {"type": "json", "value": SCHEMA}
_ids = itertools.count()


def request(prompt: str = PROMPT, cont: list[int] | None = None, **params: Any) -> GenerateRequest:
    return GenerateRequest(f"s{next(_ids)}", "tiny", prompt, None, SamplingParams(**params),
                           list(cont or []))  # fmt: skip


async def run(engine: Engine, req: GenerateRequest) -> tuple[list[int], str, Delta]:
    async with asyncio.timeout(120):
        deltas = [d async for d in engine.generate(req)]
    ids = [t for d in deltas for t in d.token_ids or []]
    return ids, "".join(d.text for d in deltas), deltas[-1]


def valid(text: str, last: Delta, max_tokens: int, schema: dict[str, Any] | None = None) -> Any:
    assert last.finish_reason == "stop", (text, last)
    assert last.usage is not None and last.usage["completion_tokens"] <= max_tokens
    value = json.loads(text)
    if schema is not None:
        jsonschema.validate(value, schema)
    return value


@pytest.fixture(scope="module")
def hf(tiny_model_dir: Path) -> Iterator[HFEngine]:
    eng = HFEngine([(str(tiny_model_dir), ["tiny"])], engine_args={"threads": 1})
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.close())


async def _rows_with_and_without_grammars(engine: Engine, ref: Any) -> None:
    """A schema, a JSON object and a plain request in one batch: each row
    gets its own grammar or none; the plain one is transformers' greedy."""
    plain = request(max_tokens=40, temperature=0)
    results = await asyncio.gather(
        run(engine, request(max_tokens=128, temperature=0, structured=JSON)),
        run(engine, request(max_tokens=128, temperature=0.8, seed=7,
                            structured={"type": "json_object"})),  # fmt: skip
        run(engine, plain),
    )
    valid(results[0][1], results[0][2], 128, SCHEMA)
    assert isinstance(valid(results[1][1], results[1][2], 128), dict)
    assert results[2][0] == greedy_ref(ref, prompt_ids(ref, PROMPT), 40)


async def _seeds_and_budgets(engine: Engine) -> None:
    for seed in (1, 2, 3):
        ids, text, last = await run(engine, request(max_tokens=128, temperature=1.0, seed=seed,
                                                    structured=JSON))  # fmt: skip
        valid(text, last, 128, SCHEMA)
    for n in (32, 48):  # tight: the budget rule closes the value in time
        ids, text, last = await run(engine, request(max_tokens=n, temperature=0, structured=JSON))
        valid(text, last, n, SCHEMA)


async def _resumed_equals_uninterrupted(engine: Engine) -> list[int]:
    n = 64
    whole, text, last = await run(engine, request(max_tokens=n, temperature=0, structured=JSON))
    valid(text, last, n, SCHEMA)
    for k in (1, len(whole) // 2, len(whole) - 2):
        # as the worker runtime sends it: max_tokens less the delivered ids
        ids, _, _ = await run(engine, request(cont=whole[:k], max_tokens=n - k, temperature=0,
                                              structured=JSON))  # fmt: skip
        assert whole[:k] + ids == whole, k
    return whole


async def _bad_requests(engine: Engine, tok: Any) -> None:
    with pytest.raises(BadRequest, match="structured JSON schema"):
        await run(engine, request(max_tokens=8, structured={"type": "json",
                                                           "value": {"type": "bogus"}}))
    with pytest.raises(BadRequest, match="structured regex"):
        await run(engine, request(max_tokens=8, structured={"type": "regex", "value": "a(b"}))
    with pytest.raises(BadRequest, match="continue_ids"):
        cont = tok.encode("hello", add_special_tokens=False)
        await run(engine, request(cont=cont, max_tokens=8, structured={"type": "json_object"}))


# ------------------------------------------------------------------ hf


async def test_hf_rows_with_and_without_grammars(hf: HFEngine, ref: Any) -> None:
    await _rows_with_and_without_grammars(hf, ref)


async def test_hf_seeds_and_budgets(hf: HFEngine) -> None:
    await _seeds_and_budgets(hf)


async def test_hf_resumed_equals_uninterrupted(hf: HFEngine) -> None:
    await _resumed_equals_uninterrupted(hf)


async def test_hf_bad_requests(hf: HFEngine, ref: Any) -> None:
    await _bad_requests(hf, ref[1])


async def test_hf_ignore_eos_still_ends_with_the_grammar(hf: HFEngine) -> None:
    ids, text, last = await run(hf, request(max_tokens=64, temperature=0, ignore_eos=True,
                                            structured={"type": "choice", "value": ["yes", "no"]}))
    assert text in ("yes", "no") and last.finish_reason == "stop"
