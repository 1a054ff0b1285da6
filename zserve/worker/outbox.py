"""Coalescing of deltas into messages: at most one message per client per step.

Request tasks ``put`` deltas; the sender task ``take``s everything pending
when it next runs. Tasks woken by one engine step all run before the sender
does, so their deltas leave together; under light load the sender runs the
moment a single delta exists. While the sender waits on a full socket, new
deltas for the same request merge into one, so memory stays bounded by what
the engine produced, never by the number of steps.
"""

from __future__ import annotations

import asyncio
from typing import Any

from zserve.protocol import Delta


class Outbox:
    def __init__(self) -> None:
        # client id -> request id -> pending delta (merged)
        self._pending: dict[bytes, dict[bytes, Delta]] = {}
        self._started: dict[bytes, list[bytes]] = {}
        self._finished: dict[bytes, list[bytes]] = {}
        self.ready = asyncio.Event()

    def put(self, client: bytes, rid: bytes, d: Delta, first: bool) -> None:
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
        if not self.ready.is_set():
            self.ready.set()

    def take(self) -> list[tuple[bytes, list[bytes], list[bytes], list[list[Any]]]]:
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
        self.ready.clear()
        return out

    def drop_all(self) -> None:
        self._pending.clear()
        self._started.clear()
        self._finished.clear()
        self.ready.clear()


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
