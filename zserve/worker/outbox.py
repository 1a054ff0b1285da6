"""Coalescing of deltas into messages: at most one message per client per step.

Request tasks ``put`` deltas; the first ``put`` of a step schedules one
``flush`` with ``loop.call_soon``. Tasks woken by one engine step all run
before that flush does, so their deltas leave together; under light load the
flush runs the moment a single delta exists. While a send waits on a full
socket, flushing pauses and new deltas for the same request merge into one,
so memory stays bounded by what the engine produced, never by the number of
steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from zserve.protocol import Delta

Message = tuple[bytes, list[bytes], list[bytes], list[list[Any]]]
# send(message) -> a future that is done once the message is on its way
Sender = Callable[[Message], "asyncio.Future[Any]"]


class Outbox:
    def __init__(self) -> None:
        # client id -> request id -> pending delta (merged)
        self._pending: dict[bytes, dict[bytes, Delta]] = {}
        self._started: dict[bytes, list[bytes]] = {}
        self._finished: dict[bytes, list[bytes]] = {}
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
        return not self._pending

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self, _: object = None) -> None:
        self._scheduled = False
        send = self._send
        if send is None or not self._pending:
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
        can join this step, e.g. a single request in flight)."""
        per = self._pending.get(client)
        if per is None:
            per = self._pending[client] = {}
        prev = per.get(rid)
        if prev is None:
            per[rid] = d
        else:
            _merge(prev, d)
        if first:
            self._started.setdefault(client, []).append(rid)
        if d.finish_reason is not None:
            self._finished.setdefault(client, []).append(rid)
        if now:
            self.flush()
        elif not self._scheduled:
            self._schedule()

    def take(self) -> list[Message]:
        """Everything pending: (client, started, finished, records) per client."""
        out = []
        for client, per in self._pending.items():
            out.append(
                (
                    client,
                    self._started.pop(client, []),
                    self._finished.pop(client, []),
                    [d.record(rid) for rid, d in per.items()],
                )
            )
        self._pending = {}
        return out

    def drop_all(self) -> None:
        self._pending.clear()
        self._started.clear()
        self._finished.clear()


def _merge(a: Delta, b: Delta) -> None:
    """Fold delta ``b`` into the earlier, still unsent delta ``a``."""
    a.text += b.text
    if b.token_ids:
        a.token_ids = (a.token_ids or []) + b.token_ids
    if b.logprobs:
        a.logprobs = (a.logprobs or []) + b.logprobs
    if b.finish_reason is not None:
        a.finish_reason = b.finish_reason
        a.usage = b.usage
        a.error = b.error
        a.embeddings = b.embeddings
        a.result = b.result
