"""Tenants at the gateway (``zserve gateway --tenants FILE``, the broker's
tenants file): the API keys a tenant lists are accepted keys, and a request
that shows one runs as that tenant. The gateway tells the broker on each
REQUEST (the tenant frame); the broker believes it only because the
gateway's CURVE key is listed under ``[gateways]`` in the same file. Limits
are the broker's to hold: the gateway only maps its ``rate_limited`` answer
to HTTP 429 with ``Retry-After`` (and ``retry-after-ms``, which OpenAI's SDKs
read first) and OpenAI's ``x-ratelimit-*`` headers for the limit that was hit.
"""

from __future__ import annotations

import hmac
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zserve.errors import RateLimited
from zserve.tenants_config import TenantTable, load_tenants

# OpenAI's header word for each per-minute limit; max_inflight has none of
# its own and gets ``x-ratelimit-limit-concurrency``.
log = logging.getLogger(__name__)

_KIND = {"requests_per_minute": "requests", "tokens_per_minute": "tokens"}


class GatewayTenants:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path
        self.reloads = 0
        self._use(load_tenants(path))

    def _use(self, table: TenantTable) -> None:
        self.table = table
        self._keys = [(k.encode(), name) for k, name in table.by_api_key.items()]

    def reload(self) -> bool:
        """Read the file again (SIGHUP, as the broker does); a file that
        does not load keeps the old table. True when the new one is in use."""
        try:
            table = load_tenants(self.path)
        except (OSError, ValueError) as e:
            log.error("tenants not reloaded: %s (keeping %d tenants)", e, len(self.table.tenants))
            return False
        self._use(table)
        self.reloads += 1
        log.warning("tenants reloaded: %d tenants", len(table.tenants))
        return True

    @property
    def api_keys(self) -> list[str]:
        return list(self.table.by_api_key)

    def tenant_of(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The tenant whose API key ``headers`` (ASGI, lower-case names) carry."""
        for name, value in headers:
            if name == b"authorization":
                scheme, _, key = value.partition(b" ")
                if scheme.lower() != b"bearer":
                    return None
                k = key.strip()
                found = None
                for good, tenant in self._keys:  # every key compared: no timing hint
                    if hmac.compare_digest(k, good):
                        found = tenant
                return found
        return None


def rate_limit_headers(e: RateLimited) -> list[tuple[bytes, bytes]]:
    """HTTP headers for a 429: ``Retry-After`` (whole seconds, at least 1),
    ``retry-after-ms``, and ``x-ratelimit-{limit,remaining,reset}-{kind}``."""
    wait = e.retry_after if e.retry_after is not None else 1.0
    out = [
        (b"retry-after", b"%d" % max(1, math.ceil(wait))),
        (b"retry-after-ms", b"%d" % max(0, math.ceil(wait * 1000))),
    ]
    kind = _KIND.get(e.limit or "", "concurrency" if e.limit == "max_inflight" else None)
    if kind is not None and e.limit_value is not None:
        k = kind.encode()
        out.append((b"x-ratelimit-limit-" + k, b"%d" % e.limit_value))
        out.append((b"x-ratelimit-remaining-" + k, b"%d" % max(0, e.remaining or 0)))
        out.append((b"x-ratelimit-reset-" + k, _duration(wait)))
    return out


def _duration(seconds: float) -> bytes:
    """OpenAI's reset format: ``120ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return b"%dms" % math.ceil(seconds * 1000)
    if seconds < 60:
        return (f"{seconds:.3g}s").encode()
    m, s = divmod(int(math.ceil(seconds)), 60)
    return b"%dm%ds" % (m, s)


def tenant_metrics(status: dict[str, Any]) -> Iterator[Metric]:
    """``zserve_broker_tenant_*`` families from a broker ``status`` answer
    (nothing without ``--tenants``). Tenant names are the labels, never keys."""
    tenants = (status.get("tenants") or {}).get("tenants") or {}
    if not tenants:
        return
    label = ["tenant"]
    gauges = {
        key: GaugeMetricFamily(f"zserve_broker_tenant_{key}", doc, labels=label)
        for key, doc in (
            ("in_flight", "the tenant's requests admitted by this broker and not ended"),
            ("in_flight_set", "the same across the broker set, as its peers last reported"),
            ("queued", "the tenant's requests waiting for a worker"),
            ("requests_left", "requests_per_minute left in its bucket"),
            ("tokens_left", "tokens_per_minute left in its bucket"),
            ("queue_wait_mean_s", "mean seconds its dispatched requests waited in the queue"),
            ("queue_wait_max_s", "most seconds one of its requests waited in the queue"),
        )
    }
    counters = {
        key: CounterMetricFamily(f"zserve_broker_tenant_{key}", doc, labels=label)
        for key, doc in (
            ("admitted", "requests admitted"),
            ("throttled", "requests refused with rate_limited"),
            ("tokens_served", "prompt + completion tokens of its finished requests"),
        )
    }
    by_limit = CounterMetricFamily(
        "zserve_broker_tenant_throttled_by_limit",
        "requests refused with rate_limited, by the limit hit",
        labels=["tenant", "limit"],
    )
    for name, t in sorted(tenants.items()):
        for key, fam in gauges.items():
            v = t.get(key)
            if v is not None:
                fam.add_metric([name], float(v))
        for key, cfam in counters.items():
            cfam.add_metric([name], float(t.get(key) or 0))
        for lim, n in sorted((t.get("throttled_by") or {}).items()):
            by_limit.add_metric([name, lim], float(n))
    yield from gauges.values()
    yield from counters.values()
    yield by_limit
