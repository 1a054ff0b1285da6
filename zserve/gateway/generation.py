"""Running a chat or text completion on the broker: one zserve stream per
choice, all concurrent, read batch by batch (``AsyncStream.next_batch``).

Every path closes every stream it opened in a ``finally``: a stream closed
before its end cancels its request on the worker (a client that went away,
a sibling choice that failed).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from zserve.client import AsyncClient, AsyncStream
from zserve.gateway.errors import to_api_error
from zserve.gateway.limits import check_fanout
from zserve.gateway.metrics import Tracker
from zserve.gateway.schema import Choice, GenRequest, total_usage
from zserve.gateway.sse import DONE, ChunkEncoder, error_event
from zserve.protocol import Delta, choice_seed, merge_tool_calls

T = TypeVar("T")


async def open_streams(
    client: AsyncClient, req: GenRequest, tenant: str | None = None
) -> list[AsyncStream]:
    """One stream per choice, index = input * n + j (nothing is sent yet);
    bad sampling parameters raise ``BadRequest`` here, and more requests
    in flight than ``limits.MAX_FANOUT_BYTES`` an ``APIError``. The choices
    of one input with the same parameters share one encoded request."""
    if req.echo and not all(isinstance(x, str) for x in req.prompts):
        # token-id prompts: what echo repeats is their text, from a worker
        req.echoed = list(await asyncio.gather(*(
            client.detokenize(req.model, x) if isinstance(x, list) else _text(x)
            for x in req.prompts
        )))  # fmt: skip
    sid, seed = req.session_id, req.params.get("seed")
    # Seeded: choice j gets its own seed (protocol.choice_seed), so that the
    # n choices differ and the same seed gives the same n again.
    per_choice = [
        {**req.params, "seed": choice_seed(seed, j)}
        if j and isinstance(seed, int) and not isinstance(seed, bool)
        else req.params
        for j in range(req.n)
    ]
    inputs: list[str | None] = [None] if req.messages is not None else list(req.prompts)
    streams: list[AsyncStream] = []
    in_flight = 0  # bytes of the requests these streams will send
    try:
        for prompt in inputs:
            shared: AsyncStream | None = None  # the choice whose request the unseeded share
            for params in per_choice:
                if shared is not None and params is req.params:
                    s = _repeat(client, shared)
                else:
                    s = client.stream(
                        req.model, prompt, messages=req.messages, session_id=sid,
                        tenant=tenant, **params,
                    )  # fmt: skip
                    if params is req.params:
                        shared = s
                streams.append(s)
                in_flight += _size(s)
                check_fanout(in_flight, len(streams), req.n)
    except BaseException:
        await close_all(streams)
        raise
    return streams


# The client's AsyncStream as it is before its first read: its request's
# frames (``_frames``) are there to share.
def _repeat(client: AsyncClient, stream: AsyncStream) -> AsyncStream:
    """Another stream with ``stream``'s request, sharing its encoded body."""
    rid, frames = client._core.repeat_frames(stream._frames)  # type: ignore[arg-type]
    return AsyncStream(client, rid, frames)


def _size(stream: AsyncStream) -> int:
    return sum(map(len, stream._frames or ()))


async def _text(x: str) -> str:
    return x


async def close_all(streams: list[AsyncStream]) -> None:
    for s in streams:
        await s.aclose()


async def gather(aws: list[Awaitable[T]]) -> list[T]:
    """All at once; the first failure cancels the rest and is raised as is."""
    if len(aws) == 1:
        return [await aws[0]]
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(a) for a in aws]  # type: ignore[arg-type]
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return [t.result() for t in tasks]


def fold(choice: Choice, batch: list[Delta]) -> None:
    """Add a batch of deltas to a choice."""
    parts = [choice.text] if choice.text else []
    for d in batch:
        if d.text:
            parts.append(d.text)
        if d.logprobs:
            choice.logprobs = (choice.logprobs or []) + d.logprobs
        if d.prompt_logprobs:  # in slices, ahead of the first token
            choice.prompt_logprobs = (choice.prompt_logprobs or []) + d.prompt_logprobs
        if d.tool_calls:
            if choice.tool_calls is None:
                choice.tool_calls = []
            merge_tool_calls(choice.tool_calls, d.tool_calls)
        if d.finish_reason is not None:
            choice.finish_reason = d.finish_reason
            u = d.usage or {}
            choice.prompt_tokens = int(u.get("prompt_tokens", 0))
            choice.completion_tokens = int(u.get("completion_tokens", 0))
    choice.text = "".join(parts)


async def _collect(stream: AsyncStream, choice: Choice, tracker: Tracker) -> Choice:
    while True:
        batch = await stream.next_batch()
        if not batch:
            return choice
        tracker.batch(choice.index)
        fold(choice, batch)


async def complete(
    streams: list[AsyncStream], req: GenRequest, tracker: Tracker
) -> list[Choice]:
    """Run every choice to its end (non-streaming)."""
    choices = [Choice(i) for i in range(len(streams))]
    try:
        pairs = zip(streams, choices, strict=True)
        return await gather([_collect(s, c, tracker) for s, c in pairs])
    finally:
        await close_all(streams)


async def first_batches(streams: list[AsyncStream], tracker: Tracker) -> list[list[Delta]]:
    """Wait for every choice's first deltas (errors raise before any byte is
    sent, so they get their HTTP status)."""

    async def first(i: int, s: AsyncStream) -> list[Delta]:
        batch = await s.next_batch()
        tracker.batch(i)
        return batch

    try:
        return await gather([first(i, s) for i, s in enumerate(streams)])
    except BaseException:
        await close_all(streams)
        raise


def _finish(choice: Choice, batch: list[Delta]) -> bool:
    d = batch[-1]
    if d.finish_reason is None:
        return False
    u = d.usage or {}
    choice.prompt_tokens = int(u.get("prompt_tokens", 0))
    choice.completion_tokens = int(u.get("completion_tokens", 0))
    return True


async def stream_body(
    streams: list[AsyncStream],
    firsts: list[list[Delta]],
    req: GenRequest,
    enc: ChunkEncoder,
    tracker: Tracker,
) -> AsyncIterator[bytes]:
    """The SSE body: start chunks, content chunks, usage, ``[DONE]``; an
    error mid-stream becomes an error event and ``[DONE]``."""
    choices = [Choice(i) for i in range(len(streams))]
    live = 0
    out = []
    for i, batch in enumerate(firsts):
        out.append(enc.start(i))
        if batch:
            out.append(enc.deltas(i, batch))
        if not batch or not _finish(choices[i], batch):
            live += 1
    pumps: list[asyncio.Task[None]] = []
    try:
        if live and len(streams) == 1:
            yield b"".join(out)
            out = []
            s, c = streams[0], choices[0]
            while True:
                batch = await s.next_batch()
                if not batch:
                    break
                tracker.batch(0)
                if _finish(c, batch):
                    out = [enc.deltas(0, batch)]
                    break
                yield enc.deltas(0, batch)
        elif live:
            yield b"".join(out)
            out = []
            queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

            async def pump(i: int, s: AsyncStream) -> None:
                try:
                    while batch := await s.next_batch():
                        queue.put_nowait((i, batch))
                except Exception as e:  # noqa: BLE001 - forwarded to the reader
                    queue.put_nowait((i, e))

            loop = asyncio.get_running_loop()
            pumps = [loop.create_task(pump(i, s)) for i, s in enumerate(streams)]
            while live:
                items = [await queue.get()]
                while not queue.empty():
                    items.append(queue.get_nowait())
                merged: dict[int, list[Delta]] = {}  # a choice's batches read together
                failure = None
                for i, item in items:
                    if isinstance(item, BaseException):
                        failure = failure or item
                    else:
                        merged.setdefault(i, []).extend(item)
                for i, batch in merged.items():
                    tracker.batch(i)
                    out.append(enc.deltas(i, batch))
                    if _finish(choices[i], batch):
                        live -= 1
                if failure is not None:
                    raise failure
                if live:
                    yield b"".join(out)
                    out = []
        usage = total_usage(req, choices)
        if req.include_usage:
            out.append(enc.usage(usage))
        out.append(DONE)
        tracker.done(usage["prompt_tokens"], usage["completion_tokens"])
        yield b"".join(out)
    except Exception as e:
        err = to_api_error(e)
        tracker.failed(err.code, err.status)
        yield b"".join(out) + error_event(err)
    except BaseException:
        tracker.failed("client_gone", 499)  # a no-op once done
        raise
    finally:
        for t in pumps:
            t.cancel()
        await close_all(streams)
