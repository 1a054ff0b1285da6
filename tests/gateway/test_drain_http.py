"""The gateway's planned stop: on SIGTERM ``/ready`` fails at once while the
listener is still open (``/health`` stays), responses close their
connections, then the listener closes (new connections are refused) and
the open stream finishes whole before the process exits."""

from __future__ import annotations

import json
import signal
import time

import httpx

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from tests.gateway.test_http import sample
from zserve.launcher import start_broker, start_worker, wait_for


def refused(root: str) -> bool:
    try:
        httpx.get(root + "/health", timeout=2)
    except httpx.ConnectError:
        return True
    return False


def test_sigterm_fails_ready_first_then_closes_and_finishes_open_streams() -> None:
    broker, fe, be = start_broker(*FAST_HB)
    procs = [broker]
    try:
        procs.append(start_worker(
            be, "--engine", "null", "--model", "m", "--token-delay", "0.05", *FAST_HB
        ))  # fmt: skip
        gw, root = start_gateway(fe, "--drain-delay", "3", "--drain-timeout", "20", *FAST_HB)
        procs.append(gw)
        wait_for(lambda: httpx.get(root + "/ready", timeout=5).status_code == 200, 20, "ready")
        body = {"model": "m", "stream": True, "max_tokens": 60,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        with httpx.Client(timeout=30) as http, httpx.Client(timeout=30) as kept:
            assert kept.get(root + "/health").status_code == 200  # a kept-alive connection
            text: list[str] = []
            with http.stream("POST", root + "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        if delta.get("content"):
                            text.append(delta["content"])
                            break
                gw.kill(signal.SIGTERM)
                t0 = time.monotonic()
                wait_for(
                    lambda: httpx.get(root + "/ready", timeout=5).status_code == 503, 2.0,
                    "/ready to fail",
                )  # fmt: skip
                ready = httpx.get(root + "/ready", timeout=5)  # a new connection: still taken
                assert ready.json()["reason"] == "the gateway is stopping (draining)"
                assert httpx.get(root + "/health", timeout=5).status_code == 200
                h = kept.get(root + "/health")
                assert h.status_code == 200 and h.headers["connection"] == "close"
                wait_for(lambda: refused(root), 10, "the listener to close")
                assert time.monotonic() - t0 >= 2.5  # not before the drain delay (3 s)
                done = False
                for line in lines:
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: {"):
                        delta = json.loads(line[6:])["choices"][0]["delta"]
                        text.append(delta.get("content") or "")
            assert done and "".join(text) == "".join(f"t{i} " for i in range(60))
        assert gw.popen.wait(15) == 0
    finally:
        for pr in reversed(procs):
            pr.stop()


def test_a_worker_drain_under_an_sse_stream_is_seen_in_the_metrics() -> None:
    """A worker SIGTERMed with a short grace under an SSE stream: the stream
    ends whole on the other worker, and /metrics counts the drain, the
    hand-over and its stall."""
    broker, fe, be = start_broker(*FAST_HB)
    procs = [broker]
    try:
        leaving = start_worker(be, "--engine", "null", "--model", "m", "--token-delay", "0.05",
                               "--drain-timeout", "0.3", *FAST_HB)  # fmt: skip
        procs.append(leaving)
        gw, root = start_gateway(fe, *FAST_HB)
        procs.append(gw)
        wait_for(lambda: httpx.get(root + "/ready", timeout=5).status_code == 200, 20, "ready")
        # 6 s of tokens: on a loaded machine the second worker can take
        # seconds to start, and the SIGTERM must still find the stream running
        body = {"model": "m", "stream": True, "max_tokens": 120,
                "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
        text: list[str] = []
        with httpx.Client(timeout=30) as http:
            with http.stream("POST", root + "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        text.append(json.loads(line[6:])["choices"][0]["delta"].get("content")
                                    or "")  # fmt: skip
                        if text[-1]:
                            break
                procs.append(start_worker(be, "--engine", "null", "--model", "m",
                                          "--token-delay", "0.05", *FAST_HB))  # fmt: skip
                wait_for(lambda: httpx.get(root + "/health", timeout=5).json()["workers"] == 2,
                         20, "the second worker")  # fmt: skip
                leaving.kill(signal.SIGTERM)
                for line in lines:
                    if line.startswith("data: {"):
                        text.append(json.loads(line[6:])["choices"][0]["delta"].get("content")
                                    or "")  # fmt: skip
            assert "".join(text) == "".join(f"t{i} " for i in range(120))
            assert leaving.popen.wait(10) == 0

            def scraped() -> str | None:  # (the broker's part is up to a second old)
                text = http.get(root + "/metrics").text
                return text if sample(text, "zserve_broker_drains") else None

            metrics = wait_for(scraped, 10, "the broker's drain in /metrics")
        assert sample(metrics, "zserve_gateway_stream_handovers_total") == 1
        assert sample(metrics, "zserve_gateway_stream_resumes_total") == 0
        assert sample(metrics, "zserve_gateway_stream_move_stall_seconds_count") == 1
        assert sample(metrics, "zserve_broker_drains") == 1
        assert sample(metrics, "zserve_broker_handovers") == 1
    finally:
        for pr in reversed(procs):
            pr.stop()
