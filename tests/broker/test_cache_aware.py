"""cache_aware dispatch, pure: injected workers and loads, no sockets."""

import random
import tracemalloc
from collections import Counter

import pytest

from zserve import protocol as p
from zserve.broker.dispatch import CacheAware, make_policy
from zserve.broker.prefix_map import PrefixMap
from zserve.broker.registry import Registry
from zserve.protocol import WorkerInfo

RNG = random.Random(0)


def workers(n, cap=64):
    r = Registry(expiry_after=3.0)
    for i in range(n):
        r.add(bytes([i]), WorkerInfo(["m"], capacity=cap), 0.0)
    return r, r.available("m")


def load(w, n):
    """Give ``w`` ``n`` requests in flight."""
    w.in_flight = {(b"c", b"%d" % i) for i in range(n)}


def chain(text):
    return p.prefix_chain(text.encode())


SYSTEM = "s" * (p.ROUTE_BLOCK * 4)


def test_longest_prefix_wins():
    pol = CacheAware()
    _, ws = workers(3)
    a, b, c = ws
    pol.map.record(chain(SYSTEM), a.identity)  # the shared prefix on a
    pol.map.record(chain(SYSTEM + "x" * p.ROUTE_BLOCK * 2), b.identity)  # a longer one on b
    pol.map.record(chain(SYSTEM + "y" * p.ROUTE_BLOCK), c.identity)  # another branch on c
    req = chain(SYSTEM + "x" * p.ROUTE_BLOCK * 3)
    assert pol("m", ws, RNG, None, req) is b
    assert pol("m", ws, RNG, None, chain(SYSTEM + "z" * p.ROUTE_BLOCK)) is a
    assert pol.counters["cache_hits"] == 2


def test_no_prefix_is_shortest_queue_and_is_recorded():
    pol = CacheAware()
    _, ws = workers(2)
    load(ws[0], 3)
    req = chain("q" * p.ROUTE_BLOCK * 2)
    assert pol("m", ws, RNG, None, req) is ws[1]
    assert pol.counters["cache_misses"] == 1
    load(ws[1], 3)  # the prefix now holds it there at equal load
    assert pol("m", ws, RNG, None, req) is ws[1]
    assert pol.counters["cache_hits"] == 1


def test_load_threshold_overrides_prefix():
    pol = CacheAware(threshold_abs=4, threshold_rel=1.5)
    _, ws = workers(2)
    a, b = ws
    req = chain(SYSTEM)
    pol.map.record(req, a.identity)
    load(a, 4)  # 4 above b: not more than threshold_abs
    assert pol("m", ws, RNG, None, req) is a
    load(a, 5)  # 5 above b (and > 1.5 x 0): over both
    assert pol("m", ws, RNG, None, req) is b
    assert pol.counters["cache_overridden"] == 1
    assert pol.map.holders(req[-1]) == (a.identity, b.identity)  # now on both
    pol.forget_worker(b.identity)  # only on a again
    load(b, 10)
    load(a, 14)  # 4 above b again: the prefix holds
    assert pol("m", ws, RNG, None, req) is a
    load(b, 12)
    load(a, 17)  # 5 above, but 17 <= 1.5 x 12: relative threshold not passed
    assert pol("m", ws, RNG, None, req) is a


def test_full_worker_is_not_a_candidate():
    pol = CacheAware()
    r, _ = workers(2, cap=2)
    a, b = r.available("m")
    req = chain(SYSTEM)
    pol.map.record(req, a.identity)
    load(a, 2)
    ws = r.available("m")
    assert ws == [b]
    assert pol("m", ws, RNG, None, req) is b


def test_map_memory_is_bounded_under_100k_prefixes():
    pol = CacheAware(max_entries=10_000)
    _, ws = workers(4)
    tracemalloc.start()
    try:
        for i in range(2_000):  # warm up to the bound
            pol("m", ws, RNG, None, [p.session_key(f"w{i}"), p.session_key(f"w{i}.")])
        base, _ = tracemalloc.get_traced_memory()
        for i in range(100_000):
            pol("m", ws, RNG, None, [p.session_key(str(i))])
            assert len(pol.map) <= 10_000
        end, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(pol.map) == 10_000
    assert pol.map.evicted >= 90_000
    assert end - base < 4 * 1024 * 1024, end - base  # 10,000 entries, not 100,000


def test_eviction_keeps_the_shared_beginning():
    m = PrefixMap(max_entries=4)
    long = chain("a" * p.ROUTE_BLOCK * 6)
    m.record(long, b"w")
    assert m.holders(long[0]) == (b"w",) and m.holders(long[-1]) == ()


def test_removed_worker_is_never_chosen():
    pol = CacheAware()
    r, ws = workers(2)
    a, b = ws
    req = chain(SYSTEM)
    pol("m", [a], RNG, None, req)
    pol("m", [a], RNG, b"sessionx", req)
    assert pol.map.holders(req[0]) == (a.identity,)
    r.remove(a.identity)
    pol.forget_worker(a.identity)
    assert all(a.identity not in pol.map.holders(h) for h in req)
    assert len(pol.map) == 0
    ws = r.available("m")
    for i in range(50):
        assert pol("m", ws, RNG, None, req) is b
        assert pol("m", ws, RNG, b"%d" % i, req) is b


def test_sessions_stick_by_consistent_hashing():
    pol = CacheAware()
    r, ws = workers(4)
    keys = [p.session_key(f"conv{i}") for i in range(200)]
    first = {k: pol("m", ws, RNG, k) for k in keys}
    assert len(set(first.values())) == 4  # spread over all of them
    assert all(pol("m", ws, RNG, k) is first[k] for k in keys)  # and stable at equal load
    # A fifth worker moves only the sessions it takes (about a fifth), none between old ones.
    r.add(b"\x09", WorkerInfo(["m"], capacity=64), 0.0)
    ws5 = r.available("m")
    moved = [k for k in keys if pol("m", ws5, RNG, k) is not first[k]]
    assert all(pol("m", ws5, RNG, k).identity == b"\x09" for k in moved)
    assert 10 <= len(moved) <= 90
    # One worker leaving moves only its own sessions.
    gone = ws[0]
    r.remove(gone.identity)
    pol.forget_worker(gone.identity)
    ws3 = [w for w in ws if w is not gone]
    for k in keys:
        if first[k] is not gone:
            assert pol("m", ws3, RNG, k) is first[k]


def test_sessions_bounded_load():
    pol = CacheAware(session_balance=1.25)
    _, ws = workers(2)
    a, b = ws
    k = next(k for k in (p.session_key(f"c{i}") for i in range(100)) if pol("m", ws, RNG, k) is a)
    # Its worker keeps it while its load (with this request) is within
    # ceil(1.25 x (total + 1) / 2)...
    load(a, 2)
    load(b, 1)
    assert pol("m", ws, RNG, k) is a  # 3 <= ceil(1.25 x 4 / 2) = 3
    load(a, 3)
    load(b, 0)
    assert pol("m", ws, RNG, k) is b  # 4 > ceil(1.25 x 4 / 2) = 3
    # ... so a flood of one session spreads once the load is uneven.
    load(a, 0)
    load(b, 0)
    seen = Counter()
    for i in range(100):
        w = pol("m", ws, RNG, k)
        w.in_flight.add((b"c", b"x%d" % i))
        seen[w.identity] += 1
    assert max(seen.values()) <= 1.25 * 101 / 2 + 1


def test_make_policy_and_bad_options():
    assert isinstance(make_policy("cache_aware"), CacheAware)
    with pytest.raises(ValueError):
        make_policy("cache_aware", {"threshold_rel": 0.5})
    with pytest.raises(ValueError):
        PrefixMap(0)
