"""The engine interface every worker engine implements.

An engine only generates: the worker runtime around it owns the socket,
heartbeats, capacity, cancellation, stop strings and ``max_tokens``
enforcement, and coalescing of deltas into messages.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from zserve.protocol import Delta, SamplingParams
from zserve.worker.tools import template_message


@dataclass(slots=True)
class GenerateRequest:
    request_id: str  # unique within this worker
    model: str  # the served name the client asked for
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    # Resumption: token ids already generated for this request by an earlier
    # attempt (on another worker). The engine continues after them exactly
    # as an uninterrupted run would: they count as generated output (for
    # penalties, and as detokenizer context, so the next text delta is the
    # one an uninterrupted run would emit), and ``params.max_tokens`` is
    # what remains (the runtime has already taken them off).
    continue_ids: list[int] = field(default_factory=list)
    # The tools the chat template offers the model (OpenAI's function tools;
    # None: none), as the worker's tool plan chose (zserve/worker/tools.py).
    tools: list[dict[str, Any]] | None = None
    # Characters of the continued ids' text the caller already has (None: all
    # of it); the rest was held back (a stop string's possible beginning). An
    # engine with ``replays_held_text`` sends that rest itself, first.
    continue_chars: int | None = None
    # The prompt as token ids (instead of ``prompt`` or ``messages``): the
    # engine does not tokenize, and adds no special tokens of its own.
    prompt_ids: list[int] | None = None
    # False: special tokens stay in the text (and in ``continued_text``), as
    # the worker's tool-call parser asks (zserve/worker/tools.py); the token
    # that ends the request (EOS, a stop token id) is never text.
    skip_special_tokens: bool = True


class Engine(abc.ABC):
    """A model engine. Subclasses set ``name`` and fill ``models`` in ``start``."""

    name: str = "?"
    # Whether ``generate`` honours ``GenerateRequest.continue_ids`` (exact
    # resumption). An engine that cannot (text-only remote APIs) leaves it
    # False and the runtime refuses continuations with ``worker_lost``.
    resumable: bool = False
    # Whether ``generate`` rebuilds the text of ``continue_ids`` with the very
    # decoding that produced the stream and sends what the caller had not
    # received (``GenerateRequest.continue_chars``). Otherwise the runtime
    # holds back ``decode(continue_ids)`` past those characters itself (a
    # decode without the prompt's context: a SentencePiece tokenizer can
    # lose a leading space there).
    replays_held_text: bool = False
    # Whether it offers ``GenerateRequest.tools`` to the model (through its
    # chat template); the runtime refuses tools for an engine that does not.
    takes_tools: bool = True
    # Whether it constrains decoding by ``SamplingParams.structured`` (a
    # grammar per request, zserve/worker/grammar.py); the runtime refuses
    # structured requests (and tool_choice required or named, which become
    # one) for an engine that does not, rather than answer unconstrained.
    takes_structured: bool = False
    # Whether it scores prompts (``SamplingParams.prompt_logprobs``, and
    # ``max_tokens`` 0): the first delta of a request that asks carries
    # ``Delta.prompt_logprobs``. The runtime refuses them otherwise.
    prompt_logprobs: bool = False

    def __init__(self) -> None:
        self.models: list[str] = []  # served model names
        self.context_length: int = 0

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Load models. Called once, inside the worker's event loop."""

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        """Yield deltas: text (may be ""), token_ids, finish_reason on the last.

        The last delta carries ``usage`` with ``prompt_tokens`` where known.
        Raise a ``ZServeError`` (``BadRequest``, ``ContextOverflow``...) for a
        request the engine refuses; anything else becomes ``engine_error``.
        """

    async def embed(self, model: str, texts: list[str]) -> tuple[list[list[float]], int]:
        """Return (one unit vector per text, prompt tokens used)."""
        from zserve.errors import BadRequest

        raise BadRequest(f"engine {self.name!r} does not serve embeddings")

    def default_capacity(self) -> tuple[int, str]:
        """The concurrent requests this engine serves well, and where that
        number comes from: the worker advertises it unless ``--capacity``
        says otherwise. Called before ``start``."""
        return 1, "one request at a time"

    async def count_tokens(self, model: str, text: str) -> int:
        return len(text.split())

    def tokenizer(self, model: str) -> Any:
        """The model's tokenizer (Hugging Face's interface), for tool-call
        parsers; None for an engine without one."""
        return None

    async def decode(self, model: str, ids: list[int]) -> str:
        """The text of generated ids, whole characters only (a trailing
        partial UTF-8 character is left out, as streaming would hold it).
        Resumption uses it to restore what a stop string held back."""
        raise NotImplementedError(f"engine {self.name!r} cannot decode token ids")

    async def continued_text(self, request: GenerateRequest) -> str:
        """The text of ``request.continue_ids`` as the stream that produced
        them decoded it (whole characters only): what a resumption holds back
        past ``continue_chars``, and what primes a tool-call converter. By
        default ``decode`` (no prompt context: an engine on a SentencePiece
        tokenizer should replay with it; special tokens skipped: an engine
        that has them honours ``request.skip_special_tokens``)."""
        return await self.decode(request.model, request.continue_ids)

    async def tokenize(
        self,
        request: GenerateRequest,
        add_special_tokens: bool | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:
        """The ids ``request``'s prompt (or messages, through the chat
        template with ``request.tools``) takes, as ``generate`` would
        tokenize it by default. ``add_special_tokens``: None for that
        default (on for a prompt, off for messages: the template writes
        them); ``add_generation_prompt``: end with the assistant's turn."""
        from zserve.errors import BadRequest

        raise BadRequest(f"engine {self.name!r} has no tokenizer to serve tokenize")

    async def detokenize(self, model: str, ids: list[int]) -> str:
        """The text of ``ids``, special tokens included (``/detokenize``)."""
        from zserve.errors import BadRequest

        raise BadRequest(f"engine {self.name!r} has no tokenizer to serve detokenize")

    async def abort(self, request_id: str) -> None:  # noqa: B027 - optional hook
        """Stop work for ``request_id``; the runtime has already stopped reading it."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources."""


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """``messages`` through the tokenizer's chat template, ready to generate
    from (OpenAI content parts become one string), with ``tools`` offered;
    ``BadRequest`` when the template refuses them (role order, missing keys,
    no template)."""
    from zserve.errors import BadRequest

    try:
        return tokenizer.apply_chat_template(
            [plain_message(m) for m in messages],
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )
    except Exception as e:  # jinja errors, a tokenizer without a template
        raise BadRequest(f"chat template failed: {e}") from e


def plain_message(m: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content parts ([{type: text, text}, ...]) become one string,
    and earlier tool calls' JSON-string arguments dicts (as templates want)."""
    if m.get("tool_calls"):
        m = template_message(m)
    content = m.get("content")
    if isinstance(content, list):
        text = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return {**m, "content": text}
    if content is None:
        return {**m, "content": ""}
    return m
