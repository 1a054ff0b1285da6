"""A TCP reset between a client and its broker (issue 19, defect 1).

ZeroMQ reconnects within its reconnect interval (0.1 s). The client keeps
its routing id across the reconnection, so the broker sees the same peer;
what was on the wire when the link broke may be lost both ways, so every
stream in flight goes again from exactly what it received. The caller sees
each stream whole (every id once, in order) with exactly one final.

The reset is real: a TCP proxy between the client and the broker's frontend
closes every connection through it with SO_LINGER 0 (a RST each way), and
ZeroMQ reconnects through it.
"""

from __future__ import annotations

import asyncio
import selectors
import socket
import struct
import threading

import zmq

from tests.conftest import FAST_HB
from tests.finals import count_finals
from zserve import AsyncClient, Client
from zserve.launcher import wait_for

TOKENS = 40
TOKEN_DELAY = 0.02  # 0.8 s a stream: the reset lands mid-stream
STREAMS = 4
RESET_AFTER = 8  # deltas read from every stream before the reset


class ResetProxy:
    """A loopback TCP proxy to ``target``; ``reset()`` ends every connection
    through it with a RST on both sides. New connections keep going through."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listen = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listen.getsockname()[1]}"
        self.accepted = 0  # connections made through the proxy, so far
        self._peer: dict[socket.socket, socket.socket] = {}
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._reset_asked = False
        self._reset_done = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="reset-proxy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        sel = self._sel
        sel.register(self._listen, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        while not self._stopping:
            for key, _ in sel.select(0.5):
                s = key.fileobj
                if s is self._listen:
                    self._accept()
                elif s is self._wake_r:
                    self._wake_r.recv(64)
                    if self._reset_asked:
                        self._reset_asked = False
                        for c in list(self._peer):
                            self._drop(c, rst=True)
                        self._reset_done.set()
                elif s in self._peer:  # (not dropped with its peer this turn)
                    assert isinstance(s, socket.socket)
                    self._forward(s)
        for c in list(self._peer):
            self._drop(c, rst=True)

    def _accept(self) -> None:
        c, _ = self._listen.accept()
        try:
            u = socket.create_connection(self._target)
        except OSError:
            c.close()
            return
        for s in (c, u):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sel.register(s, selectors.EVENT_READ)
        self._peer[c], self._peer[u] = u, c
        self.accepted += 1

    def _forward(self, s: socket.socket) -> None:
        try:
            data = s.recv(1 << 16)
            if data:
                self._peer[s].sendall(data)
                return
        except OSError:
            pass
        self._drop(s, rst=False)

    def _drop(self, s: socket.socket, rst: bool) -> None:
        for x in (s, self._peer.get(s)):
            if x is None or x not in self._peer:
                continue
            del self._peer[x]
            self._sel.unregister(x)
            if rst:
                x.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            x.close()

    def reset(self) -> None:
        """RST every connection through the proxy, now."""
        self._reset_done.clear()
        self._reset_asked = True
        self._wake_w.send(b"r")
        assert self._reset_done.wait(5), "the proxy did not reset"

    def close(self) -> None:
        self._stopping = True
        self._wake_w.send(b"s")
        self._thread.join(5)
        for s in (self._listen, self._wake_r, self._wake_w):
            s.close()


def _start(stack) -> ResetProxy:
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--token-delay", str(TOKEN_DELAY), *FAST_HB)
    stack.wait_workers(1)
    return ResetProxy(stack.frontend)


def _check(ids: list[int], text: str, finals: list[str]) -> None:
    assert ids == list(range(TOKENS))
    assert text == "".join(f"t{i} " for i in range(TOKENS))
    assert finals == ["length"]


def test_tcp_reset_mid_stream_sync_client_streams_complete_whole(stack):
    proxy = _start(stack)
    try:
        with Client(proxy.address, heartbeat_interval=0.2, timeout=20) as c:
            wire = count_finals(c)
            streams = [c.stream("m", "x", max_tokens=TOKENS) for _ in range(STREAMS)]
            got = [([], [], []) for _ in streams]  # ids, texts, finals per stream

            def read(i: int) -> None:
                d = next(streams[i])
                got[i][0].extend(d.token_ids or [])
                got[i][1].append(d.text)
                if d.finish_reason is not None:
                    got[i][2].append(d.finish_reason)

            while min(len(g[0]) for g in got) < RESET_AFTER:
                for i in range(STREAMS):
                    if len(got[i][0]) < RESET_AFTER:
                        read(i)
            assert proxy.accepted == 1
            proxy.reset()
            for i in range(STREAMS):
                while not got[i][2]:
                    read(i)
                assert next(streams[i], None) is None  # nothing after the final
            for ids, texts, finals in got:
                _check(ids, "".join(texts), finals)
            assert proxy.accepted >= 2  # ZeroMQ reconnected through the proxy
            wire.check()
    finally:
        proxy.close()
    # The broker ended no stream itself, and holds nothing of them.
    st = stack.status()
    assert not any(k.startswith("error.") for k in st["counters"]), st["counters"]
    wait_for(lambda: stack.status()["requests_in_flight"] == 0, 10, "nothing in flight")


def test_tcp_reset_mid_stream_async_client_streams_complete_whole(stack):
    proxy = _start(stack)

    async def run() -> list[tuple[list[int], str, list[str]]]:
        async with AsyncClient(proxy.address, heartbeat_interval=0.2, timeout=20) as ac:
            wire = count_finals(ac)
            progress = [0] * STREAMS
            reset = asyncio.Event()

            async def one(i: int) -> tuple[list[int], str, list[str]]:
                ids: list[int] = []
                text: list[str] = []
                finals: list[str] = []
                async for d in ac.stream("m", "x", max_tokens=TOKENS):
                    ids.extend(d.token_ids or [])
                    text.append(d.text)
                    if d.finish_reason is not None:
                        finals.append(d.finish_reason)
                    progress[i] = len(ids)
                    if min(progress) >= RESET_AFTER and not reset.is_set():
                        reset.set()
                        assert proxy.accepted == 1
                        proxy.reset()
                return ids, "".join(text), finals

            out = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(STREAMS))), 30)
            assert reset.is_set()
            wire.check()
            return out

    try:
        results = asyncio.run(run())
        assert proxy.accepted >= 2
    finally:
        proxy.close()
    for ids, text, finals in results:
        _check(ids, text, finals)
    st = stack.status()
    assert not any(k.startswith("error.") for k in st["counters"]), st["counters"]


def test_every_dealer_of_a_client_has_its_routing_id():
    """One random routing id per client, on each of its DEALERs (sync and
    async): a reconnection is the same peer to the broker."""
    eps = "tcp://127.0.0.1:1,tcp://127.0.0.1:2"
    with Client(eps) as a, Client(eps) as b:
        ac = AsyncClient(eps)
        try:
            for c in (a, b, ac):
                assert len(c.routing_id) == 16 and c.routing_id[0] != 0
                assert [s.getsockopt(zmq.ROUTING_ID) for s in c._dealers] == [c.routing_id] * 2
            assert len({a.routing_id, b.routing_id, ac.routing_id}) == 3
        finally:
            asyncio.run(ac.aclose())
