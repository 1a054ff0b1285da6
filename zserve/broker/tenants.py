"""Tenants at the broker: admission against each tenant's limits, settlement
at the final, and the usage shared with peer brokers. Pure state, no
sockets, time passed in (like ``registry.py``); the fair queue is beside it
(``fair_queue.py``), the peer transport in ``peers.py``.

**Admission.** A request is admitted when its tenant has room on every
limit it has, or answered at once with ``rate_limited`` and the seconds
after which it may pass (never queued without bound):

* ``max_inflight``: requests admitted and not yet ended (queued or running).
* ``requests_per_minute`` and ``tokens_per_minute``: token buckets that hold
  a minute's worth and refill continuously (a tenant may burst its whole
  minute, then gets 1/60 of it per second). A request reserves
  ``prompt estimate + max_tokens`` tokens at admission (the estimate: the
  prompt's size / 4, about 4 bytes a token in English text;
  ``reserve_max_tokens`` when it sets no ``max_tokens``) and is
  settled at its final with the real ``usage``: an early stop gives the
  unused reservation back. A worker's every final carries usage (a
  cancelled, failed or handed-over request's: what it used until then); a
  final without usage (the broker's own, its worker lost) keeps the
  reservation if the request had started and gives it all back if not. A
  continuation (a stream resumed after a lost or drained attempt) is
  charged its prompt and the tokens it generates, not again those the
  earlier attempt delivered (its usage counts them: the whole stream's). A
  request larger than the whole minute passes only when the bucket is full,
  and leaves it in debt.

**Across brokers** (``peers`` > 0: the broker set has ``peers + 1``
brokers). Each broker mirrors every limit for the whole set: its own usage
at once, each peer's from that peer's reports (sent every sync interval:
in-flight counts, cumulative takes, unspent claims, demand). At each sync
tick a broker *claims* its part of the room it sees, in proportion to
demand (requests asked of it per interval, smoothed), and admits only
within its claim until the next tick; claims are reported, and a peer's
unspent claim counts as used. So brokers that tick at the same moment
split the room rather than each taking all of it. A peer silent for
``SYNC_LIVENESS`` intervals (or not heard yet) is lost: it is taken to use
its equal share (``limit / brokers``) of every limit, so a broker alone
falls back to that share. Consistency: with every report at most one
interval old the set stays within ``max_inflight`` except for rounding
(one request per broker at most, ``max_inflight + brokers - 1``), and the
rate limits within one sync interval's worth of refill; a report lost or
late widens the bound by the claims made in that interval.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from zserve.tenants_config import SYNC_LIVENESS, TenantSpec, TenantTable

INFLIGHT_RETRY = 1.0  # seconds suggested to a caller refused for max_inflight
DEMAND_SMOOTHING = 0.5  # weight of the newest interval in the demand average
DEMAND_FLOOR = 0.1  # demand every live broker is given, so shares never hit 0 together
ACTIVE_DEMAND = 0.01  # a broker asked less than this per interval (smoothed) is idle
CHARS_PER_TOKEN = 4  # prompt estimate: about 4 characters a token in English text
_FULL = 0.999  # a bucket this full lets a request larger than it pass


class TokenBucket:
    """``per_minute`` units a minute: holds a minute's worth, refills
    continuously; ``scale`` < 1 shrinks both (peers lost)."""

    __slots__ = ("per_minute", "scale", "capacity", "rate", "level", "stamp")

    def __init__(self, per_minute: float, now: float) -> None:
        self.per_minute = per_minute
        self.scale = 1.0
        self.capacity = per_minute  # per_minute x scale
        self.rate = per_minute / 60.0  # refill per second
        self.level = per_minute
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            level = self.level + (now - self.stamp) * self.rate
            self.level = level if level < self.capacity else self.capacity
            self.stamp = now
        return self.level

    def wait(self, n: float, now: float) -> float:
        """Seconds until ``n`` may be taken (0: now); a request larger than
        the bucket waits for it to be full."""
        level = self.refill(now)
        if level >= n:
            return 0.0
        need = min(n, self.capacity * _FULL)
        return 0.0 if level >= need else (need - level) / self.rate

    def take(self, n: float, now: float) -> None:
        """Take ``n`` (negative: give back), never above capacity."""
        self.refill(now)
        self.level = min(self.capacity, self.level - n)

    def rescale(self, scale: float, now: float, per_minute: float | None = None) -> None:
        self.refill(now)
        if per_minute is not None:
            self.per_minute = per_minute
        self.scale = scale
        self.capacity = self.per_minute * scale
        self.rate = self.capacity / 60.0
        self.level = min(self.level, self.capacity)


@dataclass
class Claim:
    """This broker's part of one limit until the next sync tick."""

    amount: float = math.inf  # what it may take (inf: no peers)
    spent: float = 0.0

    @property
    def unspent(self) -> float:
        return 0.0 if math.isinf(self.amount) else max(0.0, self.amount - self.spent)


@dataclass(eq=False)
class TenantState:
    """One tenant's usage at this broker."""

    spec: TenantSpec
    in_flight: int = 0  # admitted here, not ended
    reported_in_flight: int = 0  # as in the last report to the peers
    requests: TokenBucket | None = None  # requests_per_minute, mirrored for the set
    tokens: TokenBucket | None = None  # tokens_per_minute, mirrored for the set
    vtc: float = 0.0  # virtual token counter (fair_queue.py): tokens served / weight
    queued: int = 0  # waiting in the broker's queues now
    counters: Counter[str] = field(default_factory=Counter)  # throttled, by limit
    admitted: int = 0
    finished: int = 0
    tokens_served: int = 0  # prompt + completion, from the finals' usage
    completion_tokens: int = 0
    tokens_returned: int = 0  # reserved and given back at the final
    dispatched_from_queue: int = 0
    wait_sum: float = 0.0  # seconds queued, summed over dispatched requests
    wait_max: float = 0.0
    # Sharing with peers: cumulative takes (net of settlement), what was
    # asked of this broker since the last tick, its smoothed value, claims.
    taken_requests: float = 0.0
    taken_tokens: float = 0.0
    arrivals: int = 0
    demand: float = 0.0
    claims: dict[str, Claim] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def claim(self, limit: str) -> Claim:
        c = self.claims.get(limit)
        if c is None:
            c = self.claims[limit] = Claim()
        return c


@dataclass(frozen=True)
class Rejection:
    """Why a request was refused, and when it may try again."""

    limit: str  # "max_inflight", "requests_per_minute" or "tokens_per_minute"
    retry_after: float  # seconds
    message: str
    limit_value: float = 0.0  # the limit
    remaining: float = 0.0  # what was left of it

    def details(self) -> dict[str, Any]:
        """For the ``rate_limited`` error record's map."""
        return {
            "retry_after": round(self.retry_after, 3),
            "limit": self.limit,
            "limit_value": self.limit_value,
            "remaining": round(max(0.0, self.remaining), 1),
        }


@dataclass
class PeerTenant:
    in_flight: int = 0
    requests: float = 0.0  # cumulative takes
    tokens: float = 0.0
    unspent: dict[str, float] = field(default_factory=dict)
    demand: float = 0.0


@dataclass
class PeerView:
    """What one peer broker last reported."""

    broker_id: bytes = b""
    heard: float = -math.inf
    tenants: dict[str, PeerTenant] = field(default_factory=dict)


@dataclass(slots=True)
class Reserve:
    """What a request holds from its tenant between admission and its final."""

    estimate: float = 0.0  # tokens expected: prompt estimate + max_tokens
    tokens: float = 0.0  # reserved from tokens_per_minute (0: not limited)
    cost: float = 0.0  # charged to the tenant's virtual token counter at dispatch
    resumed: int = 0  # a continuation: tokens an earlier attempt delivered (charged there)


class Tenancy:
    """Every tenant's state at one broker. ``peers``: other brokers in the set."""

    def __init__(
        self, table: TenantTable, now: float, peers: int = 0, broker_id: bytes = b""
    ) -> None:
        self.table = table
        self.peers = peers
        self.broker_id = broker_id  # breaks ties between equal demands
        self.views: list[PeerView] = [PeerView() for _ in range(peers)]
        self.states: dict[str, TenantState] = {}
        self.counters: Counter[str] = Counter()
        self._now = now  # of the admission being decided
        self.reload(table, now)

    # ------------------------------------------------------------ config

    def reload(self, table: TenantTable, now: float) -> None:
        """A new table: tenants kept keep their usage; limits take effect now."""
        self.table = table
        old, self.states = self.states, {}
        for name, spec in table.tenants.items():
            st = old.get(name) or TenantState(spec)
            st.spec = spec
            st.requests = _bucket(st.requests, spec.requests_per_minute, now)
            st.tokens = _bucket(st.tokens, spec.tokens_per_minute, now)
            self.states[name] = st
        self._rescale(now)
        if self.peers:  # nothing may be admitted beyond a claim, even before the first tick
            live = [v for v in self.views if now - v.heard <= self._peer_expiry]
            for st in self.states.values():
                self._claim(st, live, now)

    def identify(self, curve_key: bytes | None, named: bytes | None) -> TenantState:
        """The tenant of a request: the one its CURVE key names, unless that
        key is a trusted gateway's (or the table trusts unauthenticated
        callers) and the request names a tenant on behalf of its caller.
        Any other name a request carries is ignored (counted)."""
        t = self.table
        if named:
            trusted = (curve_key in t.trusted_gateways) if curve_key else t.trust_unauthenticated
            if trusted:
                st = self.states.get(named.decode("utf-8", "replace"))
                if st is not None:
                    return st
                self.counters["tenant_unknown"] += 1
            else:
                self.counters["tenant_claims_ignored"] += 1
        return self.states[t.for_curve_key(curve_key).name]

    # --------------------------------------------------------- admission

    def reserve_for(
        self, st: TenantState, prompt_size: int, max_tokens: int | None, resumed: int = 0
    ) -> float:
        """Tokens a request is expected to use: prompt estimate + max_tokens
        (less what an earlier attempt delivered, for a continuation)."""
        mt = max_tokens if max_tokens is not None else self.table.reserve_max_tokens
        return prompt_size / CHARS_PER_TOKEN + max(0, mt - resumed)

    def admit(self, st: TenantState, estimate: float, now: float) -> Reserve | Rejection:
        """Take one request expecting ``estimate`` tokens from ``st``'s
        limits (its reservation), or say why not. Admitted, it counts as in
        flight until ``settle``."""
        st.arrivals += 1
        self._now = now
        spec = st.spec
        peers = self.peers
        rb, tb = st.requests, st.tokens
        why = None
        # (the checks are inlined for the common case, a single broker with
        # room: admission runs for every request)
        mi = spec.max_inflight
        if mi is not None and (peers or st.in_flight >= mi):
            why = self._check_inflight(st, mi)
        if why is None and rb is not None and (peers or rb.refill(now) < 1.0):
            why = self._check_bucket(st, "requests_per_minute", rb, 1.0, now)
        if why is None and tb is not None and (peers or tb.refill(now) < estimate):
            why = self._check_bucket(st, "tokens_per_minute", tb, estimate, now)
        if why is not None:
            st.counters["throttled"] += 1
            st.counters[f"throttled.{why.limit}"] += 1
            self.counters["rate_limited"] += 1
            return why
        st.in_flight += 1
        st.admitted += 1
        if peers and mi is not None:
            st.claim("max_inflight").spent += 1
        if rb is not None:
            rb.level -= 1.0  # (refilled by its check just now)
            st.taken_requests += 1.0
            if peers:
                st.claim("requests_per_minute").spent += 1.0
        reserved = 0.0
        if tb is not None:
            reserved = estimate
            tb.level -= estimate
            st.taken_tokens += estimate
            if peers:
                st.claim("tokens_per_minute").spent += estimate
        return Reserve(estimate, reserved)

    def _check_inflight(self, st: TenantState, limit: int) -> Rejection | None:
        if self.peers:
            # The claim made at the last sync tick already counts the peers.
            c = st.claim("max_inflight")
            if c.spent + 1 <= c.amount:
                return None
            # the set has room, only this broker's part is spent: its next tick
            full = st.in_flight + self._peer_in_flight(st.name, self._now) >= limit
            retry = INFLIGHT_RETRY if full else self.table.sync_interval
            where = " across the broker set"
        else:
            if st.in_flight < limit:
                return None
            retry, where = INFLIGHT_RETRY, ""
        return Rejection(
            "max_inflight",
            retry,
            f"tenant {st.name!r} has {limit} requests in flight{where} (max_inflight)",
            limit,
            0.0,
        )

    def _check_bucket(
        self, st: TenantState, limit: str, b: TokenBucket, n: float, now: float
    ) -> Rejection | None:
        unit = "requests" if limit == "requests_per_minute" else "tokens"
        wait = b.wait(n, now)
        if wait == 0.0:
            if not self.peers:
                return None
            c = st.claim(limit)
            if c.spent + n <= c.amount or (c.spent == 0 and c.amount >= self._full_share(st, b)):
                return None
            wait = self.table.sync_interval  # this broker's part is spent until its next tick
        return Rejection(
            limit,
            wait,
            f"tenant {st.name!r} is over its {limit} of {b.per_minute:g} {unit}"
            f" (this request: {n:g}); retry in {wait:.2f} s",
            b.per_minute,
            b.level,
        )

    def _full_share(self, st: TenantState, b: TokenBucket) -> float:
        """A claim this large means the bucket was full at the tick: a
        request larger than the claim may pass then (and leave debt)."""
        return self._weight(st) * b.capacity * _FULL

    # -------------------------------------------------------- settlement

    def settle(
        self, st: TenantState, reserve: Reserve, usage: dict[str, Any] | None,
        started: bool, now: float,
    ) -> None:  # fmt: skip
        """A request ended: it leaves the in-flight count, and its token
        reservation is settled with its real usage."""
        st.in_flight -= 1
        st.finished += 1
        used: float | None = None
        if isinstance(usage, dict):
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(pt) is int and type(ct) is int:
                # a continuation's usage counts the whole stream: what the
                # earlier attempt delivered was charged to that attempt
                ct = max(0, ct - reserve.resumed)
                used = float(pt + ct)
                st.tokens_served += pt + ct
                st.completion_tokens += ct
        if used is None and not started:
            used = 0.0
        if used is not None:
            st.vtc += (used - reserve.cost) / st.spec.weight
        if st.tokens is not None and reserve.tokens and used is not None:
            back = reserve.tokens - used
            st.tokens.take(-back, now)
            st.taken_tokens -= back
            if back > 0:
                st.tokens_returned += int(back)

    def charge(self, st: TenantState, reserve: Reserve) -> None:
        """A request dispatched (once, whatever retries follow): its expected
        tokens go on its tenant's virtual token counter."""
        if not reserve.cost:
            reserve.cost = reserve.estimate or 1.0
            st.vtc += reserve.cost / st.spec.weight

    def queue_wait(self, st: TenantState, seconds: float) -> None:
        st.dispatched_from_queue += 1
        st.wait_sum += seconds
        st.wait_max = max(st.wait_max, seconds)

    # ----------------------------------------------------- peer brokers

    def tick(self, now: float) -> dict[str, Any]:
        """A sync tick: smooth demand, claim this broker's part of each
        limit's room, and return the report for the peers."""
        live = [v for v in self.views if now - v.heard <= self._peer_expiry]
        self._rescale(now, len(self.views) - len(live))
        report: dict[str, Any] = {}
        for name, st in self.states.items():
            if self.peers:
                # from the demands last reported (ours included): every
                # broker splits the room on the same numbers
                self._claim(st, live, now)
                st.reported_in_flight = st.in_flight
            # rounded as reported, so that our own number is the peers' too
            d = (1 - DEMAND_SMOOTHING) * st.demand + DEMAND_SMOOTHING * st.arrivals
            st.demand = round(d, 4)
            st.arrivals = 0
            report[name] = [
                st.in_flight,
                st.taken_requests,
                st.taken_tokens,
                {k: c.unspent for k, c in st.claims.items()},
                st.demand,
            ]
        return report

    def _claim(self, st: TenantState, live: list[PeerView], now: float) -> None:
        spec = st.spec
        lost = len(self.views) - len(live)
        n = self.peers + 1
        peers = [v.tenants.get(st.name) or PeerTenant() for v in live]
        w = self._weight(st, live)
        if spec.max_inflight is not None:
            limit = spec.max_inflight
            used = st.in_flight + sum(
                pt.in_flight + pt.unspent.get("max_inflight", 0.0) for pt in peers
            )
            room = limit - used - lost * limit / n
            # one each for the brokers with demand first (so that one whose
            # demand is small still admits a request a tick), the rest by
            # demand. This broker counts the requests it was asked since its
            # last report too: one asked for the first time admits at its next
            # tick (its peers learn of it a tick later: the one request a
            # broker may take beyond the limit, see the module's docstring).
            mine = st.demand > ACTIVE_DEMAND or st.arrivals > 0
            active = mine + sum(1 for pt in peers if pt.demand > ACTIVE_DEMAND)
            if mine and room >= active:
                share = 1 + w * (room - active)
            else:
                share = max(0.0, w * room)
            # (an epsilon: a share of 2.0000001 is 2, not 3)
            if self._first(st, live, mine):
                amount = math.ceil(share - 1e-6)
            else:
                amount = math.floor(share + 1e-6)
            st.claims["max_inflight"] = Claim(float(min(amount, max(0, math.floor(room)))))
        for limit, b in (("requests_per_minute", st.requests), ("tokens_per_minute", st.tokens)):
            if b is None:
                continue
            room = b.refill(now) - sum(pt.unspent.get(limit, 0.0) for pt in peers)
            st.claims[limit] = Claim(max(0.0, w * room))

    def on_report(self, peer: int, broker_id: bytes, report: dict[str, Any], now: float) -> None:
        """A peer's report: its takes since its last one come off the mirrored
        buckets; its in-flight counts, claims and demand replace the old ones."""
        v = self.views[peer]
        if v.broker_id != broker_id:  # a new peer (restarted): its counts start over
            v.broker_id, v.tenants = broker_id, {}
        v.heard = now
        seen: dict[str, PeerTenant] = {}
        for name, rec in report.items():
            st = self.states.get(name)
            if st is None or not isinstance(rec, list) or len(rec) < 5:
                continue
            in_flight, req, tok, unspent, demand = rec[:5]
            old = v.tenants.get(name)
            if old is not None:
                if st.requests is not None:
                    st.requests.take(float(req) - old.requests, now)
                if st.tokens is not None:
                    st.tokens.take(float(tok) - old.tokens, now)
            seen[name] = PeerTenant(
                int(in_flight), float(req), float(tok),
                {str(k): float(x) for k, x in (unspent or {}).items()}, float(demand),
            )  # fmt: skip
        v.tenants = seen

    @property
    def _peer_expiry(self) -> float:
        return self.table.sync_interval * SYNC_LIVENESS

    def _peer_in_flight(self, name: str, now: float) -> int:
        return sum(
            pt.in_flight
            for v in self.views
            if now - v.heard <= self._peer_expiry and (pt := v.tenants.get(name)) is not None
        )

    def _weight(self, st: TenantState, live: list[PeerView] | None = None) -> float:
        """This broker's share of a tenant's room: its demand over the live
        brokers' (each floored at DEMAND_FLOOR)."""
        if not self.peers:
            return 1.0
        views = self.views if live is None else live
        mine = st.demand + DEMAND_FLOOR
        total = mine + sum(
            (v.tenants[st.name].demand if st.name in v.tenants else 0.0) + DEMAND_FLOOR
            for v in views
        )
        return mine / total

    def _first(self, st: TenantState, live: list[PeerView], mine: bool) -> bool:
        """Is this broker the one that rounds its in-flight claim up (the
        others round down)? Among the brokers with demand, the one with the
        fewest in flight as last reported (ties: more demand, then the lower
        id), so that the unit left over at the margin goes round the set
        rather than to the busiest broker every tick."""
        if not mine:
            return False
        key = (st.reported_in_flight, -st.demand, self.broker_id)
        for v in live:
            pt = v.tenants.get(st.name)
            if pt is None or pt.demand <= ACTIVE_DEMAND:
                continue
            if (pt.in_flight, -pt.demand, v.broker_id) < key:
                return False
        return True

    def _rescale(self, now: float, lost: int | None = None) -> None:
        """Lost peers are taken to use their equal share of every rate."""
        if not self.peers:
            return
        if lost is None:
            lost = sum(1 for v in self.views if now - v.heard > self._peer_expiry)
        scale = 1.0 - lost / (self.peers + 1)
        for st in self.states.values():
            for b in (st.requests, st.tokens):
                if b is not None and b.scale != scale:
                    b.rescale(scale, now)

    # ------------------------------------------------------------ status

    def status(self, now: float) -> dict[str, Any]:
        """Per tenant, by name (never its keys)."""
        out = {}
        for name, st in self.states.items():
            spec = st.spec
            c = st.counters
            n = st.dispatched_from_queue
            out[name] = {
                "priority": spec.priority,
                "weight": spec.weight,
                "limits": {
                    "max_inflight": spec.max_inflight,
                    "requests_per_minute": spec.requests_per_minute,
                    "tokens_per_minute": spec.tokens_per_minute,
                },
                "in_flight": st.in_flight,
                "in_flight_set": st.in_flight + self._peer_in_flight(name, now),
                "queued": st.queued,
                "admitted": st.admitted,
                "throttled": c["throttled"],
                "throttled_by": {
                    k.split(".", 1)[1]: v for k, v in c.items() if k.startswith("throttled.")
                },
                "finished": st.finished,
                "tokens_served": st.tokens_served,
                "completion_tokens": st.completion_tokens,
                "tokens_returned": st.tokens_returned,
                "requests_left": _left(st.requests, now),
                "tokens_left": _left(st.tokens, now),
                "queue_wait_mean_s": round(st.wait_sum / n, 4) if n else 0.0,
                "queue_wait_max_s": round(st.wait_max, 4),
                "vtc": round(st.vtc, 1),
                # with peers: this broker's part of each limit until its next sync tick
                "claims": {
                    k: [c.amount, c.spent] for k, c in st.claims.items() if self.peers
                },
                "demand": st.demand,
            }
        return out

    def peer_status(self, now: float) -> list[dict[str, Any]]:
        return [
            {"broker_id": v.broker_id.hex(), "live": now - v.heard <= self._peer_expiry,
             "last_heard_s": None if math.isinf(v.heard) else round(now - v.heard, 3)}
            for v in self.views
        ]  # fmt: skip


def _bucket(old: TokenBucket | None, per_minute: float | None, now: float) -> TokenBucket | None:
    if per_minute is None:
        return None
    if old is None:
        return TokenBucket(per_minute, now)
    old.rescale(old.scale, now, per_minute)
    return old


def _left(b: TokenBucket | None, now: float) -> float | None:
    return None if b is None else round(b.refill(now), 1)
