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
  response is written to the brokers before its reply (the JSON body, or
  the stream's last event) leaves the gateway, and the reply waits for no
  answer; a gateway killed in that instant can lose the responses whose
  writes were still in its own socket buffers.
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
from typing import Any

from zserve import protocol as p
from zserve.client import AsyncClient

log = logging.getLogger(__name__)

STORE_TIMEOUT = 2.0  # seconds a read or delete waits for the brokers


class SharedStore:
    """The gateway's handle on the brokers' store. ``client``: the
    gateway's broker client, looked up on each call (it exists only while
    the gateway runs)."""

    def __init__(self, client: Callable[[], AsyncClient], timeout: float = STORE_TIMEOUT):
        self._client = client
        self.timeout = timeout
        self.failed_puts = 0  # writes a broker refused or never answered
        self._puts: set[asyncio.Future[bool]] = set()  # writes not yet answered

    def _links(self) -> range:
        return range(len(self._client().addresses))

    async def put(self, key: str, value: bytes) -> asyncio.Future[bool]:
        """Write to every broker. Returns once each write is on its socket
        (queued in order behind what the gateway sent before), with a future
        of whether any broker took it; nothing needs to wait for it (a
        failure is logged and counted)."""
        c = self._client()
        k = key.encode()
        calls = [
            asyncio.ensure_future(c.query(p.SERVICE_STORE_PUT, k, value, link=i))
            for i in self._links()
        ]
        await asyncio.sleep(0)  # each call's first step sends its write
        fut = asyncio.ensure_future(self._gather(calls))
        self._puts.add(fut)  # (the loop holds tasks weakly)
        fut.add_done_callback(self._puts.discard)
        return fut

    async def _gather(self, calls: list[asyncio.Future[Any]]) -> bool:
        results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r is True for r in results]
        if not all(ok):
            self.failed_puts += ok.count(False)
            why = [r if isinstance(r, BaseException) else "no room" for r in results
                   if r is not True]  # fmt: skip
            log.warning("a stored response reached %d of %d brokers: %s", sum(ok), len(ok), why)
        return any(ok)

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
