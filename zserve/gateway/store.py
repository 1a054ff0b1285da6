"""Stored responses (``/v1/responses`` with ``store``), shared by every
gateway through the brokers.

No store of its own, and nothing beside the brokers: each broker holds a
bounded map of opaque values for its gateways (``zserve/broker/store.py``,
the QUERY services ``store.put``, ``store.get``, ``store.delete``). A
gateway writes each stored response to every broker it knows, reads from
all of them at once (the first that has it answers) and deletes on all, so
a response created through one gateway can be fetched, continued or deleted
through any other that shares a broker with it.

What survives what:

* A gateway restart loses nothing that was stored: the brokers hold it. A
  response's write asks no answer (an answer would cost each request a
  broker round trip of CPU) and may wait up to ``PUT_WITHIN`` (10 ms) to
  leave with the gateway's next message to that broker (``tell``'s
  ``within``): a write alone wakes the broker for itself, which on a loaded
  2-core machine costs it about 100 us of CPU, as much as the token frames
  of a whole stream. So the write can reach the broker just after the reply
  (the JSON body, or the stream's last event) has left the gateway; a
  broker's read of a key it does not hold waits for its write
  (``zserve broker --store-wait``, 0.25 s) before it answers absent, so a
  continuation sent through another gateway at once still finds it. A
  gateway's own reads and deletes go after its held writes. A gateway
  stopped in order sends what it holds; one killed can lose the writes of
  its last 10 ms and those still in its socket buffers, and a write to a
  broker the gateway takes for dead is dropped (counted, logged) while
  the others keep it.
* A broker restart loses that broker's copies; with several brokers, the
  others still answer. With one broker, every stored response is gone.
* Each broker keeps at most ``--store-max-count`` responses and
  ``--store-max-bytes`` bytes, oldest out first. An id that was evicted,
  deleted, or never stored reads as absent: a 404 that says so.

Known limit: a broker unreachable while a response is deleted keeps its
copy, and answers it again once reachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from zserve import protocol as p
from zserve.client import AsyncClient

log = logging.getLogger(__name__)

STORE_TIMEOUT = 2.0  # seconds a read or delete waits for the brokers
PUT_WITHIN = 0.01  # seconds a write may wait for company to its broker


class SharedStore:
    """The gateway's handle on the brokers' store. ``client``: the
    gateway's broker client, looked up on each call (it exists only while
    the gateway runs)."""

    def __init__(self, client: Callable[[], AsyncClient], timeout: float = STORE_TIMEOUT):
        self._client = client
        self.timeout = timeout
        self.failed_puts = 0  # writes not sent to a broker (it was taken for dead)

    def _links(self) -> range:
        return range(len(self._client().addresses))

    def put(self, key: str, value: bytes) -> bool:
        """Write to every broker, asking no answer: on each socket within
        ``PUT_WITHIN``, in order with what the gateway sends. A broker taken for
        dead gets it only if its socket has room at once; what is dropped is
        counted (``failed_puts``) and logged. True: at least one took it."""
        c = self._client()
        k = key.encode()
        took = 0
        for i in self._links():
            try:
                ok = c.tell(p.SERVICE_STORE_PUT, k, value, link=i, within=PUT_WITHIN)
            except Exception:  # noqa: BLE001 - the client is closing
                ok = False
            took += ok
        if took < len(self._links()):
            self.failed_puts += len(self._links()) - took
            log.warning("a stored response reached %d of %d brokers (unreachable)",
                        took, len(self._links()))  # fmt: skip
        return took > 0

    async def get(self, key: str) -> bytes | None:
        """The value from the first broker that has it; None when none
        does (or none answers in time)."""
        c = self._client()
        k = key.encode()
        pending = {
            asyncio.ensure_future(c.query(p.SERVICE_STORE_GET, k, link=i)) for i in self._links()
        }
        try:
            async with asyncio.timeout(self.timeout):
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        if not t.cancelled() and t.exception() is None:
                            v = t.result()
                            if isinstance(v, bytes):
                                return v
        except TimeoutError:
            log.warning("no broker answered a stored response read in %g s", self.timeout)
        finally:
            for t in pending:
                t.cancel()
        return None

    async def delete(self, key: str) -> bool:
        """Delete on every broker; whether any held it."""
        c = self._client()
        k = key.encode()
        calls = [c.query(p.SERVICE_STORE_DELETE, k, link=i) for i in self._links()]
        try:
            async with asyncio.timeout(self.timeout):
                results = await asyncio.gather(*calls, return_exceptions=True)
        except TimeoutError:
            return False
        return any(r is True for r in results)
