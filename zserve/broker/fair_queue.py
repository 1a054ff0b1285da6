"""The broker's wait queue for one model when tenants are configured: higher
priority classes first, fair shares within a class, and aging so that no
class waits forever. Pure state; time comes from ``clock`` (injected in the
tests).

The rule, each time a worker has room for this model:

1. Each tenant waiting here has its own FIFO. Its head request's *class* is
   the tenant's ``priority`` plus one for every ``aging_seconds`` the
   request has waited (aging): a batch request that waits long enough rises
   above fresh interactive ones, so a lower class still progresses.
2. The highest class goes first. Within it, the tenant with the lowest
   *virtual token counter* goes (a virtual-token-counter fair queue, Sheng
   et al., "Fairness in Serving Large Language Models", OSDI 2024): each
   dispatch adds the request's expected tokens / the tenant's ``weight``
   to its counter, corrected at the final with its real usage
   (``Tenancy.settle``). Tenants that stay backlogged are thus served tokens
   in proportion to their weights. Ties: the tenant with fewer requests
   running (one just lifted to the others' counter goes first), then the
   request that waited longest.
3. Counters cannot bank idle time: a tenant that starts waiting while
   others wait is lifted to the lowest counter among them, and one that
   starts waiting in an empty queue to the highest counter of all, so every
   contention period starts even.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from zserve.broker.tenants import Tenancy, TenantState


class Queued(Protocol):
    """What the queue reads of a request (the broker's PendingRequest)."""

    tenant: TenantState | None
    queued_at: float
    deadline: float


class FairQueue:
    """Drop-in for the broker's per-model deque: ``append``, ``appendleft``
    (ahead of newer requests of its tenant), ``popleft`` (the next by the
    rule above), ``remove``, ``len``; plus ``expired``."""

    def __init__(self, tenancy: Tenancy, clock: Callable[[], float] = time.monotonic) -> None:
        self.tenancy = tenancy
        self.clock = clock
        self._fifos: dict[TenantState, deque[Any]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __iter__(self) -> Iterator[Any]:
        for q in self._fifos.values():
            yield from q

    def append(self, req: Queued, left: bool = False) -> None:
        st = req.tenant
        assert st is not None
        if not req.queued_at:
            req.queued_at = self.clock()
        q = self._fifos.get(st)
        if q is None:
            self._lift(st)
            q = self._fifos[st] = deque()
        if left:
            q.appendleft(req)
        else:
            q.append(req)
        st.queued += 1
        self._len += 1

    def appendleft(self, req: Queued) -> None:
        self.append(req, left=True)

    def popleft(self) -> Any:
        if not self._len:
            raise IndexError("pop from an empty FairQueue")
        now = self.clock()
        aging = self.tenancy.table.aging_seconds
        best: tuple[float, float, int, float] | None = None
        pick: TenantState | None = None
        for st, q in self._fifos.items():
            head = q[0]
            cls = st.spec.priority + math.floor((now - head.queued_at) / aging)
            key = (-cls, st.vtc, st.in_flight - st.queued, head.queued_at)
            if best is None or key < best:
                best, pick = key, st
        assert pick is not None
        req = self._take(pick)
        self.tenancy.queue_wait(pick, now - req.queued_at)
        return req

    def remove(self, req: Queued) -> None:
        st = req.tenant
        q = self._fifos.get(st) if st is not None else None
        if q is None:
            raise ValueError("request not queued")
        q.remove(req)
        self._removed(st, q)  # type: ignore[arg-type]

    def expired(self, now: float) -> list[Any]:
        """Take out every request whose deadline has passed."""
        out = []
        for st, q in list(self._fifos.items()):
            if any(r.deadline < now for r in q):
                keep = deque(r for r in q if r.deadline >= now)
                out.extend(r for r in q if r.deadline < now)
                n = len(q) - len(keep)
                st.queued -= n
                self._len -= n
                if keep:
                    self._fifos[st] = keep
                else:
                    del self._fifos[st]
        return out

    def _take(self, st: TenantState) -> Any:
        q = self._fifos[st]
        req = q.popleft()
        st.queued -= 1
        self._len -= 1
        if not q:
            del self._fifos[st]
        return req

    def _removed(self, st: TenantState, q: deque[Any]) -> None:
        st.queued -= 1
        self._len -= 1
        if not q:
            del self._fifos[st]

    def _lift(self, st: TenantState) -> None:
        """``st`` starts waiting: no credit for the time it did not."""
        if self._fifos:
            st.vtc = max(st.vtc, min(o.vtc for o in self._fifos))
        else:
            st.vtc = max(st.vtc, max(o.vtc for o in self.tenancy.states.values()))
