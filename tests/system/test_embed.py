"""Embeddings through the clients: vectors, and the usage the worker reports."""

from __future__ import annotations

import asyncio
import math

import pytest

from zserve import AsyncClient, BadRequest
from zserve.client import Embeddings
from zserve.worker.engines.null import EMBED_DIM, embed_text

TEXTS = ["the cat sat", "a dog", "the cat sat"]
PROMPT_TOKENS = 3 + 2 + 3  # the null engine counts words


def _check_vectors(vecs: list[list[float]]) -> None:
    assert len(vecs) == len(TEXTS)
    assert all(len(v) == EMBED_DIM for v in vecs)
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-9) for v in vecs)
    assert vecs[0] == vecs[2] != vecs[1]
    assert vecs[1] == embed_text("a dog")


def test_sync_embed_and_usage(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)
    with stack.client() as c:
        vecs = c.embed("m", TEXTS)
        assert isinstance(vecs, list)
        _check_vectors(vecs)
        r = c.embed_with_usage("m", TEXTS)
        assert isinstance(r, Embeddings)
        assert r.embeddings == vecs
        assert r.usage == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 0}
        with pytest.raises(BadRequest):
            c.embed_with_usage("m", [])


def test_async_embed_and_usage(stack):
    stack.start_broker()
    stack.worker("--model", "m")
    stack.wait_workers(1)

    async def run() -> tuple[list[list[float]], Embeddings]:
        async with AsyncClient(stack.frontend, timeout=30) as ac:
            return await ac.embed("m", TEXTS), await ac.embed_with_usage("m", "a dog")

    vecs, r = asyncio.run(run())
    _check_vectors(vecs)
    assert r.embeddings == [vecs[1]]
    assert r.usage["prompt_tokens"] == 2
