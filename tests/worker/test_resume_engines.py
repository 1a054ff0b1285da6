"""Exact resumption in each engine, in-process on the tiny model.

A stream whose worker died after k tokens continues elsewhere with
``continue_ids`` = those k ids and ``max_tokens`` = what remains: the ids and
the text the caller ends up with must be those of an uninterrupted run, and
usage must count every token once. Greedy decoding makes that testable.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch
import vllm  # noqa: F401 - a missing or broken vLLM fails here, it is not skipped

from tests.worker.conftest import VLLM_CONTEXT
from zserve.errors import ContextOverflow
from zserve.protocol import Delta, SamplingParams
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.engines.hf import HFEngine
from zserve.worker.engines.hf_api import HFApiEngine
from zserve.worker.engines.hf_sampling import SamplerState
from zserve.worker.engines.null import NullEngine
from zserve.worker.engines.vllm import VLLMEngine

# Every async test shares the module's event loop, where the engines live.
on_engine_loop = pytest.mark.asyncio(loop_scope="module")

N = 64  # tokens in the uninterrupted run
K = 20  # about where the first attempt's worker dies
PROMPT = "The morning train left the station at seven"
# Prompts whose greedy 64 tokens on the tiny model hold multi-byte characters
# split across tokens (found by a search over word salads from its corpus).
MULTIBYTE_PROMPTS = [
    "it a Hello! hid in fly milk",
    "join. €, months once down",
    "a hurried, travel once only in hand",
]
_ids = itertools.count()


@dataclass
class Run:
    """What a caller received: ids, text, the deltas' usage."""

    ids: list[int]
    text: str
    deltas: list[Delta]

    @property
    def usage(self) -> dict[str, int]:
        u = self.deltas[-1].usage
        assert u is not None
        return u


def request(prompt: str, cont: list[int] | None = None, **params: Any) -> GenerateRequest:
    return GenerateRequest(
        f"r{next(_ids)}", "tiny", prompt, None, SamplingParams(**params), list(cont or [])
    )


async def run(engine: Engine, req: GenerateRequest) -> Run:
    deltas: list[Delta] = []
    async with asyncio.timeout(120):
        async for d in engine.generate(req):
            deltas.append(d)
    assert deltas[-1].finish_reason is not None
    assert all(d.finish_reason is None for d in deltas[:-1])
    ids = [t for d in deltas for t in d.token_ids or []]
    return Run(ids, "".join(d.text for d in deltas), deltas)


async def until_dead(engine: Engine, req: GenerateRequest, k: int) -> Run:
    """The first attempt: the deltas a caller got before its worker died, once
    at least ``k`` tokens were out (no final delta, so nothing was flushed)."""
    deltas: list[Delta] = []
    gen: Any = engine.generate(req)
    try:
        async with asyncio.timeout(120):
            async for d in gen:
                assert d.finish_reason is None, "the run ended before the worker died"
                deltas.append(d)
                if sum(len(x.token_ids or []) for x in deltas) >= k:
                    break
    finally:
        await gen.aclose()  # what the runtime does when it stops reading: abort
    ids = [t for d in deltas for t in d.token_ids or []]
    return Run(ids, "".join(d.text for d in deltas), deltas)


def counts(usage: dict[str, int] | None) -> dict[str, int]:
    """Usage without ``cached_tokens`` (vLLM's prefix cache hits, which vary)."""
    return {k: v for k, v in (usage or {}).items() if k != "cached_tokens"}


async def check_resume(engine: Engine, prompt: str, **params: Any) -> Run:
    """Uninterrupted vs died-after-about-K plus a continuation: same ids, same
    text, usage that adds up. Returns the uninterrupted run."""
    full = await run(engine, request(prompt, max_tokens=N, **params))
    assert len(full.ids) == N, "use ignore_eos: the run must not end early"
    first = await until_dead(engine, request(prompt, max_tokens=N, **params), K)
    k = len(first.ids)
    assert K <= k < N
    assert first.ids == full.ids[:k]
    assert full.text.startswith(first.text)
    rest = await run(engine, request(prompt, first.ids, max_tokens=N - k, **params))
    assert first.ids + rest.ids == full.ids
    assert first.text + rest.text == full.text
    n_prompt = full.usage["prompt_tokens"]
    assert first.deltas[0].usage == {"prompt_tokens": n_prompt}
    # (vLLM adds cached_tokens: its prefix cache holds what the first run prefilled)
    assert counts(rest.usage) == {"prompt_tokens": n_prompt, "completion_tokens": N - k}
    assert counts(full.usage) == {"prompt_tokens": n_prompt, "completion_tokens": N}
    assert rest.deltas[-1].finish_reason == full.deltas[-1].finish_reason == "length"
    return full


def delivered(tokenizer: Any, ids: list[int]) -> str:
    """The text a stream has delivered after ``ids``: whole characters only,
    a trailing partial character held back (byte-level BPE decodes by
    concatenation, so this needs no engine)."""
    return str(tokenizer.decode(ids, skip_special_tokens=True)).rstrip("\ufffd")


def split_points(tokenizer: Any, ids: list[int]) -> list[int]:
    """Every k where ``ids[:k]`` ends inside a real multi-byte character: its
    first bytes were delivered as ids, its text not yet."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    out = []
    for k in range(1, len(ids)):
        head = tokenizer.decode(ids[:k], skip_special_tokens=True)
        if head.endswith("\ufffd"):
            at = len(head.rstrip("\ufffd"))
            if at < len(text) and ord(text[at]) > 127 and text[at] != "\ufffd":
                out.append(k)
    return out


async def check_split_characters(engine: Engine, tokenizer: Any) -> None:
    """Continuations whose continued ids end inside a character: the first
    new text is that whole character, and the whole text is unbroken."""
    tested = 0
    for prompt in MULTIBYTE_PROMPTS:
        full = await run(engine, request(prompt, max_tokens=N, temperature=0, ignore_eos=True))
        for k in split_points(tokenizer, full.ids)[:2]:
            cont = full.ids[:k]
            got = delivered(tokenizer, cont)
            assert full.text.startswith(got)
            rest = await run(
                engine,
                request(prompt, cont, max_tokens=N - k, temperature=0, ignore_eos=True),
            )
            assert cont + rest.ids == full.ids, (prompt, k)
            assert got + rest.text == full.text, (prompt, k)
            first_text = next(d.text for d in rest.deltas if d.text)
            assert first_text[0] == full.text[len(got)] != "\ufffd"  # the held character
            assert ord(first_text[0]) > 127
            assert rest.usage["completion_tokens"] == N - k
            tested += 1
    assert tested, "no greedy output of the tiny model splits a character"


# ------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hf(tiny_model_dir: Path) -> AsyncIterator[HFEngine]:
    eng = HFEngine([(str(tiny_model_dir), ["tiny"])], dtype="float32")
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


def test_which_engines_resume() -> None:
    assert NullEngine.resumable and HFEngine.resumable and VLLMEngine.resumable
    assert not HFApiEngine.resumable  # text only: it has no ids to continue from


# ------------------------------------------------------------------ null


@on_engine_loop
async def test_null_resumed_stream_reads_like_an_uninterrupted_one() -> None:
    eng = NullEngine(["tiny"])
    full = await check_resume(eng, "a b c")
    assert full.text == "".join(f"t{i} " for i in range(N))


@on_engine_loop
async def test_null_default_length_counts_the_continued_tokens() -> None:
    eng = NullEngine(["tiny"])
    rest = await run(eng, request("a b", list(range(5))))  # max_tokens None: 16 in all
    assert rest.ids == list(range(5, 16))
    assert rest.text == "".join(f"t{i} " for i in range(5, 16))
    assert rest.usage == {"prompt_tokens": 2, "completion_tokens": 11}
    one = await run(eng, request("a b", list(range(15))))
    assert (one.ids, one.text, one.usage["completion_tokens"]) == ([15], "t15 ", 1)
    done = await run(eng, request("a b", list(range(16))))
    assert (done.ids, done.text, done.deltas[-1].finish_reason) == ([], "", "length")
    assert done.usage["completion_tokens"] == 0


# ------------------------------------------------------------------ hf


@on_engine_loop
async def test_hf_greedy_resume_is_exact(hf: HFEngine) -> None:
    await check_resume(hf, PROMPT, temperature=0, ignore_eos=True)


@on_engine_loop
async def test_hf_resume_is_exact_with_repetition_penalty(hf: HFEngine) -> None:
    plain = await run(hf, request(PROMPT, max_tokens=N, temperature=0, ignore_eos=True))
    full = await check_resume(hf, PROMPT, temperature=0, ignore_eos=True, repetition_penalty=1.5)
    assert full.ids != plain.ids  # the penalty is at work


@on_engine_loop
async def test_hf_resume_is_exact_with_presence_and_frequency_penalties(hf: HFEngine) -> None:
    plain = await run(hf, request(PROMPT, max_tokens=N, temperature=0, ignore_eos=True))
    for penalties in ({"presence_penalty": 1.5}, {"frequency_penalty": 0.7}):
        full = await check_resume(hf, PROMPT, temperature=0, ignore_eos=True, **penalties)
        assert full.ids != plain.ids, penalties  # the penalty is at work


def test_hf_sampler_counts_continued_ids_as_output() -> None:
    params = SamplingParams(repetition_penalty=1.2, presence_penalty=1.0, frequency_penalty=0.5)
    st = SamplerState.create(params, [1, 2], 10, torch.device("cpu"), output_ids=[3, 3, 4])
    assert st.seen is not None and st.counts is not None
    assert st.seen.nonzero().flatten().tolist() == [1, 2, 3, 4]
    assert st.counts.tolist() == [0, 0, 0, 2, 1, 0, 0, 0, 0, 0]


@on_engine_loop
async def test_hf_resume_inside_a_multibyte_character(hf: HFEngine) -> None:
    tok = hf._served["tiny"].tokenizer
    await check_split_characters(hf, tok)


@on_engine_loop
async def test_hf_long_continuation(hf: HFEngine) -> None:
    """Past a few hundred ids the detokenizer replay runs in a thread: same result."""
    tok = hf._served["tiny"].tokenizer
    k, n = 300, 310
    full = await run(hf, request(PROMPT, max_tokens=n, temperature=0, ignore_eos=True))
    cont = full.ids[:k]
    rest = await run(hf, request(PROMPT, cont, max_tokens=n - k, temperature=0, ignore_eos=True))
    assert cont + rest.ids == full.ids
    assert delivered(tok, cont) + rest.text == full.text


@on_engine_loop
async def test_hf_continuation_limits(hf: HFEngine) -> None:
    full = await run(hf, request(PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
    n_prompt = full.usage["prompt_tokens"]
    # A continued stop token: the uninterrupted run ended there.
    ended = await run(hf, request(PROMPT, full.ids, temperature=0, stop_token_ids=[full.ids[-1]]))
    assert (ended.ids, ended.text, ended.deltas[-1].finish_reason) == ([], "", "stop")
    assert ended.usage == {"prompt_tokens": n_prompt, "completion_tokens": 0}
    # The continued ids count against the context.
    ctx = hf._served["tiny"].context_length
    filled = await run(hf, request(PROMPT, [5] * (ctx - n_prompt), temperature=0))
    assert (filled.ids, filled.deltas[-1].finish_reason) == ([], "length")
    with pytest.raises(ContextOverflow):
        await run(hf, request(PROMPT, [5] * (ctx - n_prompt + 1), temperature=0))


# ------------------------------------------------------------------ vllm


@pytest.mark.vllm
@on_engine_loop
async def test_vllm_greedy_resume_is_exact(vllm_engine: VLLMEngine) -> None:
    await check_resume(vllm_engine, PROMPT, temperature=0, ignore_eos=True)


@pytest.mark.vllm
@on_engine_loop
async def test_vllm_resume_is_exact_with_repetition_penalty(vllm_engine: VLLMEngine) -> None:
    plain = await run(vllm_engine, request(PROMPT, max_tokens=N, temperature=0, ignore_eos=True))
    full = await check_resume(
        vllm_engine, PROMPT, temperature=0, ignore_eos=True, repetition_penalty=1.5
    )
    assert full.ids != plain.ids  # the penalty is at work


@pytest.mark.vllm
@on_engine_loop
async def test_vllm_resume_inside_a_multibyte_character(vllm_engine: VLLMEngine) -> None:
    await check_split_characters(vllm_engine, vllm_engine._tokenizer)


@pytest.mark.vllm
@on_engine_loop
async def test_vllm_continuation_limits(vllm_engine: VLLMEngine) -> None:
    full = await run(vllm_engine, request(PROMPT, max_tokens=8, temperature=0, ignore_eos=True))
    n_prompt = full.usage["prompt_tokens"]
    ended = await run(
        vllm_engine, request(PROMPT, full.ids, temperature=0, stop_token_ids=[full.ids[-1]])
    )
    assert (ended.ids, ended.text, ended.deltas[-1].finish_reason) == ([], "", "stop")
    assert ended.usage == {"prompt_tokens": n_prompt, "completion_tokens": 0}
    filled = await run(vllm_engine, request(PROMPT, [5] * (VLLM_CONTEXT - n_prompt), temperature=0))
    assert (filled.ids, filled.deltas[-1].finish_reason) == ([], "length")
    with pytest.raises(ContextOverflow):
        await run(vllm_engine, request(PROMPT, [5] * (VLLM_CONTEXT - n_prompt + 1), temperature=0))
    # max_tokens None: up to the context, the continued ids included.
    rest = await run(vllm_engine, request(PROMPT, full.ids, temperature=0, ignore_eos=True))
    assert rest.usage["completion_tokens"] == VLLM_CONTEXT - n_prompt - len(full.ids)
