"""The response store a broker holds for its gateways: a bounded map from
key to opaque bytes, oldest out first.

The gateways' Responses API (``store``, ``previous_response_id``,
``GET``/``DELETE /v1/responses/{id}``) keeps each stored response here, on
every broker a gateway knows, so that any gateway can fetch or continue a
response another one created, with nothing beside the brokers. The broker
never decodes what it holds.

Bounded twice: at most ``max_count`` entries and ``max_bytes`` bytes of
keys and values together. A put that passes either bound evicts the oldest
entries (by when they were put) until both hold; a value larger than
``max_bytes`` by itself is refused. What was evicted or never put reads as
absent: the gateway turns that into a 404 that says so.

A gateway may hold a write back for a few milliseconds so that it rides
with its next message (``gateway/store.py``), and so reach the broker just
after the reply it stores has left the gateway. A read or delete of a key
that is not here therefore waits up to ``wait_s`` for a write of that key
before it answers absent (at most ``MAX_WAITS`` of them at once; beyond
that, absent at once): a continuation sent through another gateway the
moment a response ended finds it.

Pure code, no sockets: the broker's loop calls ``handle`` for the store's
QUERY services (``protocol.SERVICE_STORE_*``).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Any

from zserve import protocol as p

DEFAULT_MAX_COUNT = 10_000  # entries (zserve broker --store-max-count)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # bytes of keys and values (--store-max-bytes)
DEFAULT_WAIT_S = 0.25  # how long a read of a missing key waits for its write
MAX_WAITS = 1024  # reads and deletes waiting at once
WAITING = object()  # handle's answer for a read that waits (see take_answers)


class BoundedStore:
    """key -> bytes, at most ``max_count`` entries and ``max_bytes`` bytes."""

    def __init__(
        self,
        max_count: int = DEFAULT_MAX_COUNT,
        max_bytes: int = DEFAULT_MAX_BYTES,
        wait_s: float = DEFAULT_WAIT_S,
    ):
        if max_count < 0 or max_bytes < 0 or wait_s < 0:
            raise ValueError("store bounds must be >= 0")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.wait_s = wait_s
        # key -> the reads and deletes waiting for it: (service, who)
        self._waits: dict[bytes, list[tuple[bytes, Any]]] = {}
        self._wait_q: deque[tuple[float, bytes, tuple[bytes, Any]]] = deque()  # by deadline
        self._answers: list[tuple[Any, Any]] = []  # (who, answer) of waits that ended
        self._waiting: set[Any] = set()  # who waits now
        self._items: OrderedDict[bytes, bytes] = OrderedDict()  # oldest first
        self.bytes = 0  # keys and values held
        self.evicted = 0  # entries put out to make room, since start

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: bytes) -> bool:
        return key in self._items

    def put(self, key: bytes, value: bytes) -> bool:
        """Hold ``value`` under ``key`` (the newest entry now), evicting the
        oldest as needed; False (and nothing changes) when it cannot fit."""
        size = len(key) + len(value)
        if size > self.max_bytes or self.max_count == 0:
            return False
        self.delete(key)
        items = self._items
        while items and (len(items) >= self.max_count or self.bytes + size > self.max_bytes):
            k, v = items.popitem(last=False)
            self.bytes -= len(k) + len(v)
            self.evicted += 1
        items[key] = value
        self.bytes += size
        waiting = self._waits.pop(key, None)
        if waiting:
            for service, who in waiting:
                self._waiting.discard(who)
                self._answers.append((who, self._answer(service, key)))
        return True

    def _answer(self, service: bytes, key: bytes) -> Any:
        return self.get(key) if service == p.SERVICE_STORE_GET else self.delete(key)

    @property
    def next_deadline(self) -> float | None:
        """When the oldest waiting read gives up (``expire``), if any waits."""
        return self._wait_q[0][0] if self._wait_q else None

    def expire(self, now: float) -> None:
        """Reads and deletes that waited ``wait_s`` for nothing: absent."""
        q = self._wait_q
        while q and q[0][0] <= now:
            _, key, entry = q.popleft()
            waiting = self._waits.get(key)
            if waiting is None or entry not in waiting:
                continue  # answered by a write
            waiting.remove(entry)
            if not waiting:
                del self._waits[key]
            self._waiting.discard(entry[1])
            self._answers.append((entry[1], self._answer(entry[0], key)))

    def is_waiting(self, who: Any) -> bool:
        """Whether ``who``'s read or delete waits here for a write."""
        return who in self._waiting

    def waits_of(self, client: Any) -> bool:
        """Whether a read or delete of ``client``'s waits (``who`` being
        (client, request id), as the broker gives it)."""
        return bool(self._waiting) and any(w[0] == client for w in self._waiting)

    def take_answers(self) -> list[tuple[Any, Any]]:
        """The (who, answer) of waits that ended since the last call."""
        answers, self._answers = self._answers, []
        return answers

    def get(self, key: bytes) -> bytes | None:
        return self._items.get(key)

    def delete(self, key: bytes) -> bool:
        v = self._items.pop(key, None)
        if v is None:
            return False
        self.bytes -= len(key) + len(v)
        return True

    def stats(self) -> dict[str, int]:
        return {
            "count": len(self._items),
            "bytes": self.bytes,
            "max_count": self.max_count,
            "max_bytes": self.max_bytes,
            "evicted": self.evicted,
        }

    def handle(self, service: bytes, args: list[bytes], who: Any = None, now: float = 0.0) -> Any:
        """One store QUERY's answer; ValueError for a malformed one.

        ``store.put`` [key, value] -> true, or false when the value cannot
        fit; ``store.get`` [key] -> the value, or nil; ``store.delete``
        [key] -> whether it was there. A read or delete by ``who`` (None:
        one that wants no answer) of a key not here waits: ``WAITING``,
        and its answer comes from ``take_answers`` once the key is written
        or ``wait_s`` after ``now``."""
        want = 2 if service == p.SERVICE_STORE_PUT else 1
        if len(args) != want:
            raise ValueError(f"{service.decode()} takes {want} frame(s) after the service")
        key = args[0]
        if not key or len(key) > p.MAX_STORE_KEY:
            raise ValueError(f"a store key has 1 to {p.MAX_STORE_KEY} bytes")
        if service == p.SERVICE_STORE_PUT:
            return self.put(key, args[1])
        if (
            key not in self._items
            and who is not None
            and self.wait_s > 0
            and len(self._wait_q) < MAX_WAITS
        ):
            entry = (service, who)
            self._waiting.add(who)
            self._waits.setdefault(key, []).append(entry)
            self._wait_q.append((now + self.wait_s, key, entry))
            return WAITING
        return self._answer(service, key)
