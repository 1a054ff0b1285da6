"""Coalescing of deltas into messages: at most one message per client per step.

Request tasks ``put`` deltas; the first ``put`` of a step schedules one
``flush`` with ``loop.call_soon``. Tasks woken by one engine step all run
before that flush does, so their deltas leave together; under light load the
flush runs the moment a single delta exists. While a send waits on a full
socket, flushing pauses and new deltas for the same request merge into one,
so memory stays bounded by what the engine produced, never by the number of
steps.

Deltas are turned into their wire records as they are put (a partial one is
``[rid, text, token_ids, nil, nil]``, built inline), so a flush hands each
client's records to the encoder as they are, with no per-record work.

No message may pass the broker's size limit, however long a send waits: a
record that merging has grown past ``RECORD_BUDGET`` is sealed (the next
delta starts a new record of the same request), large embedding results go
out as several records (``put_chunk``), and ``encode_message`` splits a
message between records once its payload passes ``MAX_PAYLOAD``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from zserve import protocol as p
from zserve.protocol import Delta

Message = tuple[bytes, list[bytes], list[bytes], list[list[Any]]]
# send(message) -> a future that is done once the message is on its way
Sender = Callable[[Message], "asyncio.Future[Any]"]


class Outbox:
    def __init__(self) -> None:
        # client id -> request id -> pending record (merged)
        self._pending: dict[bytes, dict[bytes, list[Any]]] = {}
        self._started: dict[bytes, list[bytes]] = {}
        self._finished: dict[bytes, list[bytes]] = {}
        # client id -> records closed to merging (over budget, embedding
        # chunks), in order; they go out before the client's pending ones
        self._sealed: dict[bytes, list[list[Any]]] = {}
        self._send: Sender | None = None
        self._scheduled = False  # a flush is queued on the loop
        self._blocked: asyncio.Future[Any] | None = None  # a send still waiting

    def attach(self, send: Sender | None) -> None:
        """Start (or, with None, stop) sending through ``send``."""
        self._send = send
        self._blocked = None
        if send is not None and self._pending:
            self._schedule()

    @property
    def empty(self) -> bool:
        return not self._pending and not self._sealed

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self, _: object = None) -> None:
        self._scheduled = False
        send = self._send
        if send is None or not (self._pending or self._sealed):
            return
        if self._blocked is not None and not self._blocked.done():
            return  # its done-callback flushes again
        fut = None
        for msg in self.take():
            fut = send(msg)
        if fut is not None and not fut.done():
            self._blocked = fut
            fut.add_done_callback(self.flush)

    def put(self, client: bytes, rid: bytes, d: Delta, first: bool, now: bool = False) -> None:
        """Queue ``d`` for the next flush; ``now``: flush at once (nothing else
        can join this step, e.g. a single request in flight).

        A partial delta travels as text, token ids, logprobs and tool calls;
        what else it carries (usage, ...) goes on the final record only.
        """
        per = self._pending.get(client)
        if per is None:
            per = self._pending[client] = {}
        rec = per.get(rid)
        if rec is None:
            if d.finish_reason is None:
                lp = d.logprobs
                extra = None if lp is None else {"logprobs": lp}
                if d.tool_calls:
                    extra = extra or {}
                    p.merge_tool_calls(extra.setdefault("tool_calls", []), d.tool_calls)
                per[rid] = [rid, d.text, d.token_ids, None, extra]
            else:
                per[rid] = d.record(rid)
                self._finished.setdefault(client, []).append(rid)
        else:
            _merge(rec, d)
            if d.finish_reason is not None:
                self._finished.setdefault(client, []).append(rid)
            elif _size(rec) > p.RECORD_BUDGET:
                # A send has waited long enough for this request's deltas to
                # pile up: close the record, the next delta starts another.
                del per[rid]
                self._sealed.setdefault(client, []).append(rec)
        if first:
            self._started.setdefault(client, []).append(rid)
        if now:
            self.flush()
        elif not self._scheduled:
            self._schedule()

    def put_chunk(self, client: bytes, rid: bytes, d: Delta, first: bool) -> None:
        """Queue a partial record that is never merged (a slice of a large
        embedding result); the request's later records follow it."""
        self._sealed.setdefault(client, []).append(d.record(rid))
        if first:
            self._started.setdefault(client, []).append(rid)
        self._schedule()

    def take(self) -> list[Message]:
        """Everything pending: (client, started, finished, records) per client."""
        started, finished = self._started, self._finished
        sealed = self._sealed
        if sealed:
            self._sealed = {}
            for client in sealed:
                self._pending.setdefault(client, {})
        out = [
            (
                client,
                started.pop(client, []),
                finished.pop(client, []),
                sealed.pop(client, []) + list(per.values()) if sealed else list(per.values()),
            )
            for client, per in self._pending.items()
        ]
        self._pending = {}
        return out

    def drop_all(self) -> None:
        self._pending.clear()
        self._started.clear()
        self._finished.clear()
        self._sealed.clear()


def _size(rec: list[Any]) -> int:
    """A cheap upper estimate of a partial record's encoded size."""
    n = len(rec[1]) * 4 + 16  # UTF-8: at most 4 bytes a character
    if rec[2]:
        n += 9 * len(rec[2])
    if rec[4] and rec[4].get("logprobs"):
        n += 256 * len(rec[4]["logprobs"])
    if rec[4] and rec[4].get("tool_calls"):
        for c in rec[4]["tool_calls"]:
            n += 64 + 4 * len(c.get("function", {}).get("arguments", ""))
    return n


def embeddings_per_record(vecs: list[list[float]]) -> int:
    """Vectors per record so that a record stays within ``RECORD_BUDGET``."""
    dim = len(vecs[0]) if vecs else 1
    return max(1, p.RECORD_BUDGET // (9 * dim + 8))


def encode_message(msg: Message, limit: int = p.MAX_PAYLOAD) -> list[tuple[bytes, bytes, bytes]]:
    """``(client, header, payload)`` for the wire, split between records while
    header and payload together pass ``limit``: a request is marked started
    with its first record's part and finished with its final record's part.

    A single record over ``limit`` (one huge delta: sealing keeps merged
    records near ``RECORD_BUDGET``) goes as several records of its text
    (``_slices``), so no frame nears the broker's ``MAX_MESSAGE_SIZE``.
    """
    client, started, finished, records = msg
    payload = p.encode_tokens(records)
    header = p.encode_header(started, finished)
    if len(payload) + len(header) <= limit:
        return [(client, header, payload)]
    if len(records) == 1:
        slices = _slices(records[0], limit)
        if slices is None:
            return [(client, header, payload)]
        records = slices
    half = len(records) // 2
    head, tail = records[:half], records[half:]
    in_head = {r[0] for r in head}
    final_in_head = {r[0] for r in head if r[3] is not None}
    return encode_message(
        (
            client,
            [r for r in started if r in in_head],
            [r for r in finished if r in final_in_head],
            head,
        ),
        limit,
    ) + encode_message(
        (
            client,
            [r for r in started if r not in in_head],
            [r for r in finished if r not in final_in_head],
            tail,
        ),
        limit,
    )


def _slices(rec: list[Any], limit: int) -> list[list[Any]] | None:
    """A record too big for one message, as several records of the same
    request, each within ``limit``: its text in slices, the first with its
    token ids, the last with its finish reason and extra; the others carry
    ``[]`` for ids where it had ids, so a client still counts them for
    resumption (every id, and the characters it got). None: its text is
    not what makes it big."""
    rid, text, ids, finish, extra = rec
    step = max(1, limit // 8)  # characters: UTF-8 takes 4 bytes a character at most
    if len(text) <= step:
        return None
    none_or_empty = None if ids is None else []
    out = [[rid, text[i : i + step], none_or_empty, None, None] for i in range(0, len(text), step)]
    out[0][2] = ids
    out[-1][3] = finish
    out[-1][4] = extra
    return out


def _merge(rec: list[Any], d: Delta) -> None:
    """Fold delta ``d`` into the earlier, still unsent record ``rec``."""
    if d.text:
        rec[1] += d.text
    if d.token_ids:
        rec[2] = d.token_ids if rec[2] is None else rec[2] + d.token_ids
    if d.logprobs:
        extra = rec[4]
        if extra is None:
            extra = rec[4] = {}
        extra["logprobs"] = extra.get("logprobs", []) + d.logprobs
    if d.tool_calls:
        extra = rec[4]
        if extra is None:
            extra = rec[4] = {}
        p.merge_tool_calls(extra.setdefault("tool_calls", []), d.tool_calls)
    if d.finish_reason is not None:
        rec[3] = d.finish_reason
        final = d.record(rec[0])[4]
        if final is not None:
            final.pop("logprobs", None)  # merged above
            final.pop("tool_calls", None)
        if final:
            if rec[4] is None:
                rec[4] = final
            else:
                rec[4].update(final)
