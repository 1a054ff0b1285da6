import random
from collections import Counter

import pytest

from zserve.broker.dispatch import RoundRobin, lottery, make_policy, power_of_two, shortest_queue
from zserve.broker.registry import Registry
from zserve.protocol import WorkerInfo


def reg_with(*specs, now=0.0):
    r = Registry(expiry_after=3.0)
    for i, (models, cap, speed) in enumerate(specs):
        r.add(bytes([i]), WorkerInfo(models, capacity=cap, speed=speed), now)
    return r


def test_expiry_uses_injected_time():
    r = reg_with((["a"], 1, 1.0), now=10.0)
    w = r.get(b"\x00")
    assert r.expired(12.9) == []
    assert r.expired(13.1) == [w]
    r.touch(w, 13.0)
    assert r.expired(15.9) == []


def test_remove_cleans_model_index():
    r = reg_with((["a", "b"], 1, 1.0), (["a"], 1, 1.0))
    r.remove(b"\x00")
    assert r.models() == ["a"]
    r.remove(b"\x01")
    assert r.models() == [] and not r.serves("a")


def test_available_respects_capacity():
    r = reg_with((["a"], 2, 1.0))
    w = r.get(b"\x00")
    w.in_flight.update({(b"c", b"1"), (b"c", b"2")})
    assert r.available("a") == []
    w.in_flight.discard((b"c", b"1"))
    assert r.available("a") == [w]


def test_shortest_queue_balances_by_own_count_and_speed():
    r = reg_with((["a"], 100, 1.0), (["a"], 100, 1.0), (["a"], 100, 2.0))
    rng = random.Random(1)
    for i in range(40):
        w = shortest_queue("a", r.available("a"), rng)
        w.in_flight.add((b"c", str(i).encode()))
    counts = [len(r.get(bytes([i])).in_flight) for i in range(3)]
    assert counts == [10, 10, 20]  # load = in_flight / speed stays level


def test_shortest_queue_breaks_ties_at_random():
    r = reg_with((["a"], 10, 1.0), (["a"], 10, 1.0))
    rng = random.Random(0)
    picks = Counter(shortest_queue("a", r.available("a"), rng).identity for _ in range(200))
    assert set(picks) == {b"\x00", b"\x01"}


def test_lottery_proportional_to_speed():
    r = reg_with((["a"], 10, 1.0), (["a"], 10, 3.0))
    rng = random.Random(42)
    picks = Counter(lottery("a", r.available("a"), rng).identity for _ in range(4000))
    assert 0.70 < picks[b"\x01"] / 4000 < 0.80


def test_power_of_two_prefers_less_loaded():
    r = reg_with((["a"], 100, 1.0), (["a"], 100, 1.0))
    r.get(b"\x00").in_flight.update({(b"c", b"%d" % i) for i in range(5)})
    rng = random.Random(3)
    assert all(power_of_two("a", r.available("a"), rng).identity == b"\x01" for _ in range(20))


def test_round_robin_cycles():
    r = reg_with((["a"], 10, 1.0), (["a"], 10, 1.0), (["a"], 10, 1.0))
    rr = RoundRobin()
    rng = random.Random(0)
    seq = [rr("a", r.available("a"), rng).identity for _ in range(6)]
    assert seq == [b"\x00", b"\x01", b"\x02"] * 2


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown dispatch policy"):
        make_policy("fifo")
