"""Tenants, pure: the tenants file, admission and settlement, the fair queue,
and limits shared with peer brokers, all with injected time."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from zserve.broker.fair_queue import FairQueue
from zserve.broker.tenants import Rejection, Reserve, Tenancy, TenantState, TokenBucket
from zserve.security import write_keypair
from zserve.tenants_config import DEFAULT_TENANT, load_tenants, parse_tenants

KEY_A = b"A" * 40  # z85 text: any 40 characters of its alphabet
KEY_GW = b"G" * 40


def table(**tenants: dict) -> object:
    return parse_tenants(
        {
            "tenants": tenants,
            "gateways": {"curve_keys": [KEY_GW.decode()]},
            "scheduler": {"aging_seconds": 10.0, "reserve_max_tokens": 100},
        }  # fmt: skip
    )


# ------------------------------------------------------------------ the file


def test_file_keys_defaults_and_lookups(tmp_path: Path) -> None:
    pub, _ = write_keypair(tmp_path / "keys", "alice")
    f = tmp_path / "tenants.toml"
    f.write_text(
        '[tenants.alice]\napi_keys = ["sk-a"]\ncurve_keys = ["keys/alice.key"]\n'
        "max_inflight = 3\npriority = 1\nweight = 2\n"
        f'[tenants.bob]\ncurve_keys = ["{KEY_A.decode()}"]\ntokens_per_minute = 1000\n'
    )
    t = load_tenants(f)
    assert set(t.tenants) == {"alice", "bob", DEFAULT_TENANT}
    alice = t.tenants["alice"]
    assert (alice.max_inflight, alice.priority, alice.weight) == (3, 1, 2.0)
    assert t.for_api_key("sk-a") == "alice" and t.for_api_key("sk-x") is None
    from zserve.security import load_public

    assert t.for_curve_key(load_public(str(pub))).name == "alice"
    assert t.for_curve_key(KEY_A).name == "bob"
    assert t.for_curve_key(None).name == DEFAULT_TENANT
    assert t.default.limited is False


@pytest.mark.parametrize(
    "text, words",
    [
        ("[tenants.a]\nmax_inflight = 0\n", "max_inflight"),
        ("[tenants.a]\nweight = -1\n", "weight"),
        ("[tenants.a]\nmax_inflite = 3\n", "max_inflite"),
        ('[tenants."a b"]\n', "tenant name"),
        ('[tenants.a]\ncurve_keys = ["nope.key"]\n', "nope.key"),
        ('[tenants.a]\napi_keys = ["k"]\n[tenants.b]\napi_keys = ["k"]\n', "also names"),
        ("[scheduler]\naging_seconds = 0\n", "aging_seconds"),
        ("[tenants.a\n", "tenants file"),
    ],
)
def test_file_errors_name_the_field(tmp_path: Path, text: str, words: str) -> None:
    f = tmp_path / "t.toml"
    f.write_text(text)
    with pytest.raises(ValueError, match=words.replace(".", r"\.")):
        load_tenants(f)


# ------------------------------------------------------------- identity


def test_identity_comes_from_the_key_not_the_claim() -> None:
    t = Tenancy(table(a={"curve_keys": [KEY_A.decode()]}, b={}), now=0.0)
    # a client with its own key naming another tenant: its key's tenant, counted
    assert t.identify(KEY_A, b"b").name == "a"
    assert t.counters["tenant_claims_ignored"] == 1
    # no key, a claim: the default tenant (the table does not trust plain text)
    assert t.identify(None, b"b").name == DEFAULT_TENANT
    # a trusted gateway names the tenant of the API key it checked
    assert t.identify(KEY_GW, b"b").name == "b"
    assert t.identify(KEY_GW, None).name == DEFAULT_TENANT
    assert t.identify(KEY_GW, b"nobody").name == DEFAULT_TENANT


# ------------------------------------------------------------- admission


def test_max_inflight_counts_until_settled() -> None:
    t = Tenancy(table(a={"max_inflight": 2}), now=0.0)
    a = t.states["a"]
    r1, r2 = t.admit(a, 10, 0.0), t.admit(a, 10, 0.0)
    assert isinstance(r1, Reserve) and isinstance(r2, Reserve)
    r3 = t.admit(a, 10, 0.0)
    assert isinstance(r3, Rejection) and r3.limit == "max_inflight" and r3.retry_after > 0
    t.settle(a, r1, {"prompt_tokens": 1, "completion_tokens": 2}, True, 1.0)
    assert isinstance(t.admit(a, 10, 1.0), Reserve)
    assert a.counters["throttled.max_inflight"] == 1 and a.in_flight == 2


def test_requests_per_minute_bucket_and_retry_after() -> None:
    t = Tenancy(table(a={"requests_per_minute": 60}), now=0.0)
    a = t.states["a"]
    for _ in range(60):  # a minute's worth at once
        assert isinstance(t.admit(a, 1, 0.0), Reserve)
    r = t.admit(a, 1, 0.25)
    assert isinstance(r, Rejection) and r.limit == "requests_per_minute"
    assert r.retry_after == pytest.approx(0.75)  # 1 a second; 0.25 s have refilled 0.25
    assert isinstance(t.admit(a, 1, 0.25 + r.retry_after), Reserve)


def test_tokens_reserved_then_settled_with_real_usage() -> None:
    t = Tenancy(table(a={"tokens_per_minute": 1000}), now=0.0)
    a = t.states["a"]
    res = t.admit(a, t.reserve_for(a, 400, 500), 0.0)  # 400 bytes / 4 + 500
    assert isinstance(res, Reserve) and res.tokens == 600
    assert a.tokens.level == pytest.approx(400)
    assert isinstance(t.admit(a, 600, 0.0), Rejection)  # 600 > 400 left
    # it stopped early: 100 prompt + 20 completion tokens; 480 come back
    t.settle(a, res, {"prompt_tokens": 100, "completion_tokens": 20}, True, 0.0)
    assert a.tokens.level == pytest.approx(880)
    assert a.tokens_returned == 480 and a.tokens_served == 120
    assert isinstance(t.admit(a, 600, 0.0), Reserve)


def test_final_without_usage_keeps_or_returns_the_reservation() -> None:
    t = Tenancy(table(a={"tokens_per_minute": 1000}), now=0.0)
    a = t.states["a"]
    r1, r2 = t.admit(a, 300, 0.0), t.admit(a, 300, 0.0)
    t.settle(a, r1, None, False, 0.0)  # never started (cancelled while queued): all back
    t.settle(a, r2, None, True, 0.0)  # cancelled mid-stream: charged in full
    assert a.tokens.level == pytest.approx(700)


def test_request_larger_than_the_minute_passes_on_a_full_bucket() -> None:
    t = Tenancy(table(a={"tokens_per_minute": 100}), now=0.0)
    a = t.states["a"]
    assert isinstance(t.admit(a, 250, 0.0), Reserve)  # full: passes, leaves debt
    r = t.admit(a, 250, 1.0)
    assert isinstance(r, Rejection)
    assert r.retry_after == pytest.approx((99.9 + 150 - 100 / 60) / (100 / 60))


def test_reload_keeps_usage_and_applies_new_limits() -> None:
    t = Tenancy(table(a={"max_inflight": 5, "requests_per_minute": 10}), now=0.0)
    a = t.states["a"]
    for _ in range(3):
        t.admit(a, 1, 0.0)
    t.reload(table(a={"max_inflight": 3, "requests_per_minute": 4}), 0.0)
    assert t.states["a"] is a and a.in_flight == 3
    assert a.requests.level <= 4
    assert isinstance(t.admit(a, 1, 0.0), Rejection)


def test_bucket_rescale_caps_the_level() -> None:
    b = TokenBucket(120, 0.0)
    b.rescale(0.5, 0.0)
    assert (b.capacity, b.level, b.rate) == (60, 60, 1.0)


# ------------------------------------------------------------ fair queue


@dataclass(eq=False)
class Req:
    tenant: TenantState
    deadline: float = 1e9
    queued_at: float = 0.0
    reserve: Reserve | None = None


class Clock:
    def __init__(self) -> None:
        self.now = 1.0

    def __call__(self) -> float:
        return self.now


def serve(t: Tenancy, q: FairQueue, tokens: int) -> Req:
    """Dispatch the next request and finish it with ``tokens`` used."""
    r = q.popleft()
    r.reserve = Reserve(estimate=tokens)
    t.charge(r.tenant, r.reserve)
    r.tenant.in_flight += 1
    t.settle(r.tenant, r.reserve, {"prompt_tokens": 0, "completion_tokens": tokens}, True, 0.0)
    return r


def test_backlogged_tenants_get_tokens_by_weight() -> None:
    t = Tenancy(table(a={"weight": 1}, b={"weight": 3}), now=0.0)
    a, b = t.states["a"], t.states["b"]
    q = FairQueue(t, Clock())
    for _ in range(200):
        q.append(Req(a))
        q.append(Req(b))
    served = {"a": 0, "b": 0}
    for _ in range(200):
        served[serve(t, q, 10).tenant.name] += 10
    assert served["b"] / served["a"] == pytest.approx(3.0, rel=0.05)
    assert a.queued + b.queued == len(q) == 200


def test_fair_share_counts_real_tokens_not_requests() -> None:
    t = Tenancy(table(a={}, b={}), now=0.0)
    a, b = t.states["a"], t.states["b"]
    q = FairQueue(t, Clock())
    for _ in range(100):
        q.append(Req(a))
        q.append(Req(b))
    tokens = {"a": 0, "b": 0}
    for _ in range(100):
        r = q.popleft()
        used = 40 if r.tenant is a else 10  # a's requests run 4x longer than expected
        r.reserve = Reserve(estimate=10)
        t.charge(r.tenant, r.reserve)
        r.tenant.in_flight += 1
        t.settle(r.tenant, r.reserve, {"prompt_tokens": 0, "completion_tokens": used}, True, 0)
        tokens[r.tenant.name] += used
    assert tokens["a"] / tokens["b"] == pytest.approx(1.0, rel=0.1)


def test_a_newcomer_does_not_bank_idle_time() -> None:
    t = Tenancy(table(a={}, b={}), now=0.0)
    a, b = t.states["a"], t.states["b"]
    q = FairQueue(t, Clock())
    for _ in range(50):
        q.append(Req(a))
    for _ in range(20):
        serve(t, q, 10)  # a alone: its counter grows
    for _ in range(50):
        q.append(Req(b))  # b starts waiting: lifted to a's counter, no credit
    order = [serve(t, q, 10).tenant.name for _ in range(10)]
    assert order.count("a") == 5 and order.count("b") == 5


def test_priority_first_and_aging_lets_a_low_class_through() -> None:
    t = Tenancy(table(hi={"priority": 1}, lo={}), now=0.0)
    hi, lo = t.states["hi"], t.states["lo"]
    clock = Clock()
    q = FairQueue(t, clock)
    q.append(Req(lo))
    clock.now += 1
    for _ in range(5):
        q.append(Req(hi))
    assert [serve(t, q, 10).tenant.name for _ in range(3)] == ["hi"] * 3
    # lo's head has now waited one aging period (10 s): the same class as hi,
    # and its counter is lower: it goes next
    clock.now += 9.5
    assert serve(t, q, 10).tenant is lo
    assert hi.queued == 2 and lo.queued == 0
    assert lo.wait_max == pytest.approx(10.5)


def test_remove_and_expired_keep_counts() -> None:
    t = Tenancy(table(a={}), now=0.0)
    a = t.states["a"]
    q = FairQueue(t, Clock())
    rs = [Req(a, deadline=float(i)) for i in range(5)]
    for r in rs:
        q.append(r)
    q.remove(rs[4])
    assert q.expired(2.5) == rs[:3]
    assert len(q) == 1 and a.queued == 1
    assert q.popleft() is rs[3] and not q and a.queued == 0
    with pytest.raises(IndexError):
        q.popleft()


# ------------------------------------------------------------ peer brokers


def pair(limits: dict, now: float = 0.0) -> tuple[Tenancy, Tenancy]:
    tb = table(a=limits)
    return (Tenancy(tb, now, peers=1, broker_id=b"1"), Tenancy(tb, now, peers=1, broker_id=b"2"))


def sync(x: Tenancy, y: Tenancy, now: float) -> None:
    """Both tick, then each reads the other's report."""
    rx, ry = x.tick(now), y.tick(now)
    x.on_report(0, y.broker_id, ry, now)
    y.on_report(0, x.broker_id, rx, now)


def admitted(t: Tenancy, n: int, now: float) -> int:
    return sum(isinstance(t.admit(t.states["a"], 1, now), Reserve) for _ in range(n))


def test_alone_a_broker_keeps_its_share_of_the_limit() -> None:
    x, _ = pair({"max_inflight": 10})
    assert admitted(x, 20, 0.0) == 5  # no peer heard yet: limit / brokers


def test_two_brokers_hold_max_inflight_together() -> None:
    x, y = pair({"max_inflight": 10})
    sync(x, y, 0.0)
    peak = 0
    for step in range(1, 20):
        now = step * 0.25
        admitted(x, 20, now)
        admitted(y, 20, now)
        ax, ay = x.states["a"], y.states["a"]
        peak = max(peak, ax.in_flight + ay.in_flight)
        if step % 3 == 0:  # some finish
            for st, t in ((ax, x), (ay, y)):
                for _ in range(min(3, st.in_flight)):
                    t.settle(st, Reserve(), None, True, now)
        sync(x, y, now)
    assert peak == 10
    # the demand moves to one broker: it gets (almost) the whole limit
    for st, t in ((x.states["a"], x), (y.states["a"], y)):
        while st.in_flight:
            t.settle(st, Reserve(), None, True, 5.0)
    for step in range(30):
        now = 5.0 + step * 0.25
        admitted(x, 20, now)
        sync(x, y, now)
    assert x.states["a"].in_flight == 10


def test_two_brokers_share_a_rate_and_a_lost_peer_leaves_a_share() -> None:
    x, y = pair({"requests_per_minute": 600})  # 10 a second
    sync(x, y, 0.0)
    counts = []
    for step in range(1, 81):  # 20 s, both asked far more than the limit
        now = step * 0.25
        counts.append(admitted(x, 50, now) + admitted(y, 50, now))
        sync(x, y, now)
    # the burst the buckets held is spent within the first 10 s; then the set
    # gets the limit's rate, 10 a second, not 10 at each broker
    assert sum(counts[40:]) / 10.0 == pytest.approx(10.0, rel=0.1)
    # y goes silent: x falls back to half the rate
    got = 0
    for step in range(81, 81 + 80):
        now = step * 0.25
        got += admitted(x, 50, now)
        x.tick(now)
    assert got / 20.0 == pytest.approx(5.0, rel=0.15)
    assert not x.peer_status(now)[0]["live"]


def test_an_idle_broker_leaves_the_room_and_gets_a_part_soon_after_asking() -> None:
    x, y = pair({"max_inflight": 10})
    sync(x, y, 0.0)
    for step in range(1, 12):  # all the demand at x: it gets the whole limit
        admitted(x, 20, step * 0.25)
        sync(x, y, step * 0.25)
    ax, ay = x.states["a"], y.states["a"]
    assert ax.in_flight == 10
    for _ in range(4):  # x's requests end: room again
        x.settle(ax, Reserve(), None, True, 3.0)
    sync(x, y, 3.0)
    # y, asked for the first time, is told to come back after one sync tick ...
    r = y.admit(ay, 1, 3.0)
    assert isinstance(r, Rejection) and r.retry_after == y.table.sync_interval
    # ... and, asking each tick, has its part within a few ticks (x's claims,
    # made before it heard of y's demand, hold the room until they lapse)
    for step in range(1, 5):
        now = 3.0 + step * 0.25
        sync(x, y, now)
        admitted(x, 1, now)
        if admitted(y, 1, now):
            break
    assert ay.in_flight == 1 and step <= 3
    assert ax.in_flight + ay.in_flight <= 10
