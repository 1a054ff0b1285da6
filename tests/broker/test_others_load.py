"""A worker that serves several brokers: what the others give it counts here.

Pure registry and dispatch code with injected state: each heartbeat's queue
length less this broker's own in-flight count is the other brokers' load,
room and shortest_queue's load count it, and a refusal holds the worker
full until its next heartbeat.
"""

import random

from zserve.broker.dispatch import power_of_two, shortest_queue
from zserve.broker.registry import Registry
from zserve.protocol import WorkerInfo


def two_workers(capacity: int = 4) -> tuple[Registry, object, object]:
    r = Registry(expiry_after=3.0)
    a = r.add(b"a", WorkerInfo(["m"], capacity=capacity), 0.0)
    b = r.add(b"b", WorkerInfo(["m"], capacity=capacity), 0.0)
    return r, a, b


def keys(n: int, start: int = 0) -> set[tuple[bytes, bytes]]:
    return {(b"c", b"%d" % i) for i in range(start, start + n)}


def test_others_is_the_queue_length_less_our_own_in_flight():
    r, a, _ = two_workers()
    a.in_flight.update(keys(1))
    r.heartbeat(a, 3)  # it runs 3: ours (1) and 2 of other brokers
    assert a.others == 2 and a.queue_length == 3
    assert a.load == 3.0
    assert a.has_room  # 1 + 2 < 4
    a.in_flight.update(keys(1, 1))
    assert not a.has_room  # 2 + 2: full, though we gave it only 2
    assert r.available("m") == [r.get(b"b")]


def test_others_never_below_zero():
    """Requests we dispatched that the worker had not read yet when it
    reported: its count is below ours, and others are 0, not negative."""
    r, a, _ = two_workers()
    a.in_flight.update(keys(3))
    r.heartbeat(a, 1)
    assert a.others == 0 and a.load == 3.0


def test_others_fall_with_the_next_heartbeat():
    r, a, _ = two_workers()
    r.heartbeat(a, 4)
    assert a.others == 4 and r.available("m") == [r.get(b"b")]
    r.heartbeat(a, 1)  # the other brokers' requests ended
    assert a.others == 1 and a in r.available("m")


def test_a_refusal_holds_the_worker_full_until_its_next_heartbeat():
    r, a, _ = two_workers()
    a.in_flight.update(keys(2))
    r.refuse(a, (b"c", b"1"))
    assert (b"c", b"1") not in a.in_flight  # never started there
    assert a.full and a.refused == 1
    assert a not in r.available("m")  # 1 in flight, 0 others: full all the same
    r.heartbeat(a, 1)
    assert not a.full and a in r.available("m")


def test_a_heartbeat_keeps_the_highest_peak_reported():
    r, a, _ = two_workers()
    r.heartbeat(a, 2, peak=3)
    r.heartbeat(a, 0, peak=1)  # (a restarted worker reports afresh)
    assert a.peak_queue_length == 3


def test_shortest_queue_counts_the_other_brokers_load():
    r, a, b = two_workers(capacity=100)
    r.heartbeat(a, 6)  # another broker gave a 6
    rng = random.Random(0)
    picks = []
    for i in range(10):
        w = shortest_queue("m", r.available("m"), rng)
        w.in_flight.add((b"c", b"%d" % i))
        picks.append(w.identity)
    # b takes the first 6 (evening the load), then they alternate: 8 and 8
    assert picks[:6] == [b"b"] * 6
    assert len(a.in_flight) + a.others == len(b.in_flight) + b.others == 8


def test_power_of_two_counts_the_other_brokers_load():
    r, a, b = two_workers(capacity=100)
    r.heartbeat(a, 5)
    rng = random.Random(3)
    assert all(power_of_two("m", r.available("m"), rng) is b for _ in range(20))


def test_one_broker_alone_sees_no_others():
    """One broker: the worker's count never passes ours (its finals leave
    before it reports), so nothing changes for a single broker."""
    r, a, _ = two_workers()
    a.in_flight.update(keys(3))
    r.heartbeat(a, 3)
    assert a.others == 0 and a.has_room and a.load == 3.0
