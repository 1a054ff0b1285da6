"""The broker's tenant layer (``zserve broker --tenants FILE``): who sent a
request, whether its tenant has room, the fair queues, the usage at each
final, the reports to and from peer brokers. The broker's loop calls it at
admission, at dispatch, at each final and at each sync tick; the state and
the rules live in ``tenants.py`` and ``fair_queue.py``, the peer sockets
in ``peers.py``.

Identity: with CURVE, the key the client's connection authenticated with
(ZAP's user id, read from the REQUEST's first frame); a tenant frame on the
REQUEST counts only from a trusted gateway (``tenants.Tenancy.identify``).

Cost: the broker finds ``max_tokens`` in each request body by its key (no
decoding, see ``_sizes``), and decodes each TOKENS message that finishes
requests for their ``usage``; without ``--tenants`` it does neither.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import zmq

from zserve import protocol as p
from zserve._loopsock import recv_frames
from zserve.broker.fair_queue import FairQueue
from zserve.broker.peers import PeerLink
from zserve.broker.tenants import Rejection, Reserve, Tenancy, TenantState
from zserve.security import BrokerAuth
from zserve.tenants_config import TenantTable, load_tenants

log = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


class Admission:
    def __init__(
        self,
        path: str | os.PathLike[str],
        ctx: zmq.Context,
        auth: BrokerAuth | None = None,
        peer_bind: str | None = None,
        peers: Sequence[str] = (),
    ) -> None:
        self.path = path
        self.auth = auth
        table = load_tenants(path)
        self.link: PeerLink | None = None
        if peers:
            if not peer_bind:
                raise ValueError("--peer needs --peer-bind (where this broker reports)")
            self.link = PeerLink(ctx, peer_bind, peers, auth)
        elif peer_bind:
            raise ValueError("--peer-bind without any --peer")
        now = time.monotonic()
        broker_id = self.link.broker_id if self.link is not None else b""
        self.tenancy = Tenancy(table, now, peers=len(peers), broker_id=broker_id)
        self.key: bytes | None = None  # CURVE key of the message being handled
        # How the broker reads its frontend: with CURVE, each message with
        # its connection's key; without, as it always does (no key to read).
        self.recv: Callable[[zmq.Socket], list[bytes]] = (
            self._recv_keyed if auth is not None else recv_frames
        )
        self.next_sync = now
        if table.trust_unauthenticated and auth is not None:
            log.warning("tenants: trust_unauthenticated has no effect with CURVE on")
        log.info(
            "tenants: %d from %s%s", len(table.tenants), path,
            f", {len(peers)} peer brokers" if peers else "",
        )  # fmt: skip

    @property
    def table(self) -> TenantTable:
        return self.tenancy.table

    def reload(self) -> None:
        """Read the tenants file again (SIGHUP); a bad file keeps the old table."""
        try:
            table = load_tenants(self.path)
        except (OSError, ValueError) as e:
            log.error("tenants not reloaded: %s (keeping %d tenants)", e, len(self.table.tenants))
            return
        self.tenancy.reload(table, time.monotonic())
        self.tenancy.counters["tenant_reloads"] += 1
        log.warning("tenants reloaded: %d tenants", len(table.tenants))

    # ------------------------------------------------------------ frontend

    def _recv_keyed(self, sock: zmq.Socket) -> list[bytes]:
        """A frontend message, noting the CURVE key its connection
        authenticated with (``self.key``) from its first frame's User-Id."""
        first = sock.recv(_NOBLOCK, copy=False)
        try:
            self.key = first.get("User-Id").encode()
        except (zmq.ZMQError, AttributeError):
            self.key = None
        parts = [first.bytes]
        while _get(sock, _RCVMORE):
            parts.append(_recv(sock, _NOBLOCK))
        return parts

    def admit(
        self, frames: list[bytes]
    ) -> tuple[TenantState, Reserve] | tuple[TenantState, Rejection]:
        """The tenant of a REQUEST ([client, ZSC1, REQUEST, rid, model, body,
        hb?, routing?, tenant?]) and its reservation, or why it is refused.
        A body that does not decode reserves as if it set no max_tokens (the
        worker will refuse it)."""
        named = frames[8][: p.MAX_TENANT_NAME] if len(frames) == 9 else None
        st = self.tenancy.identify(self.key if self.auth is not None else None, named)
        prompt, max_tokens, resumed = _sizes(frames[5])
        estimate = self.tenancy.reserve_for(st, prompt, max_tokens, resumed)
        got = self.tenancy.admit(st, estimate, time.monotonic())
        if resumed and isinstance(got, Reserve):
            got.resumed = resumed
        return st, got

    def new_queue(self) -> FairQueue:
        return FairQueue(self.tenancy)

    def dispatched(self, st: TenantState, reserve: Reserve) -> None:
        self.tenancy.charge(st, reserve)

    def finished(
        self, st: TenantState, reserve: Reserve, usage: dict[str, Any] | None, started: bool
    ) -> None:
        self.tenancy.settle(st, reserve, usage, started, time.monotonic())

    @staticmethod
    def usage(payload: bytes, finished: list[bytes]) -> dict[bytes, dict[str, Any] | None]:
        """request id -> ``usage`` of each final record in a TOKENS payload
        that finishes ``finished``. One request finishing, with one usage map
        in the payload (the common case: usage travels on final records only),
        is read by its keys without decoding the payload."""
        if len(finished) == 1 and payload.count(_USAGE_KEY) == 1:
            u = _usage_at(payload, payload.find(_USAGE_KEY) + len(_USAGE_KEY))
            if u is not None:
                return {finished[0]: u}
        out: dict[bytes, dict[str, Any] | None] = {}
        try:
            recs = p.decode_tokens(payload)
        except (ValueError, TypeError):
            return out
        for r in recs:
            if r[3] is not None:
                extra = r[4]
                out[r[0]] = extra.get("usage") if isinstance(extra, dict) else None
        return out

    # --------------------------------------------------------------- peers

    def sockets(self) -> list[zmq.Socket]:
        return list(self.link.subs) if self.link is not None else []

    def on_peer(self, sock: zmq.Socket) -> None:
        assert self.link is not None
        i = self.link.subs.index(sock)
        now = time.monotonic()
        for broker_id, report in self.link.reports(i):
            try:
                self.tenancy.on_report(i, broker_id, report, now)
            except (ValueError, TypeError, AttributeError) as e:
                self.link.malformed += 1
                log.debug("bad peer report ignored: %s", e)

    def sync(self, now: float) -> float:
        """A sync tick when due; returns when the next one is."""
        if now >= self.next_sync:
            report = self.tenancy.tick(now)
            if self.link is not None:
                self.link.publish(report)
            self.next_sync = now + self.table.sync_interval
        return self.next_sync

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "tenants": self.tenancy.status(now),
            "peers": self.tenancy.peer_status(now),
            "peer_endpoint": self.link.endpoint if self.link is not None else None,
        }

    def counters(self) -> dict[str, int]:
        c = dict(self.tenancy.counters)
        if self.link is not None and self.link.malformed:
            c["peer_reports_malformed"] = self.link.malformed
        return c

    def close(self) -> None:
        if self.link is not None:
            self.link.close()


_UINT = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack unsigned ints: bytes that follow
_USAGE_KEY = p.pack("usage")
_USAGE_FIELDS = {p.pack(k): k for k in ("prompt_tokens", "completion_tokens", "cached_tokens")}


def _usage_at(data: bytes, k: int) -> dict[str, int] | None:
    """The usage map at ``data[k:]`` (a fixmap of the usage fields to
    unsigned ints), or None for anything else (then the payload is decoded)."""
    if k >= len(data) or not 0x81 <= data[k] <= 0x83:
        return None
    out = {}
    k += 1
    for _ in range(data[k - 1] - 0x80):
        if k >= len(data):
            return None
        n = (data[k] & 0x1F) + 1  # a fixstr key: its header and bytes
        name = _USAGE_FIELDS.get(data[k : k + n])
        if name is None:
            return None
        v, k = _uint_at(data, k + n)
        if v is None:
            return None
        out[name] = v
    return out


def _uint_at(data: bytes, k: int) -> tuple[int | None, int]:
    """The msgpack unsigned int at ``data[k]`` and the index after it."""
    if k >= len(data):
        return None, k
    b = data[k]
    if b < 0x80:
        return b, k + 1
    n = _UINT.get(b)
    if n is None or k + 1 + n > len(data):
        return None, k
    return int.from_bytes(data[k + 1 : k + 1 + n], "big"), k + 1 + n


_PARAMS_KEY = p.pack("params")
_MAX_TOKENS_KEY = p.pack("max_tokens")
_CONTINUE_KEY = p.pack("continue_ids")
_ARRAY = {0xDC: 2, 0xDD: 4}  # msgpack arrays past 15 items: bytes of their length


def _sizes(body: bytes) -> tuple[int, int | None, int]:
    """(prompt size, max_tokens, resumed) of a REQUEST body, for its
    reservation; ``resumed``: the tokens an earlier attempt delivered (a
    continuation's ``continue_ids``), which the final's usage counts again
    and its tenant was already charged for.

    Estimated without decoding a generate body (the broker stays nearly
    payload-opaque): the prompt is the bytes before its ``params`` map
    (``protocol.encode_generate`` writes kind, prompt or messages, params,
    then continue_ids), ``max_tokens`` the integer after that key. Whatever
    the estimate, the final's real usage settles the reservation. Any other
    body (an embed request: its texts) is decoded."""
    i = body.rfind(_PARAMS_KEY)
    j = body.find(_MAX_TOKENS_KEY, i) if i >= 0 else -1
    if j >= 0:
        mt, _ = _uint_at(body, j + len(_MAX_TOKENS_KEY))
        k = body.find(_CONTINUE_KEY, j)
        resumed = _array_len_at(body, k + len(_CONTINUE_KEY)) if k >= 0 else 0
        return i, mt, resumed  # (mt None: nil, no max_tokens)
    return _decoded_sizes(body)


def _array_len_at(data: bytes, k: int) -> int:
    """The length of the msgpack array at ``data[k]`` (0 for anything else)."""
    if k >= len(data):
        return 0
    b = data[k]
    if 0x90 <= b <= 0x9F:
        return b - 0x90
    n = _ARRAY.get(b)
    if n is None or k + 1 + n > len(data):
        return 0
    return int.from_bytes(data[k + 1 : k + 1 + n], "big")


def _decoded_sizes(body: bytes) -> tuple[int, int | None, int]:
    try:
        req = p.unpack(body)
    except (ValueError, TypeError):
        return len(body), None, 0
    if not isinstance(req, dict):
        return len(body), None, 0
    if req.get("kind") == p.KIND_EMBED:
        texts = req.get("texts")
        size = sum(len(t) for t in texts if isinstance(t, str)) if isinstance(texts, list) else 0
        return size, 0, 0
    chars = 0
    prompt, messages = req.get("prompt"), req.get("messages")
    if isinstance(prompt, str):
        chars += len(prompt)
    if isinstance(messages, list):
        for m in messages:
            c = m.get("content") if isinstance(m, dict) else None
            chars += len(c) if isinstance(c, str) else len(str(c or ""))
    params = req.get("params")
    mt = params.get("max_tokens") if isinstance(params, dict) else None
    cont = req.get("continue_ids")
    resumed = len(cont) if isinstance(cont, list) else 0
    mt = mt if isinstance(mt, int) and not isinstance(mt, bool) and mt >= 0 else None
    return chars, mt, resumed
