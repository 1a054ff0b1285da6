"""Usage reports between the brokers of one set, for limits held across it
(``tenants.py`` says what a report holds and what is done with it).

Socket roles: each broker binds one PUB (``--peer-bind``) and connects one
SUB to each peer's PUB (``--peer``, repeatable), so each report reaches
every peer and each SUB says which peer spoke. A report is one message::

    [ZSB1, broker_id (8 random bytes per broker process), report (msgpack)]

every sync interval. Reports carry cumulative counts, so a report dropped
(PUB drops for a slow peer, a peer that joins late) loses nothing but
freshness; a ``broker_id`` that changes is a restarted peer, whose counts
start over. With CURVE the PUB is a CURVE server whose only allowed client
is the broker set's own key pair (the brokers of a set share one, as their
clients know one server key), and each SUB a CURVE client with that pair.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from typing import Any

import zmq

from zserve import protocol as p
from zserve._loopsock import recv_frames, send_frames
from zserve.security import BrokerAuth

log = logging.getLogger(__name__)

_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
MAX_REPORTS = 64  # read from one peer per poll, at most


class PeerLink:
    def __init__(
        self,
        ctx: zmq.Context,
        bind: str,
        peers: Sequence[str],
        auth: BrokerAuth | None = None,
    ) -> None:
        self.broker_id = secrets.token_bytes(8)
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.subs: list[zmq.Socket] = []
        try:
            if auth is not None:
                auth.serve_peers(self.pub)
            self.pub.bind(bind)
            self.endpoint = self.pub.getsockopt_string(zmq.LAST_ENDPOINT)
            for addr in peers:
                s = ctx.socket(zmq.SUB)
                s.setsockopt(zmq.LINGER, 0)
                s.setsockopt(zmq.MAXMSGSIZE, p.MAX_PAYLOAD)
                if auth is not None:
                    auth.peer_client(s)
                s.setsockopt(zmq.SUBSCRIBE, p.PEER)
                s.connect(addr)
                self.subs.append(s)
        except BaseException:
            self.close()
            raise
        self.malformed = 0

    def publish(self, report: dict[str, Any]) -> None:
        # [ZSB1, broker_id, report]
        try:
            send_frames(self.pub, [p.PEER, self.broker_id, p.pack(report)])
        except zmq.Again:  # PUB never blocks; nothing to do if it would
            pass

    def reports(self, i: int) -> list[tuple[bytes, dict[str, Any]]]:
        """The reports waiting on peer ``i``'s SUB: (broker_id, report)."""
        sock = self.subs[i]
        out = []
        for _ in range(MAX_REPORTS):
            if not sock.getsockopt(_EVENTS) & _POLLIN:
                break
            frames = recv_frames(sock)
            try:
                if len(frames) != 3 or frames[0] != p.PEER or len(frames[1]) != 8:
                    raise ValueError("bad frames")
                report = p.unpack(frames[2])
                if not isinstance(report, dict):
                    raise ValueError("report is not a map")
            except ValueError as e:
                self.malformed += 1
                log.debug("malformed peer report ignored: %s", e)
                continue
            out.append((frames[1], report))
        return out

    def close(self) -> None:
        self.pub.close(0)
        for s in self.subs:
            s.close(0)
