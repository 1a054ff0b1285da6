"""Prometheus metrics for the gateway (``GET /metrics``).

Per model: requests, prompt and completion tokens, time to first token,
inter-token latency and request duration. Gateway-wide: requests in flight,
errors by code and HTTP status. The broker's view (``zserve_broker_*``) is
read with a ``status`` query when ``/metrics`` is scraped, so it is as fresh
as the scrape and costs nothing in between.

Inter-token latency is observed once per batch of deltas the gateway reads:
deltas that arrived together count as one gap (the time since the previous
batch), not as gaps of zero.

Models become label values only once the broker has accepted a request for
them, so a client sending made-up model names cannot grow the label set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _BrokerCollector(Collector):
    """Gauges from the last broker ``status`` answer (None = unreachable)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        st = self.status
        up = GaugeMetricFamily("zserve_broker_up", "1 if the broker answered the last scrape")
        up.add_metric([], 0.0 if st is None else 1.0)
        yield up
        if st is None:
            return
        workers = st.get("workers") or []
        count = GaugeMetricFamily("zserve_broker_workers", "registered workers")
        count.add_metric([], len(workers))
        yield count
        labels = ["worker", "models", "engine"]
        fams = {
            key: GaugeMetricFamily(f"zserve_broker_worker_{key}", doc, labels=labels)
            for key, doc in (
                ("capacity", "concurrent requests the worker accepts"),
                ("in_flight", "requests the broker has dispatched to the worker"),
                ("queue_length", "the worker's own queue length (last heartbeat)"),
            )
        }
        for w in workers:
            lv = [str(w.get("id", "")), ",".join(w.get("models") or []), str(w.get("engine", ""))]
            for key, fam in fams.items():
                fam.add_metric(lv, float(w.get(key) or 0))
        yield from fams.values()
        per_model = GaugeMetricFamily(
            "zserve_broker_model_workers", "workers serving each model", labels=["model"]
        )
        for m in st.get("models") or []:
            per_model.add_metric([m], sum(1 for w in workers if m in (w.get("models") or [])))
        yield per_model
        queued = GaugeMetricFamily(
            "zserve_broker_queued_requests", "requests waiting for a worker", labels=["model"]
        )
        for m, q in (st.get("queued") or {}).items():
            queued.add_metric([m], float(q))
        yield queued


class Metrics:
    """The gateway's metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.broker = _BrokerCollector()
        r.register(self.broker)
        m = ["model"]
        self.requests = Counter(
            "zserve_gateway_requests", "finished requests", ["model", "endpoint"], registry=r
        )
        self.prompt_tokens = Counter(
            "zserve_gateway_prompt_tokens", "prompt tokens", m, registry=r
        )
        self.completion_tokens = Counter(
            "zserve_gateway_completion_tokens", "generated tokens", m, registry=r
        )
        self.ttft = Histogram(
            "zserve_gateway_time_to_first_token_seconds",
            "request received to first token read",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "zserve_gateway_inter_token_latency_seconds",
            "gap between successive token batches of one choice",
            m,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "zserve_gateway_request_duration_seconds",
            "request received to last byte",
            m,
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "zserve_gateway_requests_in_flight", "requests being served", registry=r
        )
        self.errors = Counter(
            "zserve_gateway_errors", "failed requests", ["code", "status"], registry=r
        )
        self._children: dict[str, tuple[Any, ...]] = {}

    def model(self, model: str) -> tuple[Any, ...]:
        """(ttft, itl, prompt, completion, duration) children for a model."""
        ch = self._children.get(model)
        if ch is None:
            ch = self._children[model] = (
                self.ttft.labels(model),
                self.itl.labels(model),
                self.prompt_tokens.labels(model),
                self.completion_tokens.labels(model),
                self.duration.labels(model),
            )
        return ch

    def error(self, code: str, status: int) -> None:
        self.errors.labels(code, str(status)).inc()

    def render(self, status: dict[str, Any] | None) -> bytes:
        self.broker.status = status
        return generate_latest(self.registry)


class Tracker:
    """One request's timings and counts; ``done`` records them."""

    __slots__ = ("metrics", "model", "endpoint", "t0", "last", "first", "closed", "_ch")

    def __init__(self, metrics: Metrics, model: str, endpoint: str, choices: int) -> None:
        self.metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self.t0 = time.perf_counter()
        self.last: list[float] = [0.0] * choices
        self.first = True
        self.closed = False
        self._ch: tuple[Any, ...] | None = None
        metrics.in_flight.inc()

    def batch(self, index: int) -> None:
        """A batch of deltas was read for choice ``index``."""
        now = time.perf_counter()
        if self._ch is None:
            self._ch = self.metrics.model(self.model)
        last = self.last[index]
        if last:
            self._ch[1].observe(now - last)
        elif self.first:
            self.first = False
            self._ch[0].observe(now - self.t0)
        self.last[index] = now

    def done(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        m.in_flight.dec()
        ch = self._ch or m.model(self.model)
        ch[2].inc(prompt_tokens)
        ch[3].inc(completion_tokens)
        ch[4].observe(time.perf_counter() - self.t0)
        m.requests.labels(self.model, self.endpoint).inc()

    def failed(self, code: str, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        m.in_flight.dec()
        m.error(code, status)
        if self._ch is not None:  # the broker had accepted it: count it for the model
            m.requests.labels(self.model, self.endpoint).inc()
