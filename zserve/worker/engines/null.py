"""The null engine: instant (or paced) fake tokens, for tests and benchmarks.

Token i is the word ``t{i}`` and a space, so n tokens make n words; token i's
id is i. A continuation after k ids (``GenerateRequest.continue_ids``) yields
tokens k, k+1, ...: a resumed stream reads exactly like an uninterrupted one.
Embeddings are deterministic unit vectors derived from the text.

``--engine-arg fail_after=N`` makes every generation raise after N tokens
(N = 0: before the first), so tests drive a real worker into ``engine_error``.

``--engine-arg script=TEXT`` makes every generation that text instead, in
tokens of ``SCRIPT_TOKEN`` characters (token i's id is i), ending with
``stop`` (or ``length`` at ``max_tokens``): a scripted model, e.g. one that
writes a tool call in its own format for the worker's tool-call parser.

For benchmarks at scale (``bench/scale.py``), ``--engine-arg pacing=step``
paces like a batched model: one engine step every ``--token-delay`` seconds
for all requests at once (a request waits for the next step), so tokens come
out together; ``--engine-arg stamp=true`` then writes each token's
production time into its text, ``t{i}@{time.monotonic()} `` (the machine's
monotonic clock, shared by its processes), so a client on the same machine
can tell what the serving path added.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
import time
import types
from collections.abc import AsyncIterator, Generator
from typing import Any

from zserve.protocol import FINISH_LENGTH, FINISH_STOP, Delta
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.options import EngineOptions

DEFAULT_MAX_TOKENS = 16
SCRIPT_TOKEN = 3  # characters per token of a script
CAPACITY = 1024  # concurrent requests by default: fake tokens cost next to nothing
EMBED_DIM = 64


class NullEngine(Engine):
    name = "null"
    resumable = True  # continuing after k ids yields tokens k, k+1, ...

    def __init__(
        self,
        models: list[str],
        token_delay: float = 0.0,
        context_length: int = 4096,
        fail_after: int | None = None,
    ) -> None:
        super().__init__()
        self.models = list(models)
        self.token_delay = token_delay
        self.context_length = context_length
        self.fail_after = fail_after  # raise after this many tokens (tests)
        self.clock: _StepClock | None = None  # pacing=step: one step for all requests
        self.script: list[str] | None = None  # script=TEXT: its tokens

    @classmethod
    def from_options(cls, opts: EngineOptions) -> NullEngine:
        names = [n for group in opts.served_names() for n in group]
        extra = dict(opts.engine_args)
        fail_after = extra.pop("fail_after", None)
        pacing = extra.pop("pacing", "request")
        stamp = extra.pop("stamp", False) in (True, "true", "1", 1)
        script = extra.pop("script", None)
        if script is not None and (not isinstance(script, str) or not script):
            raise ValueError(f"script wants a text, got {script!r}")
        if extra:
            raise ValueError(f"the null engine takes no engine argument {sorted(extra)}")
        if fail_after is not None and (not isinstance(fail_after, int) or fail_after < 0):
            raise ValueError(f"fail_after wants a count >= 0, got {fail_after!r}")
        if pacing not in ("request", "step"):
            raise ValueError(f"pacing wants request or step, got {pacing!r}")
        if (pacing == "step" or stamp) and not opts.token_delay:
            raise ValueError("pacing=step and stamp want a --token-delay")
        eng = cls(names, opts.token_delay, opts.context_length or 4096, fail_after)
        if pacing == "step" or stamp:
            eng.clock = _StepClock(opts.token_delay, stamp)
        if script is not None:
            k = SCRIPT_TOKEN
            eng.script = [script[i : i + k] for i in range(0, len(script), k)]
        return eng

    def default_capacity(self) -> tuple[int, str]:
        return CAPACITY, "the null engine's default"

    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if self.script is not None:
            return self._scripted(request, self.script)
        if self.clock is not None:
            return self._stepped(request, self.clock)
        if self.fail_after is None:
            return self._generate(request)
        return self._failing(request, self.fail_after)

    async def _failing(self, request: GenerateRequest, n: int) -> AsyncIterator[Delta]:
        """The first ``n`` deltas of a normal generation, then an engine failure
        (none where the generation is ``n`` tokens or shorter)."""
        gen: Any = self._generate(request)
        sent = 0
        try:
            async for d in gen:
                if sent == n:
                    break
                yield d
                sent += 1
            else:
                return
        finally:
            await gen.aclose()
        raise RuntimeError(f"null engine: failing after {n} tokens (fail_after)")

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if request.prompt is not None:
            prompt = request.prompt
        else:
            prompt = " ".join(str(m.get("content", "")) for m in request.messages or [])
        ids_in = request.prompt_ids
        prompt_tokens = len(prompt.split()) if ids_in is None else len(ids_in)
        # A continuation goes on counting from the ids already delivered;
        # max_tokens is what remains (None: DEFAULT_MAX_TOKENS in all).
        start = len(request.continue_ids)
        n = request.params.max_tokens or DEFAULT_MAX_TOKENS - start
        if n < 1:  # the earlier attempt already delivered every token
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 0}
            yield Delta("", [], FINISH_LENGTH, usage=usage)
            return
        end = start + n
        delay = self.token_delay
        texts = _texts(end)
        cached = len(texts)
        # One engine step per token; with no delay the first token is
        # instant and each later one waits one loop turn.
        if delay:
            await asyncio.sleep(delay)
        if n > 1:
            yield Delta(_text(start), [start], usage={"prompt_tokens": prompt_tokens})
            for i in range(start + 1, end - 1):
                if delay:
                    await asyncio.sleep(delay)
                else:
                    await _next_step()
                yield Delta(texts[i] if i < cached else f"t{i} ", [i])
            if delay:
                await asyncio.sleep(delay)
            else:
                await _next_step()
        yield Delta(
            _text(end - 1),
            [end - 1],
            FINISH_LENGTH,
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": n},
        )

    async def _stepped(self, request: GenerateRequest, clock: _StepClock) -> AsyncIterator[Delta]:
        """Token i comes out at the engine step after token i - 1 (``pacing=step``)."""
        prompt = request.prompt if request.prompt is not None else " ".join(
            str(m.get("content", "")) for m in request.messages or []
        )
        start = len(request.continue_ids)
        n = request.params.max_tokens or DEFAULT_MAX_TOKENS - start
        usage: dict[str, int] = {"prompt_tokens": len(prompt.split())}
        if n < 1:
            yield Delta("", [], FINISH_LENGTH, usage={**usage, "completion_tokens": 0})
            return
        for i in range(start, start + n):
            text = await clock.step(i)
            if i == start + n - 1:
                yield Delta(text, [i], FINISH_LENGTH, usage={**usage, "completion_tokens": n})
            else:
                yield Delta(text, [i], usage=usage if i == start else None)

    async def _scripted(self, request: GenerateRequest, script: list[str]) -> AsyncIterator[Delta]:
        """The script's tokens from ``len(continue_ids)`` on, then ``stop``."""
        start = len(request.continue_ids)
        end = len(script)
        finish = FINISH_STOP
        if request.params.max_tokens is not None and start + request.params.max_tokens < end:
            end, finish = start + request.params.max_tokens, FINISH_LENGTH
        usage = {"prompt_tokens": 1, "completion_tokens": end - start}
        if start >= end:
            yield Delta("", [], finish, usage=usage)
            return
        for i in range(start, end):
            if self.token_delay:
                await asyncio.sleep(self.token_delay)
            elif i > start:
                await _next_step()
            yield Delta(script[i], [i], finish if i == end - 1 else None,
                        usage if i == end - 1 else None)  # fmt: skip

    async def embed(self, model: str, texts: list[str]) -> tuple[list[list[float]], int]:
        return [embed_text(t) for t in texts], sum(len(t.split()) for t in texts)

    async def count_tokens(self, model: str, text: str) -> int:
        return len(text.split())

    async def tokenize(
        self,
        request: GenerateRequest,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """One token a word: ``t{i}`` is id i (what this engine writes), any
        other word 0; messages are their contents, in turn."""
        if request.prompt_ids is not None:
            return list(request.prompt_ids)
        text = request.prompt if request.prompt is not None else " ".join(
            str(m.get("content", "")) for m in request.messages or []
        )
        return [int(w[1:]) if w[:1] == "t" and w[1:].isdigit() else 0 for w in text.split()]

    async def detokenize(self, model: str, ids: list[int]) -> str:
        return await self.decode(model, ids)

    async def decode(self, model: str, ids: list[int]) -> str:
        if self.script is not None:
            return "".join(self.script[i] for i in ids if i < len(self.script))
        return "".join(_text(i) for i in ids)


class _StepClock:
    """Engine steps every ``interval`` seconds, shared by every request waiting:
    the first waiter after a step schedules the next one, and one timer wakes
    them all in the same loop turn."""

    def __init__(self, interval: float, stamp: bool) -> None:
        self.interval = interval
        self.stamp = stamp
        self._waiters: list[tuple[asyncio.Future[str], int]] = []

    def step(self, i: int) -> asyncio.Future[str]:
        """Token ``i``'s text, once the next step has run."""
        loop = asyncio.get_running_loop()
        if not self._waiters:
            loop.call_later(self.interval, self._run)
        fut: asyncio.Future[str] = loop.create_future()
        self._waiters.append((fut, i))
        return fut

    def _run(self) -> None:
        waiters, self._waiters = self._waiters, []
        now = f"@{time.monotonic():.6f} " if self.stamp else None
        for fut, i in waiters:
            if not fut.done():  # a cancelled request's future
                fut.set_result(f"t{i}{now}" if now else _text(i) if i < len(_TEXTS) else f"t{i} ")


@types.coroutine
def _next_step() -> Generator[None, None, None]:
    """Give the loop one turn: what ``asyncio.sleep(0)`` does, without its frames.

    A bare ``yield`` inside a task makes the task reschedule itself behind
    everything already ready, exactly like ``asyncio.sleep(0)``.
    """
    yield


_TEXTS: list[str] = []
_TEXTS_CACHED = 1 << 16  # token texts kept, at most (a few MiB)


def _texts(n: int) -> list[str]:
    """Token texts ``t{i} `` made once (a fake engine should make little garbage);
    the list may be shorter than ``n``: past its end, make the text on the spot."""
    have = len(_TEXTS)
    if have < n and have < _TEXTS_CACHED:
        _TEXTS.extend(f"t{i} " for i in range(have, min(n, _TEXTS_CACHED)))
    return _TEXTS


def _text(i: int) -> str:
    return _TEXTS[i] if i < len(_TEXTS) else f"t{i} "


def embed_text(text: str, dim: int = EMBED_DIM) -> list[float]:
    """A deterministic unit vector from the text's SHA-256 stream."""
    raw = b""
    counter = 0
    while len(raw) < dim * 4:
        raw += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    ints = struct.unpack(f"<{dim}i", raw[: dim * 4])
    vec = [x / 2**31 for x in ints]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]
