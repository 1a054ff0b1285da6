"""What the sync and async clients share: framing, decoding, results.

No I/O here: ``Client`` and ``AsyncClient`` own their sockets and call these.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zserve import protocol as p
from zserve.errors import BadRequest, ZServeError, from_code
from zserve.protocol import Delta, Request, SamplingParams


@dataclass(slots=True)
class Completion:
    """A whole generation, as ``generate`` returns it."""

    text: str
    token_ids: list[int] | None
    finish_reason: str
    usage: dict[str, int]
    logprobs: list[Any] | None = None
    # the turn's tool calls, OpenAI-shaped: [{index, id, type, function: {name, arguments}}]
    tool_calls: list[dict[str, Any]] | None = None
    # the prompt's logprobs (prompt_logprobs=k): one entry a prompt token, the first None
    prompt_logprobs: list[Any] | None = None


@dataclass(slots=True)
class Embeddings:
    """What ``embed_with_usage`` returns: one vector per text, and the usage."""

    embeddings: list[list[float]]
    usage: dict[str, int]  # {prompt_tokens, completion_tokens}

    @classmethod
    def from_deltas(cls, ds: list[Delta]) -> Embeddings:
        """From every record of an embed request (a large result comes in slices)."""
        vecs: list[list[float]] = []
        for d in ds:
            if d.embeddings:
                vecs.extend(d.embeddings)
        return cls(vecs, dict(ds[-1].usage or {}) if ds else {})


@dataclass(slots=True)
class Resume:
    """What a generate request needs to continue on another worker: the
    request as sent, and every token id (and character) received so far."""

    model: bytes
    prompt: str | list[int] | None  # a list: token ids
    messages: list[dict[str, Any]] | None
    params: bytes  # encoded SamplingParams
    left: int  # resumes still allowed
    routing: bytes = b""  # the routing frame: a continuation goes by the same keys
    tenant: bytes = b""  # the tenant frame (a gateway's, for its caller): kept too
    ids: list[int] = field(default_factory=list)
    chars: int = 0  # characters of text received


@dataclass(slots=True)
class StreamState:
    """Per-request receive state: records buffered until the caller reads them."""

    rid: bytes = b""  # the id of its current attempt (a resume takes a new one)
    records: deque[list[Any]] = field(default_factory=deque)
    done: bool = False  # final record received
    waiter: Any = None  # async: a future the reader resolves (and clears)
    last: float = 0.0  # monotonic time of the request's send or latest record; 0: not sent
    resume: Resume | None = None  # None: this stream is not resumed
    link: int = 0  # the broker (index in the client's broker list) it was sent to
    tried: int = 0  # brokers (bits) that answered model_not_found before any token
    # The request as sent, while it can go again as it is: no Resume, and no
    # record received yet (a query, an embed request, resume=False).
    frames: list[bytes] | None = None
    resent: int = 0  # times sent again after a lost link (see ClientCore.again)
    moved: float = 0.0  # when it last moved (resume, hand-over, broker lost); 0: not since a token


@dataclass(slots=True)
class Link:
    """What the client knows of one broker: liveness and its requests in flight."""

    heard: float = 0.0  # last heard, or last had nothing in flight (whichever is later)
    in_flight: int = 0  # streams sent through it and not ended
    alive: bool = True  # False once silent past expiry, until it answers again
    leaving: bool = False  # it said GOODBYE, and has not answered since


def wake(st: StreamState) -> None:
    """Resolve and clear the stream's waiter: its reader has records to read."""
    w, st.waiter = st.waiter, None
    if w is not None and not w.done():
        w.set_result(None)


PARAMS_CACHE = 256  # distinct parameter sets remembered per client
MAX_RESUMES = 2  # default: continuations of one request on other workers
# Final error codes after which a stream continues on another worker.
RESUMABLE = frozenset({"worker_lost"})
# Final error codes that say the broker no longer holds the request (it never
# got it, or lost its link to us, or took us for gone): the stream goes again
# from what it received, as after a reset of our connection.
RELINK = frozenset({"broker_unreachable", p.CLIENT_EXPIRED})
# Times one request goes again after a lost link, at most (about one a
# heartbeat interval while its restarted broker waits for its workers): links
# that keep failing end it with the error they give.
MAX_RESENDS = 8


class ClientCore:
    def __init__(
        self,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        max_resumes: int = MAX_RESUMES,
        brokers: int = 1,
        primary: int = 0,
    ) -> None:
        self.max_resumes = max_resumes
        # REQUESTs that continue streams whose worker (or broker) died, for
        # the client to send (the core does no I/O), each with the index of
        # the broker to send it to; and how many there have been.
        self.resends: list[tuple[int, list[bytes]]] = []
        self.resumes = 0
        # Streams moved on purpose: handed over by a draining worker, or
        # away from a broker that said GOODBYE (not resumes: nothing died).
        self.handovers = 0
        # Called with the seconds from a stream's move (any) to its next token.
        self.on_stall: Callable[[float], None] | None = None
        # One Link per broker: new requests go to the primary while it lives,
        # else to the next live one.
        self.links = [Link() for _ in range(brokers)]
        self.primary = primary % brokers
        self._ids = itertools.count(1)
        self.streams: dict[bytes, StreamState] = {}
        # Broker liveness (per Link): streams sent and not ended, and when we
        # last heard the broker or last had nothing in flight, whichever is
        # later (a client idle for an hour must not take the broker for dead
        # the moment its next requests go out).
        self.heartbeat_interval = heartbeat_interval
        # Our heartbeat interval, advertised on every REQUEST and HEARTBEAT so
        # that the broker does not expire us sooner than we promise to speak.
        self._hb = p.encode_heartbeat_ms(heartbeat_interval)
        self.HEARTBEAT = [p.CLIENT, p.C_HEARTBEAT, self._hb]
        # sampling arguments -> their validated, encoded params (see _params)
        self._params_cache: dict[Any, bytes] = {}

    def next_id(self) -> bytes:
        return b"%x" % next(self._ids)

    # ------------------------------------------------------------ outgoing

    def request_frames(
        self,
        model: str,
        prompt: str | list[int] | None,
        messages: list[dict[str, Any]] | None,
        args: tuple[Any, ...],
        extra: dict[str, Any],
        resume: bool | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
    ) -> tuple[bytes, list[bytes]]:
        """A generate REQUEST; ``args`` and ``extra`` as ``sampling_params`` takes them.
        ``resume``: continue on another worker if this one dies mid-stream
        (None: the client's default, on when ``max_resumes`` > 0).
        ``session_id``: requests with the same one go to the same worker
        while its load allows (a broker with ``cache_aware`` dispatch).
        ``tenant``: the tenant to run it as, on behalf of the caller this
        client (a gateway) authenticated; a broker honours it only from a
        client whose CURVE key its tenants file trusts (docs/tenants.md)."""
        if prompt is None and messages is None:
            raise BadRequest("give a prompt or messages")
        if isinstance(prompt, list):  # token ids: the worker does not tokenize them
            try:
                p.token_ids(prompt, "prompt")
            except ValueError as e:
                raise BadRequest(str(e)) from None
        if session_id is not None and not isinstance(session_id, str):
            raise BadRequest("session_id must be a string")
        params = self._params(args, extra)
        routing = routing_frame(prompt, messages, session_id)
        tenant_b = tenant_frame(tenant)
        body = p.encode_generate(prompt, messages, params)
        rid, frames = self._open(model, body, tenant_b, routing)
        if self.max_resumes > 0 and resume is not False:
            st = self.streams[rid]
            st.resume = Resume(
                frames[3], prompt, messages, params, self.max_resumes, routing, tenant_b
            )
            st.frames = None  # it goes again from the Resume
        return rid, frames

    def repeat_frames(self, frames: list[bytes]) -> tuple[bytes, list[bytes]]:
        """Another REQUEST like ``frames`` (``request_frames``', not sent yet)
        under a new id, sharing its encoded body: ``n`` choices of one prompt
        encode and hold it once, not ``n`` times."""
        rid = self.next_id()
        st = self.streams[rid] = StreamState(rid)
        first = self.streams.get(frames[2])
        r = first.resume if first is not None else None
        if r is not None:
            st.resume = Resume(
                r.model, r.prompt, r.messages, r.params, r.left, r.routing, r.tenant
            )
        return rid, [*frames[:2], rid, *frames[3:]]

    def _params(self, args: tuple[Any, ...], extra: dict[str, Any]) -> bytes:
        """Validated, encoded sampling parameters, once per distinct set of values.

        The cache key keeps each value's type, so ``1``, ``1.0`` and ``True``
        (equal in Python) are validated apart.
        """
        if extra or args[4] is not None:
            key: Any = (_frozen(args), _frozen(sorted(extra.items())) if extra else ())
        else:
            key = (args, tuple(map(type, args)))
        try:
            return self._params_cache[key]
        except KeyError:
            pass
        except TypeError:  # something unhashable: validate without the cache
            key = None
        try:
            b = SamplingParams.from_dict(sampling_params(*args, extra)).encode()
        except ValueError as e:
            raise BadRequest(str(e)) from None
        if key is not None:
            if len(self._params_cache) >= PARAMS_CACHE:
                self._params_cache.clear()
            self._params_cache[key] = b
        return b

    def tokenize_frames(
        self,
        model: str,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        options: dict[str, Any],
        tenant: str | None = None,
    ) -> tuple[bytes, list[bytes]]:
        """A tokenize REQUEST: ``prompt`` or ``messages``, with ``options``
        (``protocol.TOKENIZE_OPTIONS``); ``tenant`` as ``request_frames``
        takes it."""
        if (prompt is None) == (messages is None):
            raise BadRequest("give a prompt or messages")
        unknown = set(options) - p.TOKENIZE_OPTIONS
        if unknown:
            raise BadRequest(f"unknown tokenize option(s): {', '.join(sorted(unknown))}")
        req = Request(kind=p.KIND_TOKENIZE, prompt=prompt, messages=messages, options=options)
        return self._open(model, req.encode(), tenant_frame(tenant))

    def detokenize_frames(
        self, model: str, ids: list[int], tenant: str | None = None
    ) -> tuple[bytes, list[bytes]]:
        try:
            p.token_ids(ids, "ids")
        except ValueError as e:
            raise BadRequest(str(e)) from None
        body = Request(kind=p.KIND_DETOKENIZE, prompt_ids=list(ids)).encode()
        return self._open(model, body, tenant_frame(tenant))

    def embed_frames(
        self, model: str, texts: list[str], tenant: str | None = None
    ) -> tuple[bytes, list[bytes]]:
        """An embed REQUEST; ``tenant`` as ``request_frames`` takes it."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("texts must be a non-empty list of strings")
        if len(texts) > p.MAX_EMBED_INPUTS:
            raise BadRequest(
                f"{len(texts)} texts in one embed request; at most {p.MAX_EMBED_INPUTS}"
            )
        body = Request(kind=p.KIND_EMBED, texts=list(texts)).encode()
        return self._open(model, body, tenant_frame(tenant))

    def _open(
        self, model: str, body: bytes, tenant: bytes = b"", routing: bytes = b""
    ) -> tuple[bytes, list[bytes]]:
        """A REQUEST of ``body``, with its routing and tenant frames (b"": none)."""
        if len(body) > p.MAX_REQUEST_SIZE:
            raise BadRequest(
                f"request of {len(body)} bytes exceeds the {p.MAX_REQUEST_SIZE}-byte limit"
            )
        model_b = model.encode()
        if len(model_b) > p.MAX_MODEL_NAME:
            raise BadRequest(
                f"model name of {len(model_b)} bytes: at most {p.MAX_MODEL_NAME} bytes"
            )
        rid = self.next_id()
        # [ZSC1, REQUEST, request_id, model, body, heartbeat_ms, routing?, tenant?]
        frames = [p.CLIENT, p.C_REQUEST, rid, model_b, body, self._hb, *_tail(routing, tenant)]
        self.streams[rid] = StreamState(rid, frames=frames)
        return rid, frames

    def query_frames(self, service: bytes, *args: bytes) -> tuple[bytes, list[bytes]]:
        rid = self.next_id()
        # [ZSC1, QUERY, request_id, service, args...]
        frames = [p.CLIENT, p.C_QUERY, rid, service, *args]
        self.streams[rid] = StreamState(rid, frames=frames)
        return rid, frames

    @staticmethod
    def cancel_frames(rid: bytes) -> list[bytes]:
        return [p.CLIENT, p.C_CANCEL, rid]

    def choose_link(self) -> int:
        """The broker for a new request: the primary while it lives, else the
        next live one (the primary if none is known to live)."""
        links = self.links
        n = len(links)
        for k in range(n):
            i = (self.primary + k) % n
            if links[i].alive:
                return i
        return self._not_leaving(-1)

    def _not_leaving(self, link: int) -> int:
        """With no broker known live: the first, in the order new requests
        take them, other than ``link`` that did not say GOODBYE (taken for
        dead, it may be back: one restarted in a rolling restart answers its
        probe within a heartbeat); else the first other than ``link``; else
        ``link``."""
        n = len(self.links)
        order = [(self.primary + k) % n for k in range(n)]
        for i in order:
            if i != link and not self.links[i].leaving:
                return i
        return next((i for i in order if i != link), link)

    def mark_sent(self, rid: bytes, now: float, link: int = 0) -> None:
        """The request is on its way (through broker ``link``): its timeout
        counts from ``now``, and if nothing else was in flight there, so does
        that broker's liveness."""
        st = self.streams.get(rid)
        if st is None or st.last:
            return
        st.last = now
        st.link = link
        lk = self.links[link]
        if not lk.in_flight:
            lk.heard = now
        lk.in_flight += 1

    def unmark_sent(self, rid: bytes) -> None:
        """The send failed after all (``mark_sent`` undone): try another broker."""
        st = self.streams.get(rid)
        if st is not None and st.last:
            st.last = 0.0
            self.links[st.link].in_flight -= 1

    def silent_links(self, now: float, expiry: float) -> list[int]:
        """Brokers with requests in flight that have said nothing for ``expiry``."""
        return [
            i for i, lk in enumerate(self.links) if lk.in_flight and now - lk.heard > expiry
        ]

    def broker_silent(self, now: float, expiry: float) -> bool:
        return bool(self.silent_links(now, expiry))

    def heartbeat_frames(self, now: float, link: int = 0) -> list[bytes]:
        """A HEARTBEAT for broker ``link``; it lists that broker's requests
        that have been quiet for an interval, so that it can say which of
        them it does not hold."""
        quiet_since = now - self.heartbeat_interval
        quiet = [
            rid
            for rid, st in self.streams.items()
            if 0.0 < st.last < quiet_since and st.link == link
        ]
        if not quiet:
            return self.HEARTBEAT
        return [*self.HEARTBEAT, p.encode_request_ids(quiet)]

    def broker_lost(
        self, link: int, err: ZServeError, now: float
    ) -> tuple[list[StreamState], list[bytes]]:
        """Broker ``link`` went silent: its streams continue through another
        live broker where they can (resumption, queued in ``resends``), the
        rest end with ``err``. Returns the streams ended, and the request ids
        left behind on that broker (to cancel there, should it come back)."""
        self.links[link].alive = False
        target = self.choose_link()
        other = target != link and self.links[target].alive
        ended: list[StreamState] = []
        left: list[bytes] = []
        for rid, st in list(self.streams.items()):
            if st.link != link or not st.last:
                continue
            left.append(rid)
            r = st.resume
            if other and r is not None and r.left > 0:
                st.last = now  # its timeout counts afresh
                self._continue(st, r, target)
                continue
            self._pop(rid)
            st.records.append(p.error_record(rid, err.code, err.message))
            st.done = True
            ended.append(st)
        self.links[link].in_flight = 0
        return ended, left

    def link_reset(self, link: int, now: float) -> tuple[list[StreamState], list[bytes]]:
        """Our connection to broker ``link`` broke (ZeroMQ makes it again, with
        the same routing id): what was on the wire either way may be lost, so
        every stream sent there goes again under a new id, from what it
        received (``again``), queued in ``resends``; one that cannot ends with
        ``broker_unreachable``. Returns the streams ended, and the old ids (to
        cancel there: the broker may still run them)."""
        ended: list[StreamState] = []
        left: list[bytes] = []
        # New requests and these streams go to another live broker, if any,
        # until this one answers again (a probe): it may have died.
        self.links[link].alive = False
        target = self._other_link(link)
        for rid, st in list(self.streams.items()):
            if st.link != link or not st.last:
                continue
            left.append(rid)
            st.last = now  # its timeout counts afresh
            if self.again(st, target):
                continue
            self._pop(rid)
            why = (
                "the connection to the broker was reset mid-stream, and this stream "
                "cannot continue (resume=False, or text without token ids)"
            )
            st.records.append(p.error_record(rid, "broker_unreachable", why))
            st.done = True
            ended.append(st)
        return ended, left

    def goodbye(self, link: int, now: float) -> list[StreamState]:
        """Broker ``link`` said GOODBYE (it is stopping on purpose): it is gone
        now, no liveness wait. Every stream sent there goes again through
        another live broker from exactly what it received (``again``); with
        none live, the next other broker, which may be back (a restart);
        with no other broker, or one that cannot go again, it ends with
        ``broker_unreachable``. Returns the streams ended. (That broker
        cancels what it ran itself.)"""
        self.links[link].alive = False
        self.links[link].leaving = True
        target = self._other_link(link)
        if target == link:
            # None known live, but another broker may be back already (one
            # restarted moments ago in a rolling restart, not yet probed): a
            # better bet than ending the stream, and its silence ends or
            # moves it as usual.
            target = self._not_leaving(link)
        ended: list[StreamState] = []
        for rid, st in list(self.streams.items()):
            if st.link != link or not st.last:
                continue
            st.last = now  # its timeout counts afresh
            if target != link and self.again(st, target):
                self.handovers += 1
                continue
            self._pop(rid)
            why = "the broker is stopping (it said goodbye) and " + (
                "no other broker is live" if target == link else "this stream cannot go again"
            )
            st.records.append(p.error_record(rid, "broker_unreachable", why))
            st.done = True
            ended.append(st)
        # [ZSC1, DISCONNECT]: moved; the leaving broker need not wait for us
        self.resends.append((link, [p.CLIENT, p.C_DISCONNECT]))
        return ended

    def _other_link(self, link: int, tried: int = 0) -> int:
        """A live broker other than ``link`` (and those in ``tried``, bits), in
        the order new requests take them; ``link`` itself if none."""
        n = len(self.links)
        for k in range(n):
            i = (self.primary + k) % n
            if i != link and self.links[i].alive and not tried >> i & 1:
                return i
        return link

    def again(self, st: StreamState, link: int) -> bool:
        """Send ``st`` again through ``link`` under a new id, from exactly
        what it received: a resumable stream as a continuation after its ids,
        one that received nothing as it was sent. Not a resume (no worker
        died), but at most MAX_RESENDS times. False: it cannot go again."""
        if st.resent >= MAX_RESENDS:
            return False
        r = st.resume
        if r is not None:
            st.resent += 1
            self._continue(st, r, link, bounce=True)
            return True
        if st.frames is None:
            return False
        st.resent += 1
        frames = list(st.frames)
        frames[2] = self._rekey(st, link)
        st.frames = frames
        self.resends.append((link, frames))
        return True

    # ------------------------------------------------------------ incoming

    def on_message(self, frames: list[bytes], now: float, link: int = 0) -> None:
        """Route a broker message to its streams, in one pass over its records.

        Each stream that gets a record has ``last`` set to ``now`` and its
        waiter (if any) resolved and cleared. Raises ``ValueError`` for a
        payload that is not msgpack; skips records that are malformed or
        for request ids it does not know (cancelled, given up on).
        """
        lk = self.links[link]
        lk.heard = now
        lk.alive = True
        lk.leaving = False
        if len(frames) != 3 or frames[1] != p.C_TOKENS or frames[0] != p.CLIENT:
            if len(frames) == 2 and frames[1] == p.C_GOODBYE and frames[0] == p.CLIENT:
                for st in self.goodbye(link, now):
                    wake(st)
            return  # HEARTBEAT, or something this version does not know
        recs = p.unpack(frames[2])
        if type(recs) is not list:
            raise ValueError("token payload must be an array")
        streams = self.streams
        for rec in recs:
            if type(rec) is not list or len(rec) != 5 or type(rec[0]) is not bytes:
                continue  # malformed record
            st = streams.get(rec[0])
            if st is None:
                continue
            st.last = now
            r = st.resume
            if r is not None:
                if st.moved and (rec[3] is None or rec[1] or rec[2]):
                    # its first tokens since it moved (the last ones may come
                    # with the final)
                    self._stalled(st, now)
                if rec[3] is None:
                    if rec[2] is not None:
                        r.ids.extend(rec[2])
                        r.chars += len(rec[1])
                    elif rec[1]:
                        st.resume = None  # text without ids: cannot be continued
                elif self._resume(st, rec, r):
                    continue
            elif st.frames is not None:
                if rec[3] is None:
                    st.frames = None  # received something: cannot go again as it was
                elif self._relink(st, rec):
                    continue
            st.records.append(rec)
            if rec[3] is not None:
                st.done = True
                del streams[rec[0]]
                self.links[st.link].in_flight -= 1
            if st.waiter is not None:
                wake(st)

    def _resume(self, st: StreamState, rec: list[Any], r: Resume) -> bool:
        """On a final that says the worker died, continue the stream on
        another one: a new request from the prompt and the ids received
        (sent by the client, from ``resends``). False: the final stands."""
        if rec[3] != p.FINISH_ERROR:
            return False
        err = (rec[4] or {}).get("error") or {}
        code = err.get("code")
        if code in RELINK:
            return self._relink(st, rec)
        if code == "model_not_found" and not r.ids and not r.chars:
            # Brokers can disagree for a moment (one just restarted, its
            # workers not back yet): ask the next live broker not yet asked.
            st.tried |= 1 << st.link
            for k in range(1, len(self.links)):
                i = (st.link + k) % len(self.links)
                if self.links[i].alive and not st.tried >> i & 1:
                    self._continue(st, r, i, bounce=True)
                    return True
        if code == "model_not_found" and 0 < st.resent < MAX_RESENDS:
            # Sent again after a lost link, to a broker that knows no worker
            # for it yet (it restarted: its workers are back within seconds).
            # The stream waits under a new id, not sent: asked about it at
            # our next heartbeat, that broker says it never got it, and the
            # stream goes again (``again``). (Each id gets one final.)
            # Another live broker that has not said so goes at once.
            st.tried |= 1 << st.link
            other = self._other_link(st.link, st.tried)
            if other != st.link:
                return self.again(st, other)
            self._rekey(st, st.link)
            return True
        if code in RESUMABLE and err.get(p.HANDOVER):
            # A draining worker handed it over at its deadline: nothing
            # failed, and it goes on elsewhere from what it received.
            if self.again(st, st.link):
                self.handovers += 1
                return True
            return False
        if code in RESUMABLE and not r.ids and not r.chars:
            # No token yet: retrying is the broker's job, and it has given up
            # (retries exhausted: a request that kills its workers must not
            # get more chances here).
            return False
        if code not in RESUMABLE or r.left <= 0:
            if r.left < self.max_resumes and code not in RESUMABLE:
                # A continuation that could not run (no other worker...):
                # for the caller, its worker was lost mid-stream.
                why = f"worker died mid-stream; continuing elsewhere failed: {code}: "
                msg = why + str(err.get("message"))
                rec[4] = {"error": {"code": "worker_lost", "message": msg}}
            return False
        self._continue(st, r, st.link)
        return True

    def _relink(self, st: StreamState, rec: list[Any]) -> bool:
        """On a final that says the broker does not hold the request (RELINK
        codes), send it again there from what it received. False: the final
        stands."""
        if rec[3] != p.FINISH_ERROR:
            return False
        code = ((rec[4] or {}).get("error") or {}).get("code")
        # (through another live broker if there is one: this one restarted,
        # or took us for gone)
        return code in RELINK and self.again(st, self._other_link(st.link))

    def _rekey(self, st: StreamState, link: int) -> bytes:
        """Give ``st`` a new request id, sent through ``link``; its old id is
        forgotten (what still comes for it is ignored)."""
        del self.streams[st.rid]
        rid = st.rid = self.next_id()
        self.streams[rid] = st
        if link != st.link:
            old = self.links[st.link]
            new = self.links[link]
            old.in_flight -= 1
            if not new.in_flight:
                new.heard = st.last
            new.in_flight += 1
            st.link = link
        return rid

    def _continue(self, st: StreamState, r: Resume, link: int, bounce: bool = False) -> None:
        """Re-send ``st`` as a continuation, under a new id, through ``link``
        (``bounce``: the same request again, to another broker or after a lost
        link, not a resume)."""
        if not bounce:
            r.left -= 1
            self.resumes += 1
        if not st.moved:
            st.moved = st.last  # (its callers set it to now)
        rid = self._rekey(st, link)
        body = p.encode_generate(r.prompt, r.messages, r.params, r.ids, r.chars)
        # [ZSC1, REQUEST, request_id, model, body, heartbeat_ms, routing?, tenant?]
        frames = [p.CLIENT, p.C_REQUEST, rid, r.model, body, self._hb, *_tail(r.routing, r.tenant)]
        self.resends.append((link, frames))

    def _stalled(self, st: StreamState, now: float) -> None:
        """The first token of a stream after it moved."""
        stall, st.moved = now - st.moved, 0.0
        if self.on_stall is not None:
            self.on_stall(stall)

    def take_resends(self) -> list[tuple[int, list[bytes]]]:
        out, self.resends = self.resends, []
        return out

    def _pop(self, rid: bytes) -> StreamState | None:
        st = self.streams.pop(rid, None)
        if st is not None and st.last:
            self.links[st.link].in_flight -= 1
        return st

    def forget(self, rid: bytes) -> bool:
        """Drop a request's state; True if it was still running."""
        st = self._pop(rid)
        return st is not None and not st.done

    def fail_all(self, err: ZServeError) -> list[tuple[bytes, StreamState]]:
        """End every open stream with ``err`` (broker lost, client closed);
        returns them, so the caller can cancel those that were sent."""
        out = []
        for rid, st in list(self.streams.items()):
            st.records.append(p.error_record(rid, err.code, err.message))
            st.done = True
            out.append((rid, st))
        self.streams.clear()
        for lk in self.links:
            lk.in_flight = 0
        return out

    def fail(self, rid: bytes, code: str, message: str) -> StreamState | None:
        """End one open stream with an error record (a client-side timeout)."""
        st = self._pop(rid)
        if st is not None:
            st.records.append(p.error_record(rid, code, message))
            st.done = True
        return st


def routing_frame(
    prompt: str | list[int] | None,
    messages: list[dict[str, Any]] | None,
    session_id: str | None,
) -> bytes:
    """The REQUEST routing frame for this prompt (b"": none): the prefix
    hashes of its canonical form, and the session key."""
    try:
        chain = p.prefix_chain(p.canonical_prompt(prompt, messages))
    except (TypeError, ValueError, AttributeError):  # odd content: the worker will say
        chain = []
    return p.encode_routing(session_id, chain)


def _tail(routing: bytes, tenant: bytes) -> list[bytes]:
    """A REQUEST's optional last frames: routing, then tenant (an empty
    routing frame before a tenant frame: no keys)."""
    if tenant:
        return [routing, tenant]
    return [routing] if routing else []


def tenant_frame(tenant: str | None) -> bytes:
    """The REQUEST tenant frame (b"": none)."""
    if tenant is None:
        return b""
    b = tenant.encode() if isinstance(tenant, str) else b""
    if not b or len(b) > p.MAX_TENANT_NAME:
        raise BadRequest(f"tenant must be a name of 1 to {p.MAX_TENANT_NAME} bytes")
    return b


def to_delta(rec: list[Any]) -> Delta:
    """A record as the caller sees it; an error record raises its exception."""
    if rec[4] is None and rec[3] is None:  # the common case: a partial record
        return Delta(rec[1], rec[2])
    _, d = Delta.from_record(rec)
    if d.finish_reason == p.FINISH_ERROR:
        err = d.error or {}
        raise from_code(
            str(err.get("code", "error")), str(err.get("message", "")), err
        )
    if d.finish_reason == p.FINISH_CANCELLED:
        raise from_code("cancelled", "request cancelled")
    return d


class Accumulator:
    """Folds deltas into a ``Completion``."""

    __slots__ = ("parts", "token_ids", "logprobs", "finish_reason", "usage", "tool_calls",
                 "prompt_logprobs")  # fmt: skip

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.token_ids: list[int] | None = None
        self.logprobs: list[Any] | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}
        self.tool_calls: list[dict[str, Any]] | None = None
        self.prompt_logprobs: list[Any] | None = None

    def add(self, d: Delta) -> None:
        if d.prompt_logprobs:  # in slices, ahead of the first token
            self.prompt_logprobs = (self.prompt_logprobs or []) + d.prompt_logprobs
        if d.text:
            self.parts.append(d.text)
        if d.token_ids is not None:
            if self.token_ids is None:
                self.token_ids = []
            self.token_ids.extend(d.token_ids)
        if d.logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.logprobs)
        if d.tool_calls:
            if self.tool_calls is None:
                self.tool_calls = []
            p.merge_tool_calls(self.tool_calls, d.tool_calls)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason
            self.usage = dict(d.usage or {})

    def result(self) -> Completion:
        return Completion(
            "".join(self.parts),
            self.token_ids,
            self.finish_reason or p.FINISH_STOP,
            self.usage,
            self.logprobs,
            self.tool_calls,
            self.prompt_logprobs,
        )


def _frozen(v: Any) -> Any:
    """A hashable stand-in for ``v`` that tells types apart (``1`` from ``True``)."""
    if type(v) is list or type(v) is tuple:
        return (type(v), tuple(_frozen(x) for x in v))
    return (type(v), v)


def sampling_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    stop: str | list[str] | None,
    seed: int | None,
    ignore_eos: bool | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    params: dict[str, Any] = dict(extra)
    for k, v in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("stop", stop),
        ("seed", seed),
        ("ignore_eos", ignore_eos),
    ):
        if v is not None:
            params[k] = v
    unknown = set(params) - set(SamplingParams._FIELDS)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return params
