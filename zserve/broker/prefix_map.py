"""The approximate prefix map behind ``cache_aware`` dispatch: prefix hash ->
the workers it was sent to, with a hard bound on entries and LRU eviction.

Pure state, no sockets. A prefix hash (``protocol.prefix_chain``) covers every
block before it, so one hash names a whole prefix: the longest match of a
request is its last hash found in the map. Entries are touched from the last
block to the first, so a shared beginning (a system prompt) is the most
recently used and the last to be evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")

MAX_PER_ENTRY = 4  # workers remembered per prefix, most recent last


class PrefixMap:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("the prefix map needs room for at least one entry")
        self.max_entries = max_entries
        # hash -> identities of the workers it was sent to (most recent last),
        # least recently used first
        self._d: OrderedDict[bytes, tuple[bytes, ...]] = OrderedDict()
        self.evicted = 0  # entries dropped for room, ever

    def __len__(self) -> int:
        return len(self._d)

    def longest(
        self, chain: Sequence[bytes], candidates: Mapping[bytes, T]
    ) -> tuple[int, list[T]]:
        """(blocks matched, the candidates that hold that prefix), for the
        longest prefix of ``chain`` held by any of ``candidates`` (by
        identity); (0, []) when none holds any."""
        d = self._d
        for i in range(len(chain) - 1, -1, -1):
            ids = d.get(chain[i])
            if ids is None:
                continue
            found = [candidates[x] for x in ids if x in candidates]
            if found:
                return i + 1, found
        return 0, []

    def record(self, chain: Sequence[bytes], identity: bytes) -> None:
        """``chain`` was sent to worker ``identity``."""
        d = self._d
        for h in reversed(chain):  # the first block ends most recently used
            ids = d.get(h)
            if ids is None:
                d[h] = (identity,)
            else:
                if ids[-1] != identity:
                    keep = tuple(x for x in ids if x != identity)[-(MAX_PER_ENTRY - 1):]
                    d[h] = (*keep, identity)
                d.move_to_end(h)
        over = len(d) - self.max_entries
        if over > 0:
            self.evicted += over
            for _ in range(over):
                d.popitem(last=False)

    def forget(self, identity: bytes) -> int:
        """Drop a worker from every entry (it left); returns the entries that
        named it. O(entries): it happens once per worker that leaves."""
        d = self._d
        n = 0
        for h, ids in list(d.items()):
            if identity in ids:
                n += 1
                rest = tuple(x for x in ids if x != identity)
                if rest:
                    d[h] = rest  # an existing key keeps its place
                else:
                    del d[h]
        return n

    def holders(self, h: bytes) -> tuple[bytes, ...]:
        return self._d.get(h, ())
