"""Dispatch policies: pick one worker among those with a free slot.

Pure functions of the candidates and a random source, so their balance and
proportions are tested without sockets.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from zserve.broker.prefix_map import PrefixMap
from zserve.broker.registry import WorkerState

Policy = Callable[[str, Sequence[WorkerState], random.Random], WorkerState]


def shortest_queue(model: str, ws: Sequence[WorkerState], rng: random.Random) -> WorkerState:
    """Lowest in-flight / speed, by the broker's own count; ties at random."""
    best = min(w.load for w in ws)
    tied = [w for w in ws if w.load == best]
    return tied[0] if len(tied) == 1 else rng.choice(tied)


def lottery(model: str, ws: Sequence[WorkerState], rng: random.Random) -> WorkerState:
    """At random, in proportion to advertised speed."""
    if len(ws) == 1:
        return ws[0]
    return rng.choices(ws, weights=[w.info.speed for w in ws])[0]


def power_of_two(model: str, ws: Sequence[WorkerState], rng: random.Random) -> WorkerState:
    """Two at random, the less loaded of them."""
    if len(ws) == 1:
        return ws[0]
    a, b = rng.sample(list(ws), 2)
    if a.load == b.load:
        return a if rng.random() < 0.5 else b
    return a if a.load < b.load else b


class RoundRobin:
    """Each model's workers in turn (skipping full ones)."""

    def __init__(self) -> None:
        self._turn: dict[str, int] = {}

    def __call__(self, model: str, ws: Sequence[WorkerState], rng: random.Random) -> WorkerState:
        i = self._turn.get(model, 0)
        self._turn[model] = i + 1
        return ws[i % len(ws)]


# cache_aware defaults (BrokerConfig and ``zserve broker`` flags carry them).
CACHE_MAP_SIZE = 65_536  # prefix map entries, at most (about 200 bytes each)
CACHE_THRESHOLD_ABS = 4.0  # load (requests / speed) above the least loaded ...
CACHE_THRESHOLD_REL = 1.5  # ... and times it, past which the prefix loses
SESSION_BALANCE = 1.25  # a session's worker may carry this x the mean load (+1)
RING_VNODES = 16  # points per worker on the session ring


class CacheAware:
    """Send a request where its prompt's prefix was sent before.

    ``session``: a session key (8 bytes) goes by consistent hashing with
    bounded load: the first worker clockwise from the key on a ring of worker
    points whose load, with this request, stays within ``session_balance`` x
    the mean (rounded up). ``chain``: the prompt's prefix hashes; the worker
    holding the longest prefix wins unless its load exceeds the least loaded
    worker's by more than ``threshold_abs`` and more than ``threshold_rel``
    times, else shortest_queue. Either way the chain is recorded for the
    worker chosen. Counts go to ``counters``: cache_hits, cache_misses (no
    prefix held, or the load threshold overrode it: also cache_overridden),
    session_dispatches.
    """

    routed = True

    def __init__(
        self,
        max_entries: int = CACHE_MAP_SIZE,
        threshold_abs: float = CACHE_THRESHOLD_ABS,
        threshold_rel: float = CACHE_THRESHOLD_REL,
        session_balance: float = SESSION_BALANCE,
        counters: Counter[str] | None = None,
    ) -> None:
        if threshold_abs < 0 or threshold_rel < 1 or session_balance < 1:
            raise ValueError(
                "cache_aware needs threshold_abs >= 0, threshold_rel >= 1, session_balance >= 1"
            )
        self.map = PrefixMap(max_entries)
        self.threshold_abs = threshold_abs
        self.threshold_rel = threshold_rel
        self.session_balance = session_balance
        self.counters: Counter[str] = Counter() if counters is None else counters
        self._ring: dict[bytes, list[int]] = {}  # identity -> its ring points

    def __call__(
        self,
        model: str,
        ws: Sequence[WorkerState],
        rng: random.Random,
        session: bytes | None = None,
        chain: Sequence[bytes] | None = None,
    ) -> WorkerState:
        if session is not None:
            self.counters["session_dispatches"] += 1
            w = self._by_session(session, ws)
        else:
            w = self._by_prefix(chain, ws) if chain else None
            if w is None:
                w = shortest_queue(model, ws, rng)
        if chain:
            self.map.record(chain, w.identity)
        return w

    def _by_prefix(self, chain: Sequence[bytes], ws: Sequence[WorkerState]) -> WorkerState | None:
        n, found = self.map.longest(chain, {w.identity: w for w in ws})
        if not n:
            self.counters["cache_misses"] += 1
            return None
        best = found[0] if len(found) == 1 else min(found, key=_load)
        least = min(w.load for w in ws)
        if best.load - least > self.threshold_abs and best.load > least * self.threshold_rel:
            self.counters["cache_misses"] += 1
            self.counters["cache_overridden"] += 1
            return None
        self.counters["cache_hits"] += 1
        return best

    def _by_session(self, session: bytes, ws: Sequence[WorkerState]) -> WorkerState:
        if len(ws) == 1:
            return ws[0]
        key = int.from_bytes(session, "big")
        total = sum(w.load for w in ws)
        bound = math.ceil(self.session_balance * (total + 1) / len(ws))
        by_dist = sorted(ws, key=lambda w: min((x - key) % _RING for x in self._points(w)))
        for w in by_dist:
            if w.load + 1 / w.info.speed <= bound:
                return w
        return min(ws, key=_load)

    def _points(self, w: WorkerState) -> list[int]:
        pts = self._ring.get(w.identity)
        if pts is None:
            pts = self._ring[w.identity] = [
                int.from_bytes(
                    hashlib.blake2b(w.identity + bytes((i,)), digest_size=8).digest(), "big"
                )
                for i in range(RING_VNODES)
            ]
        return pts

    def forget_worker(self, identity: bytes) -> None:
        """A worker left: out of the map and off the ring, at once."""
        self.map.forget(identity)
        self._ring.pop(identity, None)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        hits, misses = c["cache_hits"], c["cache_misses"]
        return {
            "entries": len(self.map),
            "max_entries": self.map.max_entries,
            "evicted": self.map.evicted,
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else None,
            "sessions": c["session_dispatches"],
        }


_RING = 1 << 64


def _load(w: WorkerState) -> float:
    return w.load


POLICIES = ("shortest_queue", "lottery", "round_robin", "power_of_two", "cache_aware")


def make_policy(name: str, options: dict[str, Any] | None = None) -> Policy:
    """``options``: keyword arguments of ``CacheAware`` (other policies take none)."""
    if name == "cache_aware":
        return CacheAware(**(options or {}))
    if name == "shortest_queue":
        return shortest_queue
    if name == "lottery":
        return lottery
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return power_of_two
    raise ValueError(f"unknown dispatch policy {name!r}; choose from {', '.join(POLICIES)}")
