"""The hf engine in-process, for the defects of issue 19 it had:

* one row whose probabilities are not finite failed every row of its batch;
* out-of-range sampling values (``repetition_penalty=1e-40``) were accepted;
* a big prompt was tokenized on the event loop (heartbeats stopped with it),
  and stop lists had no bound, their matching cost growing with their size;
* a resumed stream with a stop string lost text on SentencePiece tokenizers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from zserve.errors import BadRequest, ContextOverflow, EngineError
from zserve.protocol import (
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    Delta,
    SamplingParams,
)
from zserve.worker.engine import GenerateRequest
from zserve.worker.engines import hf_sampling
from zserve.worker.engines.hf import HFEngine
from zserve.worker.engines.hf_detok import IncrementalDetokenizer
from zserve.worker.stops import StopMatcher

# Every async test shares the module's event loop, where the engines live.
on_engine_loop = pytest.mark.asyncio(loop_scope="module")

PROMPT = "The morning train left the station at seven"
_ids = itertools.count()


def request(prompt: str | None = None, model: str = "tiny", **kw: Any) -> GenerateRequest:
    messages = kw.pop("messages", None)
    cont = kw.pop("cont", [])
    chars = kw.pop("chars", None)
    return GenerateRequest(
        f"v{next(_ids)}", model, prompt, messages, SamplingParams(**kw), list(cont),
        continue_chars=chars,
    )  # fmt: skip


async def run(engine: HFEngine, req: GenerateRequest) -> tuple[list[int], str, list[Delta]]:
    deltas: list[Delta] = []
    async with asyncio.timeout(120):
        async for d in engine.generate(req):
            deltas.append(d)
    ids = [t for d in deltas for t in d.token_ids or []]
    return ids, "".join(d.text for d in deltas), deltas


async def _engine(model_dir: Path, name: str) -> HFEngine:
    eng = HFEngine([(str(model_dir), [name])], dtype="float32")
    await eng.start()
    return eng


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hf(tiny_model_dir: Path) -> AsyncIterator[HFEngine]:
    eng = await _engine(tiny_model_dir, "tiny")
    try:
        yield eng
    finally:
        await eng.close()


# ------------------------------------------------- one bad row, one failure


@on_engine_loop
async def test_a_row_with_non_finite_probabilities_fails_alone(
    hf: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its request fails (engine_error); the request beside it in the batch
    goes on and ends as it would have alone."""
    kw = {"max_tokens": 40, "temperature": 1.0, "ignore_eos": True}
    alone, _, _ = await run(hf, request(PROMPT, seed=1, **kw))

    warp = hf_sampling._warp
    calls: dict[int, int] = {}

    def poisoned(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
        out = warp(row, p)
        if p.seed == 666:  # NaN from its third token on (both rows are in the batch)
            calls[id(p)] = calls.get(id(p), 0) + 1
            if calls[id(p)] >= 3:
                return torch.full_like(out, float("nan"))
        return out

    monkeypatch.setattr(hf_sampling, "_warp", poisoned)
    good, bad = await asyncio.gather(
        run(hf, request(PROMPT, seed=1, **kw)),
        run(hf, request(PROMPT, seed=666, **kw)),
        return_exceptions=True,
    )
    assert not isinstance(good, BaseException), good
    assert isinstance(bad, EngineError) and "not finite" in str(bad)
    ids, _, deltas = good
    assert ids == alone and deltas[-1].finish_reason == "length"
    assert hf.stats()["active"] == 0


@on_engine_loop
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("repetition_penalty", 1e-40),  # every probability NaN at temperature 1
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e6),
        ("seed", 1 << 64),
        ("stop", ["x"] * (MAX_STOP_STRINGS + 1)),
        ("stop", ["x" * (MAX_STOP_LENGTH + 1)]),
        ("stop_token_ids", [1] * (MAX_STOP_TOKEN_IDS + 1)),
    ],
)
async def test_out_of_range_sampling_values_are_refused(hf: HFEngine, field, value) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams.from_dict({field: value})
    with pytest.raises(BadRequest, match=field):
        await run(hf, request(PROMPT, max_tokens=2, **{field: value}))


@on_engine_loop
async def test_the_edges_of_the_ranges_still_generate(hf: HFEngine) -> None:
    for rp in (0.01, 100.0):
        _, _, deltas = await run(hf, request(PROMPT, max_tokens=4, repetition_penalty=rp))
        assert deltas[-1].finish_reason in ("length", "stop")
    stops = [f"never{i}" + "x" * (MAX_STOP_LENGTH - 7) for i in range(MAX_STOP_STRINGS)]
    _, _, deltas = await run(hf, request(PROMPT, max_tokens=4, stop=stops))
    assert deltas[-1].finish_reason == "length"


# ------------------------------------------------- big inputs off the loop


class _NoTokenizing:
    """A tokenizer that must not be asked to tokenize."""

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def __call__(self, *a: Any, **kw: Any) -> Any:
        raise AssertionError("tokenized a prompt that cannot fit")


@on_engine_loop
async def test_a_prompt_too_long_to_fit_is_refused_untokenized(
    hf: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    sm = hf._served["tiny"]
    monkeypatch.setattr(sm, "tokenizer", _NoTokenizing(sm.tokenizer))
    big = "The morning train left. " * ((7 << 20) // 24)  # ~7 MiB
    with pytest.raises(ContextOverflow, match="characters"):
        await run(hf, request(big, max_tokens=2))
    messages = [{"role": "user", "content": big}]
    with pytest.raises(ContextOverflow, match="characters"):
        await run(hf, request(messages=messages, max_tokens=2))
    assert sm.max_token_chars == 9  # the byte-level BPE's longest token


@on_engine_loop
async def test_a_big_prompt_is_tokenized_off_the_event_loop(
    hf: HFEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the tokenizer gives no bound, a big prompt is tokenized in a
    thread: the event loop (heartbeats) keeps turning meanwhile."""
    monkeypatch.setattr(hf._served["tiny"], "max_token_chars", 0, raising=False)
    big = "The morning train left the station at seven. " * 25_000  # 1.1 M characters
    lag = 0.0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal lag
        while not stop.is_set():
            t = time.monotonic()
            await asyncio.sleep(0.01)
            lag = max(lag, time.monotonic() - t - 0.01)

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    t0 = time.monotonic()
    try:
        with pytest.raises(ContextOverflow, match="tokens"):
            await run(hf, request(big, max_tokens=2))
    finally:
        took = time.monotonic() - t0
        stop.set()
        await tick
    assert lag < max(0.1, took / 3), (lag, took)  # inline, the loop would stop for all of it


def test_stop_matching_work_does_not_grow_with_the_stop_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Per token, the matcher's work is that of the token's characters: the
    automaton's transitions (failure links included) are counted, not timed,
    and stay within twice the characters fed, for one stop string or the
    most a request may carry."""
    from zserve.worker import stops as stops_mod

    moves = 0
    real = stops_mod._Automaton.step

    def counted(self: object, state: int, ch: str) -> int:
        nonlocal moves
        goto, fail = self.goto, self.fail  # type: ignore[attr-defined]
        while state and ch not in goto[state]:
            state = fail[state]
            moves += 1
        moves += 1
        return goto[state].get(ch, 0)

    monkeypatch.setattr(stops_mod._Automaton, "step", counted)

    def work(stops: list[str]) -> int:
        nonlocal moves
        moves = 0
        m = StopMatcher(stops)
        for _ in range(400):
            m.feed(" worx")
        return moves

    fed = 400 * len(" worx")
    one = work(["wory" * 64])
    many = work([f"{i:02d}" + "wory" * 63 + "wo" for i in range(MAX_STOP_STRINGS)])
    assert one <= 2 * fed and many <= 2 * fed, (fed, one, many)
    # and the counted step is the real one: same cut, same held text
    monkeypatch.setattr(stops_mod._Automaton, "step", real)
    m = StopMatcher(["wory", "rx w"])
    assert m.feed(" worx worx") == (" wo", True)


# ------------------------------------------------- SentencePiece resumption


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sp(sp_model_dir: Path) -> AsyncIterator[HFEngine]:
    eng = await _engine(sp_model_dir, "sp")
    try:
        yield eng
    finally:
        await eng.close()


def stream_pieces(tok: Any, prompt_ids: list[int], ids: list[int]) -> list[str]:
    """The text each id added to the stream, as the engine decoded it."""
    d = IncrementalDetokenizer(tok, prompt_ids)
    return [d.push([t]) for t in ids]


def held_stop_case(pieces: list[str]) -> tuple[int, str, int]:
    """(k, stop, chars): a stop string that begins 2 characters before the
    end of the first k pieces' text (so that a stream cut after k tokens
    had sent ``chars`` characters and held the rest back)."""
    text = "".join(pieces)
    for k in range(8, len(pieces) - 4):
        end = len("".join(pieces[:k]))
        c = end - 2
        stop = text[c : c + 6]
        if len(stop) == 6 and text.find(stop) == c and not stop.isspace():
            m = StopMatcher([stop])
            sent = "".join(m.feed(p)[0] for p in pieces[:k])
            if len(sent) < end:
                return k, stop, len(sent)
    raise AssertionError("no place for a held-back stop string")


@on_engine_loop
async def test_a_resumed_stream_keeps_a_held_stop_on_sentencepiece(sp: HFEngine) -> None:
    """The text held back at the cut is rebuilt with the stream's own
    decoding (its prompt context): a first token that begins a word keeps
    its leading space, and the stream equals an uninterrupted one."""
    tok = sp._served["sp"].tokenizer
    kw = {"model": "sp", "temperature": 0, "ignore_eos": True}
    n = 48
    ids, text, _ = await run(sp, request(PROMPT, max_tokens=n, **kw))
    assert text.startswith(" ")  # a SentencePiece decode of these ids alone loses it
    assert tok.decode(ids, skip_special_tokens=True) == text[1:]
    prompt_ids = list(tok(PROMPT)["input_ids"])
    k, stop, chars = held_stop_case(stream_pieces(tok, prompt_ids, ids))

    whole_ids, whole, deltas = await run(sp, request(PROMPT, max_tokens=n, stop=[stop], **kw))
    assert deltas[-1].finish_reason == "stop" and whole == text[: text.find(stop)]
    rest_ids, rest, deltas = await run(
        sp, request(PROMPT, max_tokens=n - k, stop=[stop], cont=ids[:k], chars=chars, **kw)
    )
    assert deltas[-1].finish_reason == "stop"
    assert text[:chars] + rest == whole
    assert ids[:k] + rest_ids == whole_ids
