"""Dispatch policies: pick one worker among those with a free slot.

Pure functions of the candidates and a random source, so their balance and
proportions are tested without sockets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

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


POLICIES = ("shortest_queue", "lottery", "round_robin", "power_of_two")


def make_policy(name: str) -> Policy:
    if name == "shortest_queue":
        return shortest_queue
    if name == "lottery":
        return lottery
    if name == "round_robin":
        return RoundRobin()
    if name == "power_of_two":
        return power_of_two
    raise ValueError(f"unknown dispatch policy {name!r}; choose from {', '.join(POLICIES)}")
