"""The response store over real sockets: a gateway's write may be held a
few milliseconds to ride with its next message (``AsyncClient.tell``'s
``within``), and a broker's read of a key it does not hold waits for the
write (``--store-wait``), so a read that overtakes the write still finds it."""

from __future__ import annotations

import asyncio

from tests.conftest import FAST_HB, Stack
from zserve import protocol as p
from zserve.client import AsyncClient


def test_a_read_that_overtakes_the_write_waits_for_it(stack: Stack) -> None:
    stack.start_broker("--store-wait", "5", *FAST_HB)
    fe = stack.frontend

    async def go() -> None:
        async with AsyncClient(fe, timeout=10) as reader, AsyncClient(fe, timeout=10) as writer:
            await reader.status()  # both connected first
            await writer.status()
            read = asyncio.ensure_future(reader.query(p.SERVICE_STORE_GET, b"k"))
            deleted = asyncio.ensure_future(reader.query(p.SERVICE_STORE_DELETE, b"d"))
            await asyncio.sleep(0.3)  # at the broker, waiting
            assert not read.done() and not deleted.done()
            assert writer.tell(p.SERVICE_STORE_PUT, b"k", b"value")
            assert writer.tell(p.SERVICE_STORE_PUT, b"d", b"gone soon")
            assert await asyncio.wait_for(read, 5) == b"value"
            assert await asyncio.wait_for(deleted, 5) is True
            assert (await reader.status())["store"]["count"] == 1  # k, not d

    asyncio.run(go())


def test_a_read_of_what_was_never_written_is_absent_after_the_wait(stack: Stack) -> None:
    stack.start_broker("--store-wait", "0.2", *FAST_HB)
    fe = stack.frontend

    async def go() -> None:
        async with AsyncClient(fe, timeout=10) as c:
            assert await c.query(p.SERVICE_STORE_GET, b"never") is None
            assert await c.query(p.SERVICE_STORE_DELETE, b"never") is False
            assert (await c.status())["store"]["count"] == 0

    asyncio.run(go())


def test_a_held_write_leaves_with_the_next_message_or_alone_or_at_close(stack: Stack) -> None:
    stack.start_broker("--store-wait", "0.1", *FAST_HB)
    fe = stack.frontend

    async def go() -> None:
        async with AsyncClient(fe, timeout=10) as other:
            async with AsyncClient(fe, timeout=10) as writer:
                await writer.status()
                # held for up to 60 s: the broker does not have it yet ...
                assert writer.tell(p.SERVICE_STORE_PUT, b"held", b"1", within=60)
                assert await other.query(p.SERVICE_STORE_GET, b"held") is None
                # ... until the writer sends anything: the write goes first
                assert await writer.query(p.SERVICE_STORE_GET, b"held") == b"1"
                assert await other.query(p.SERVICE_STORE_GET, b"held") == b"1"
                # alone, it leaves within its delay
                assert writer.tell(p.SERVICE_STORE_PUT, b"alone", b"2", within=0.05)
                for _ in range(100):
                    if await other.query(p.SERVICE_STORE_GET, b"alone") == b"2":
                        break
                else:
                    raise AssertionError("a held write never left by itself")
                # a client that closes in order sends what it holds
                assert writer.tell(p.SERVICE_STORE_PUT, b"at-close", b"3", within=60)
            assert await other.query(p.SERVICE_STORE_GET, b"at-close") == b"3"

    asyncio.run(go())
