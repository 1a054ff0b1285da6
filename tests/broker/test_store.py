"""The broker's response store: bounded by count and by bytes, oldest out
first, a value too large refused; no sockets."""

from __future__ import annotations

import pytest

from zserve import protocol as p
from zserve.broker.store import MAX_WAITS, WAITING, BoundedStore


def test_count_bound_puts_the_oldest_out() -> None:
    s = BoundedStore(max_count=3, max_bytes=1 << 20)
    for i in range(5):
        assert s.put(b"k%d" % i, b"v")
    assert [s.get(b"k%d" % i) for i in range(5)] == [None, None, b"v", b"v", b"v"]
    assert len(s) == 3 and s.evicted == 2


def test_bytes_bound_counts_keys_and_values() -> None:
    s = BoundedStore(max_count=100, max_bytes=20)
    assert s.put(b"a", b"x" * 9) and s.put(b"b", b"x" * 9)  # 20 bytes
    assert s.bytes == 20
    assert s.put(b"c", b"x")  # 2 more: a goes
    assert b"a" not in s and b"b" in s and s.bytes == 12
    assert not s.put(b"d", b"x" * 20)  # larger than the whole store: refused, nothing lost
    assert b"b" in s and b"c" in s


def test_a_put_again_replaces_and_counts_once() -> None:
    s = BoundedStore(max_count=2, max_bytes=100)
    s.put(b"a", b"1")
    s.put(b"b", b"2")
    s.put(b"a", b"33")  # now the newest
    s.put(b"c", b"4")  # b goes, not a
    assert s.get(b"a") == b"33" and s.get(b"b") is None and s.bytes == 3 + 2
    assert s.delete(b"a") and not s.delete(b"a") and s.bytes == 2


def test_handle_checks_its_frames() -> None:
    s = BoundedStore()
    assert s.handle(p.SERVICE_STORE_PUT, [b"k", b"v"]) is True
    assert s.handle(p.SERVICE_STORE_GET, [b"k"]) == b"v"
    assert s.handle(p.SERVICE_STORE_DELETE, [b"k"]) is True
    assert s.handle(p.SERVICE_STORE_GET, [b"k"]) is None
    for service, args in [(p.SERVICE_STORE_PUT, [b"k"]), (p.SERVICE_STORE_GET, []),
                          (p.SERVICE_STORE_GET, [b""]),
                          (p.SERVICE_STORE_GET, [b"k" * (p.MAX_STORE_KEY + 1)])]:  # fmt: skip
        with pytest.raises(ValueError):
            s.handle(service, args)


def test_a_read_of_a_missing_key_waits_for_its_write() -> None:
    s = BoundedStore(wait_s=0.25)
    assert s.handle(p.SERVICE_STORE_GET, [b"k"], who="reader", now=10.0) is WAITING
    assert s.handle(p.SERVICE_STORE_DELETE, [b"k"], who="deleter", now=10.1) is WAITING
    assert s.next_deadline == 10.25 and s.take_answers() == []
    assert s.handle(p.SERVICE_STORE_PUT, [b"k", b"v"]) is True
    # in the order they came: the read has the value, then the delete takes it
    assert s.take_answers() == [("reader", b"v"), ("deleter", True)]
    assert s.get(b"k") is None
    s.expire(11.0)  # their deadlines pass: nothing more to say
    assert s.take_answers() == [] and s.next_deadline is None


def test_a_read_that_waits_in_vain_is_absent_at_its_deadline() -> None:
    s = BoundedStore(wait_s=0.25)
    assert s.handle(p.SERVICE_STORE_GET, [b"a"], who=1, now=0.0) is WAITING
    assert s.handle(p.SERVICE_STORE_DELETE, [b"b"], who=2, now=0.1) is WAITING
    s.expire(0.2)
    assert s.take_answers() == []
    s.expire(0.3)
    assert s.take_answers() == [(1, None)] and s.next_deadline == 0.35
    s.expire(0.35)
    assert s.take_answers() == [(2, False)] and s.next_deadline is None
    s.put(b"a", b"late")  # nobody waits any more
    assert s.take_answers() == [] and s.get(b"a") == b"late"


def test_waits_are_bounded_and_optional() -> None:
    s = BoundedStore(wait_s=0.25)
    for i in range(MAX_WAITS):
        assert s.handle(p.SERVICE_STORE_GET, [b"k%d" % i], who=i, now=0.0) is WAITING
    assert s.handle(p.SERVICE_STORE_GET, [b"more"], who="x", now=0.0) is None  # full: absent now
    assert s.handle(p.SERVICE_STORE_GET, [b"k"], who=None) is None  # wants no answer
    assert BoundedStore(wait_s=0).handle(p.SERVICE_STORE_GET, [b"k"], who=1) is None
    s.put(b"k", b"v")  # held, not waited for: answered at once
    assert s.handle(p.SERVICE_STORE_GET, [b"k"], who="y", now=0.0) == b"v"
    assert not s.is_waiting("y") and s.is_waiting(0)
    s.expire(1.0)
    assert not s.is_waiting(0) and len(s.take_answers()) == MAX_WAITS
