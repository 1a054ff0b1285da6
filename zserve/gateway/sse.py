"""OpenAI's server-sent events, and the ASGI plumbing that notices a client
that went away.

A chunk is ``data: {json}\\n\\n``. Chunks are built from per-request byte
templates (id, created, model are encoded once), so a content chunk costs one
string encoding of its text. Several deltas read together become one chunk;
several chunks ready together go out in one write.

``DisconnectGuard`` watches the ASGI ``receive`` channel while a request runs
and cancels the running task when the client disconnects, so that closing
the zserve streams (in ``finally`` blocks) cancels the generation on the
worker. uvicorn's ``send`` silently drops writes to a closed connection, so
without it a stream would run to its end for nobody.

The endpoints speak ASGI themselves (``app.py``): the response start, the
chunks and the end go straight to the server's ``send``.
"""

from __future__ import annotations

import asyncio
import json
from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import Any

from zserve.gateway.errors import APIError
from zserve.gateway.schema import chat_logprobs, completion_logprobs, dumps
from zserve.protocol import Delta, merge_tool_calls

DONE = b"data: [DONE]\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def _s(text: str) -> bytes:
    """A JSON string, as ``json.dumps(text, ensure_ascii=False)`` writes it."""
    return encode_basestring(text).encode()


class ChunkEncoder:
    """Bytes for one request's chunks: chat (``chat.completion.chunk``) or
    text completion (``text_completion``)."""

    def __init__(
        self,
        chat: bool,
        rid: str,
        created: int,
        model: str,
        include_usage: bool = False,
        echo_prompts: list[str] | None = None,
        n: int = 1,
        echo_logprobs: bool = False,
    ) -> None:
        self.chat = chat
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.head = (
            f'data: {{"id":"{rid}","object":"{obj}","created":{created},'
            f'"model":{json.dumps(model, ensure_ascii=False)},"choices":['
        ).encode()
        self.tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"
        self.echo_prompts = echo_prompts
        self.n = n
        self.offsets: dict[int, int] = {}  # completions: text_offset per choice
        # echo with logprobs: the echoed prompt's chunk waits for its logprobs
        # (the worker's first records), gathered here per choice
        self.echo_logprobs = echo_logprobs
        self._prompt_lps: dict[int, list[Any]] = {}

    def _choice(
        self,
        index: int,
        text: str,
        finish: str | None,
        logprobs: list[Any] | None,
        calls: list[dict[str, Any]] | None = None,
    ) -> bytes:
        fr = b"null" if finish is None else b'"' + finish.encode() + b'"'
        if logprobs is None:
            lp = b"null"
        elif self.chat:
            lp = dumps(chat_logprobs(logprobs))
        else:
            off = self.offsets.get(index, 0)
            lp = dumps(completion_logprobs(logprobs, off))
            self.offsets[index] = off + sum(len(str(e.get("token", ""))) for e in logprobs)
        if calls:
            delta = b'{"content":' + _s(text) + b"," if text else b"{"
            body = b'"delta":' + delta + b'"tool_calls":' + dumps(calls) + b"}"
        elif self.chat:
            delta = b'{"content":' + _s(text) + b"}" if text or finish is None else b"{}"
            body = b'"delta":' + delta
        else:
            body = b'"text":' + _s(text)
        return b'{"index":%d,%s,"logprobs":%s,"finish_reason":%s}' % (index, body, lp, fr)

    def start(self, index: int) -> bytes:
        """The first chunk of a choice: the assistant role (chat), the echoed
        prompt (completions with ``echo``), or nothing."""
        if self.chat:
            return (
                self.head
                + b'{"index":%d,"delta":{"role":"assistant","content":""},' % index
                + b'"logprobs":null,"finish_reason":null}'
                + self.tail
            )
        if self.echo_prompts is not None:
            if self.echo_logprobs:
                self._prompt_lps[index] = []  # sent with its logprobs (``_echo``)
                return b""
            prompt = self.echo_prompts[index // self.n]
            self.offsets[index] = len(prompt)
            return self.head + self._choice(index, prompt, None, None) + self.tail
        return b""

    def _echo(self, index: int, batch: list[Delta]) -> tuple[bytes, list[Delta]]:
        """Echo with logprobs: gather the prompt's logprobs (records of their
        own, ahead of the first token); at the first other record, the chunk
        of the echoed prompt with them (the first null, as unstreamed).
        Returns it (or b"" while gathering) and what follows in ``batch``."""
        lps = self._prompt_lps[index]
        k = 0
        for d in batch:
            if d.prompt_logprobs is None or d.text or d.token_ids or d.finish_reason:
                break
            lps += d.prompt_logprobs
            k += 1
        if k == len(batch):
            return b"", []
        del self._prompt_lps[index]
        prompt = self.echo_prompts[index // self.n]  # type: ignore[index]
        self.offsets[index] = 0  # (then the prompt tokens' own lengths)
        return self.head + self._choice(index, prompt, None, lps) + self.tail, batch[k:]

    def deltas(self, index: int, batch: list[Delta]) -> bytes:
        """One chunk for deltas read together; ``b""`` when they carry no
        text, no logprobs and no finish reason (a token held back by a stop
        string or an unfinished UTF-8 character): no empty content chunks."""
        if self._prompt_lps and index in self._prompt_lps:
            echoed, batch = self._echo(index, batch)
            return echoed + (self.deltas(index, batch) if batch else b"")
        calls = None
        if len(batch) == 1:
            d = batch[0]
            text, finish, lps, calls = d.text, d.finish_reason, d.logprobs, d.tool_calls
        else:
            text = "".join(d.text for d in batch)
            finish = batch[-1].finish_reason
            lps = None
            for d in batch:
                if d.logprobs:
                    lps = (lps or []) + d.logprobs
                if d.tool_calls:
                    if calls is None:
                        calls = []
                    merge_tool_calls(calls, d.tool_calls)
        if not text and finish is None and lps is None and not calls:
            return b""
        return self.head + self._choice(index, text, finish, lps, calls) + self.tail

    def usage(self, usage: dict[str, int]) -> bytes:
        return self.head + b'],"usage":' + dumps(usage) + b"}\n\n"


def error_event(err: APIError) -> bytes:
    return b"data: " + err.body() + b"\n\n" + DONE


class ClientGone(Exception):
    """The HTTP client disconnected."""


WATCH_AFTER = 0.005  # seconds a request runs before its disconnect watcher starts


class DisconnectGuard:
    """``async with DisconnectGuard(receive, loop):`` cancels the current task
    when the client disconnects, and turns that cancellation into
    ``ClientGone``. Read the request body before entering.

    The watcher (a task reading ``receive``) starts only once the block has
    run ``WATCH_AFTER`` seconds: most requests on a fast engine end sooner,
    and a timer costs a few microseconds where a task, its ``receive`` wait
    and its cancellation cost tens. A disconnect is still noticed at once if
    it came earlier: ``receive`` reports it when the watcher first asks."""

    __slots__ = ("receive", "loop", "task", "timer", "watcher", "gone")

    def __init__(self, receive: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.receive = receive
        self.loop = loop or asyncio.get_running_loop()
        self.gone = False
        self.watcher: asyncio.Task[None] | None = None

    def _start(self) -> None:
        self.timer = None
        self.watcher = self.loop.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self.receive()
            if msg["type"] == "http.disconnect":
                self.gone = True
                self.task.cancel()
                return

    async def __aenter__(self) -> DisconnectGuard:
        task = asyncio.current_task(self.loop)
        assert task is not None
        self.task = task
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(WATCH_AFTER, self._start)
        return self

    async def __aexit__(self, et: Any, e: Any, tb: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()
        if self.gone and et is asyncio.CancelledError:
            self.task.uncancel()
            raise ClientGone from None
