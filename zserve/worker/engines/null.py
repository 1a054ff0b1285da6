"""The null engine: instant (or paced) fake tokens, for tests and benchmarks.

Token i is the word ``t{i}`` and a space, so n tokens make n words; token i's
id is i. Embeddings are deterministic unit vectors derived from the text.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import struct
from collections.abc import AsyncIterator

from zserve.protocol import FINISH_LENGTH, Delta
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.options import EngineOptions

DEFAULT_MAX_TOKENS = 16
EMBED_DIM = 64


class NullEngine(Engine):
    name = "null"

    def __init__(
        self, models: list[str], token_delay: float = 0.0, context_length: int = 4096
    ) -> None:
        super().__init__()
        self.models = list(models)
        self.token_delay = token_delay
        self.context_length = context_length

    @classmethod
    def from_options(cls, opts: EngineOptions) -> NullEngine:
        names = [n for group in opts.served_names() for n in group]
        return cls(names, opts.token_delay, opts.context_length or 4096)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        if request.prompt is not None:
            prompt = request.prompt
        else:
            prompt = " ".join(str(m.get("content", "")) for m in request.messages or [])
        prompt_tokens = len(prompt.split())
        n = request.params.max_tokens or DEFAULT_MAX_TOKENS
        delay = self.token_delay
        usage = {"prompt_tokens": prompt_tokens}
        # One engine step per token; with no delay the first token is
        # instant and each later one waits one loop turn.
        for i in range(n - 1):
            if delay or i:
                await asyncio.sleep(delay)
            yield Delta(f"t{i} ", [i], usage=usage if i == 0 else None)
        if delay or n > 1:
            await asyncio.sleep(delay)
        yield Delta(
            f"t{n - 1} ",
            [n - 1],
            FINISH_LENGTH,
            usage={"prompt_tokens": prompt_tokens, "completion_tokens": n},
        )

    async def embed(self, model: str, texts: list[str]) -> tuple[list[list[float]], int]:
        return [embed_text(t) for t in texts], sum(len(t.split()) for t in texts)

    async def count_tokens(self, model: str, text: str) -> int:
        return len(text.split())


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
