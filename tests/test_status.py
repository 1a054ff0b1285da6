"""The union of workers over several brokers' status answers (pure code)."""

from zserve.status import union_workers, worker_key


def entry(wid: str, rid: str, in_flight: int, queue_length: int, seen: float, **kw):
    return {
        "id": rid, "worker_id": wid, "models": ["m"], "capacity": 4, "engine": "null",
        "in_flight": in_flight, "queue_length": queue_length, "speed": 1.0,
        "last_seen_s": seen, "pid": 7, **kw,
    }  # fmt: skip


def up(broker: str, *workers):
    return {"broker": broker, "reachable": True, "status": {"workers": list(workers)}}


def test_a_worker_on_two_brokers_appears_once():
    reports = [
        up("b1", entry("w1", "r1", 2, 3, 0.4, refused=1), entry("w2", "r2", 0, 0, 0.1)),
        up("b2", entry("w1", "r9", 1, 2, 0.2, refused=2)),
        {"broker": "b3", "reachable": False, "error": {"code": "broker_unreachable"}},
    ]
    w1, w2 = union_workers(reports)
    assert w1["id"] == "w1" and w1["brokers"] == ["b1", "b2"]
    assert w1["in_flight"] == 3  # each broker counts only its own
    assert w1["queue_length"] == 3  # the worker's own count, its latest highest
    assert w1["refused"] == 3 and w1["last_seen_s"] == 0.2
    assert w2["brokers"] == ["b1"]


def test_workers_without_an_instance_id_match_by_pid_engine_and_models():
    a = entry("", "r1", 0, 0, 0.1)
    b = entry("", "r2", 0, 0, 0.1)
    assert worker_key(a) == worker_key(b)
    (w,) = union_workers([up("b1", a), up("b2", b)])
    assert w["brokers"] == ["b1", "b2"]
    other = entry("", "r3", 0, 0, 0.1, pid=8)
    assert len(union_workers([up("b1", a), up("b2", other)])) == 2


def test_prefix_map_line():
    from zserve.status import prefix_map_line

    pm = {"entries": 431, "max_entries": 65536, "evicted": 0, "hits": 90, "misses": 10,
          "hit_rate": 0.9, "sessions": 3}  # fmt: skip
    assert prefix_map_line(pm) == (
        "prefix map: 431 / 65536 entries, hit rate 90.0% (90 hits, 10 misses), "
        "3 session dispatches"
    )
    assert "hit rate -" in prefix_map_line({**pm, "hit_rate": None})
