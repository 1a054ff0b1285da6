"""Prometheus metrics for the gateway (``GET /metrics``).

Per model: requests, prompt and completion tokens, time to first token,
inter-token latency and request duration. Gateway-wide: requests in flight,
errors by code and HTTP status. The broker's view (``zserve_broker_*``) is
read with a ``status`` query when ``/metrics`` is scraped, shared with
``/health`` and ``/ready`` for up to a second (``app.STATUS_TTL``): at most
that old, and nothing in between scrapes.

Inter-token latency is observed once per batch of deltas the gateway reads:
deltas that arrived together count as one gap (the time since the previous
batch), not as gaps of zero.

Models become label values only once the broker has accepted a request for
them, so a client sending made-up model names cannot grow the label set.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Callable, Iterator
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from zserve.gateway.tenants import tenant_metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _BrokerCollector(Collector):
    """Gauges from the last broker ``status`` answer (None = unreachable)."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
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
                ("draining", "1 while the worker drains (it takes nothing new)"),
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
        counters = st.get("counters") or {}
        for key, doc in (
            ("drains", "workers that began draining at this broker (since it started)"),
            ("handovers", "streams draining workers handed over (since it started)"),
        ):
            fam = GaugeMetricFamily(f"zserve_broker_{key}", doc)
            fam.add_metric([], float(counters.get(key, 0)))
            yield fam
        yield from tenant_metrics(st)  # per tenant, with --tenants (gateway/tenants.py)


class _Histogram:
    """One label set's buckets (non-cumulative counts, the last is +Inf) and sum."""

    __slots__ = ("counts", "sum")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * (buckets + 1)
        self.sum = 0.0


class ModelStats:
    """One model's numbers: plain ints and floats, turned into Prometheus
    families only when ``/metrics`` is scraped."""

    __slots__ = ("ttft", "itl", "duration", "prompt_tokens", "completion_tokens")

    def __init__(self) -> None:
        self.ttft = _Histogram(len(_LATENCY_BUCKETS))
        self.itl = _Histogram(len(_LATENCY_BUCKETS))
        self.duration = _Histogram(len(_DURATION_BUCKETS))
        self.prompt_tokens = 0
        self.completion_tokens = 0


def _observe(h: _Histogram, bounds: tuple[float, ...], v: float) -> None:
    h.counts[bisect_left(bounds, v)] += 1  # le is inclusive: v == bound counts in it
    h.sum += v


def _histogram(
    name: str, doc: str, bounds: tuple[float, ...], per_model: dict[str, ModelStats], key: str
) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["model"])
    les = [floatToGoString(b) for b in bounds] + ["+Inf"]
    for model, st in per_model.items():
        h: _Histogram = getattr(st, key)
        cum = list(itertools.accumulate(h.counts))
        fam.add_metric([model], list(zip(les, cum, strict=True)), h.sum)
    return fam


class _GatewayCollector(Collector):
    """The gateway's own families, read from ``Metrics``' plain counters."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m = self.m
        per_model = m.models
        req = CounterMetricFamily(
            "zserve_gateway_requests", "finished requests", labels=["model", "endpoint"]
        )
        for (model, endpoint), v in m.requests.items():
            req.add_metric([model, endpoint], v)
        yield req
        for name, doc, key in (
            ("zserve_gateway_prompt_tokens", "prompt tokens", "prompt_tokens"),
            ("zserve_gateway_completion_tokens", "generated tokens", "completion_tokens"),
        ):
            fam = CounterMetricFamily(name, doc, labels=["model"])
            for model, st in per_model.items():
                fam.add_metric([model], getattr(st, key))
            yield fam
        yield _histogram(
            "zserve_gateway_time_to_first_token_seconds",
            "request received to first token read",
            _LATENCY_BUCKETS, per_model, "ttft",
        )  # fmt: skip
        yield _histogram(
            "zserve_gateway_inter_token_latency_seconds",
            "gap between successive token batches of one choice",
            _LATENCY_BUCKETS, per_model, "itl",
        )  # fmt: skip
        yield _histogram(
            "zserve_gateway_request_duration_seconds",
            "request received to last byte",
            _DURATION_BUCKETS, per_model, "duration",
        )  # fmt: skip
        yield CounterMetricFamily(
            "zserve_gateway_stream_resumes",
            "streams continued on another worker after theirs died mid-stream",
            value=m.resumes(),
        )
        yield CounterMetricFamily(
            "zserve_gateway_stream_handovers",
            "streams moved on purpose: handed over by a draining worker, or away "
            "from a broker that said goodbye",
            value=m.handovers(),
        )
        moves = HistogramMetricFamily(
            "zserve_gateway_stream_move_stall_seconds",
            "a stream's move (resume, hand-over, broker lost or gone) to its next token",
        )
        les = [floatToGoString(b) for b in _LATENCY_BUCKETS] + ["+Inf"]
        cum = list(itertools.accumulate(m.moves.counts))
        moves.add_metric([], list(zip(les, cum, strict=True)), m.moves.sum)
        yield moves
        drain = GaugeMetricFamily("zserve_gateway_draining", "1 while the gateway drains")
        drain.add_metric([], 1.0 if m.draining() else 0.0)
        yield drain
        inf = GaugeMetricFamily("zserve_gateway_requests_in_flight", "requests being served")
        inf.add_metric([], m.in_flight)
        yield inf
        err = CounterMetricFamily(
            "zserve_gateway_errors", "failed requests", labels=["code", "status"]
        )
        for (code, status), v in m.errors.items():
            err.add_metric([code, status], v)
        yield err


class Metrics:
    """The gateway's metrics, in a registry of their own.

    The request path only adds to plain ints, floats and lists (the event
    loop is the only writer); ``render`` builds the Prometheus families from
    them at scrape time. prometheus_client's own Counter and Histogram take
    a lock and check their arguments on every call: about 2 us each, and a
    1-token request made seven of them.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.broker = _BrokerCollector()
        r.register(self.broker)
        r.register(_GatewayCollector(self))
        self.models: dict[str, ModelStats] = {}
        self.requests: dict[tuple[str, str], int] = {}  # (model, endpoint) -> finished
        self.errors: dict[tuple[str, str], int] = {}  # (code, status) -> failed
        self.in_flight = 0
        # streams continued on another worker so far (read from the client)
        self.resumes: Callable[[], int] = lambda: 0
        self.handovers: Callable[[], int] = lambda: 0  # and moved on purpose
        self.moves = _Histogram(len(_LATENCY_BUCKETS))  # their stalls
        self.draining: Callable[[], bool] = lambda: False

    def moved(self, stall: float) -> None:
        """A stream that moved got its next token ``stall`` seconds later."""
        _observe(self.moves, _LATENCY_BUCKETS, stall)

    def model(self, model: str) -> ModelStats:
        st = self.models.get(model)
        if st is None:
            st = self.models[model] = ModelStats()
        return st

    def error(self, code: str, status: int) -> None:
        key = (code, str(status))
        self.errors[key] = self.errors.get(key, 0) + 1

    def finished(self, model: str, endpoint: str) -> None:
        key = (model, endpoint)
        self.requests[key] = self.requests.get(key, 0) + 1

    def render(self, status: dict[str, Any] | None) -> bytes:
        self.broker.status = status
        return generate_latest(self.registry)


class Tracker:
    """One request's timings and counts; ``done`` records them."""

    __slots__ = ("metrics", "model", "endpoint", "t0", "last", "first", "closed", "_st")

    def __init__(self, metrics: Metrics, model: str, endpoint: str, choices: int) -> None:
        self.metrics = metrics
        self.model = model
        self.endpoint = endpoint
        self.t0 = perf_counter()
        self.last: list[float] = [0.0] * choices
        self.first = True
        self.closed = False
        self._st: ModelStats | None = None
        metrics.in_flight += 1

    def batch(self, index: int) -> None:
        """A batch of deltas was read for choice ``index``."""
        now = perf_counter()
        st = self._st
        if st is None:
            st = self._st = self.metrics.model(self.model)
        last = self.last[index]
        if last:
            _observe(st.itl, _LATENCY_BUCKETS, now - last)
        elif self.first:
            self.first = False
            _observe(st.ttft, _LATENCY_BUCKETS, now - self.t0)
        self.last[index] = now

    def done(self, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        m.in_flight -= 1
        st = self._st or m.model(self.model)
        st.prompt_tokens += prompt_tokens
        st.completion_tokens += completion_tokens
        _observe(st.duration, _DURATION_BUCKETS, perf_counter() - self.t0)
        m.finished(self.model, self.endpoint)

    def failed(self, code: str, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        m = self.metrics
        m.in_flight -= 1
        m.error(code, status)
        if self._st is not None:  # the broker had accepted it: count it for the model
            m.finished(self.model, self.endpoint)
