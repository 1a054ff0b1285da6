"""The status of several brokers at once: each broker, and the union of workers.

A worker serving several brokers registers with each of them (a routing id
per broker), so each broker's ``status`` lists it once; the READY
``worker_id`` (a random id per worker process) says which entries are the
same worker. ``zserve status`` with more than one broker prints what
``cluster_status`` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


def broker_report(
    address: str,
    timeout: float,
    curve_secret: str | None = None,
    curve_server: str | None = None,
) -> dict[str, Any]:
    """One broker's ``status`` answer, or why there was none:
    ``{broker, reachable, status}`` or ``{broker, reachable: False, error}``."""
    from zserve.client import Client
    from zserve.errors import ZServeError

    try:
        with Client(
            address, timeout=timeout, connect_timeout=timeout,
            curve_secret=curve_secret, curve_server=curve_server,
        ) as c:  # fmt: skip
            return {"broker": address, "reachable": True, "status": c.status()}
    except ZServeError as e:
        return {
            "broker": address,
            "reachable": False,
            "error": {"code": e.code, "message": e.message},
        }


def worker_key(w: dict[str, Any]) -> str:
    """What makes one worker the same on every broker: its instance id, or
    (a worker that predates it) its pid, engine and models."""
    if w.get("worker_id"):
        return str(w["worker_id"])
    return f"pid {w.get('pid', 0)} {w.get('engine', '?')} {','.join(sorted(w['models']))}"


def union_workers(reports: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every worker once, with the brokers it is registered with: in flight
    summed over them (each broker counts only its own), the queue length it
    reported (its own count, every broker's requests) at its highest, the
    time since it was last heard at its shortest."""
    out: dict[str, dict[str, Any]] = {}
    for r in reports:
        if not r["reachable"]:
            continue
        for w in r["status"]["workers"]:
            key = worker_key(w)
            u = out.get(key)
            if u is None:
                out[key] = {
                    "id": key,
                    "models": sorted(w["models"]),
                    "engine": w.get("engine", "?"),
                    "capacity": w["capacity"],
                    "in_flight": w["in_flight"],
                    "queue_length": w["queue_length"],
                    "peak_queue_length": w.get("peak_queue_length", 0),
                    "refused": w.get("refused", 0),
                    "draining": bool(w.get("draining")),
                    "speed": w["speed"],
                    "last_seen_s": w["last_seen_s"],
                    "brokers": [r["broker"]],
                }
                continue
            u["in_flight"] += w["in_flight"]
            u["refused"] += w.get("refused", 0)
            u["draining"] = u["draining"] or bool(w.get("draining"))
            u["queue_length"] = max(u["queue_length"], w["queue_length"])
            u["peak_queue_length"] = max(u["peak_queue_length"], w.get("peak_queue_length", 0))
            u["last_seen_s"] = min(u["last_seen_s"], w["last_seen_s"])
            u["brokers"].append(r["broker"])
    return sorted(out.values(), key=lambda u: u["id"])


def cluster_status(
    addresses: Sequence[str],
    timeout: float = 5.0,
    curve_secret: str | None = None,
    curve_server: str | None = None,
) -> dict[str, Any]:
    """Ask every broker at once (an unreachable one costs ``timeout``, not
    ``timeout`` each): ``{brokers: [...], workers: [...], models: [...]}``."""
    with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
        reports = list(
            pool.map(lambda a: broker_report(a, timeout, curve_secret, curve_server), addresses)
        )
    brokers: list[dict[str, Any]] = []
    models: set[str] = set()
    for r in reports:
        if not r["reachable"]:
            brokers.append({"broker": r["broker"], "reachable": False, "error": r["error"]})
            continue
        st = r["status"]
        models.update(st["models"])
        brokers.append(
            {
                "broker": r["broker"],
                "reachable": True,
                "state": st.get("state", "serving"),  # leaving: stopping on purpose
                "workers": len(st["workers"]),
                "queued": st.get("queued", {}),
                "requests_in_flight": st.get("requests_in_flight", 0),
                "clients": st.get("clients", 0),
                "uptime_s": st.get("uptime_s", 0.0),
                "counters": st.get("counters", {}),
                "curve": st.get("curve"),
                "prefix_map": st.get("prefix_map"),
                "tenants": st.get("tenants"),
            }
        )
    return {"brokers": brokers, "workers": union_workers(reports), "models": sorted(models)}


def prefix_map_line(pm: dict[str, Any]) -> str:
    """One line on a cache_aware broker's prefix map (its ``status`` ``prefix_map``)."""
    rate = pm.get("hit_rate")
    return (
        f"prefix map: {pm['entries']} / {pm['max_entries']} entries, "
        f"hit rate {'-' if rate is None else f'{rate:.1%}'} "
        f"({pm['hits']} hits, {pm['misses']} misses), {pm['sessions']} session dispatches"
    )


TENANT_COLUMNS = (
    "tenant", "prio", "weight", "in flight", "set", "queued", "admitted", "throttled",
    "tokens", "req left", "tok left", "wait mean", "wait max",
)  # fmt: skip


def tenant_rows(st: dict[str, Any]) -> list[list[str]]:
    """One row per tenant of a broker ``status`` answer (none without
    ``--tenants``), as ``zserve status`` prints them: ``set`` is the
    in-flight count across the broker set, ``throttled`` its rate_limited
    answers with the limits hit."""
    tenants = (st.get("tenants") or {}).get("tenants") or {}
    rows = []
    for name, t in sorted(tenants.items()):
        by = ", ".join(f"{k} {v}" for k, v in sorted((t.get("throttled_by") or {}).items()))
        rows.append(
            [
                name, str(t["priority"]), f"{t['weight']:g}", str(t["in_flight"]),
                str(t["in_flight_set"]), str(t["queued"]), str(t["admitted"]),
                f"{t['throttled']}" + (f" ({by})" if by else ""), str(t["tokens_served"]),
                _opt(t.get("requests_left")), _opt(t.get("tokens_left")),
                f"{t['queue_wait_mean_s']:.3f}s", f"{t['queue_wait_max_s']:.3f}s",
            ]
        )  # fmt: skip
    return rows


def _opt(v: Any) -> str:
    return "-" if v is None else f"{v:g}"
