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

Pure code, no sockets: the broker's loop calls ``handle`` for the store's
QUERY services (``protocol.SERVICE_STORE_*``).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from zserve import protocol as p

DEFAULT_MAX_COUNT = 10_000  # entries (zserve broker --store-max-count)
DEFAULT_MAX_BYTES = 64 * 1024 * 1024  # bytes of keys and values (--store-max-bytes)


class BoundedStore:
    """key -> bytes, at most ``max_count`` entries and ``max_bytes`` bytes."""

    def __init__(self, max_count: int = DEFAULT_MAX_COUNT, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_count < 0 or max_bytes < 0:
            raise ValueError("store bounds must be >= 0")
        self.max_count = max_count
        self.max_bytes = max_bytes
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
        return True

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

    def handle(self, service: bytes, args: list[bytes]) -> Any:
        """One store QUERY's answer; ValueError for a malformed one.

        ``store.put`` [key, value] -> true, or false when the value cannot
        fit; ``store.get`` [key] -> the value, or nil; ``store.delete``
        [key] -> whether it was there."""
        want = 2 if service == p.SERVICE_STORE_PUT else 1
        if len(args) != want:
            raise ValueError(f"{service.decode()} takes {want} frame(s) after the service")
        key = args[0]
        if not key or len(key) > p.MAX_STORE_KEY:
            raise ValueError(f"a store key has 1 to {p.MAX_STORE_KEY} bytes")
        if service == p.SERVICE_STORE_PUT:
            return self.put(key, args[1])
        if service == p.SERVICE_STORE_GET:
            return self.get(key)
        return self.delete(key)
