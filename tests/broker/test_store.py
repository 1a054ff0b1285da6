"""The broker's response store: bounded by count and by bytes, oldest out
first, a value too large refused; no sockets."""

from __future__ import annotations

import pytest

from zserve import protocol as p
from zserve.broker.store import BoundedStore


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
