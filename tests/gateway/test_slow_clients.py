"""Slow and numerous HTTP clients (issue 19, defect 9), over raw sockets: a
request whose headers or body stop coming is answered 408 and closed within
its deadline; past ``--max-connections`` a request is answered 503 while
the streams already open carry on."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from zserve.gateway.limits import MAX_HEADER_BYTES
from zserve.launcher import start_broker, start_worker, wait_for, wait_models

DEADLINE = 1.0  # --header-timeout and --body-timeout of the gateway under test
MAX_CONNECTIONS = 3


@pytest.fixture(scope="module")
def root() -> Iterator[str]:
    broker, fe, be = start_broker(*FAST_HB)
    procs = [broker]
    try:
        procs.append(
            start_worker(
                be,
                "--engine",
                "null",
                "--model",
                "slow",
                "--capacity",
                "8",
                "--token-delay",
                "0.05",
                *FAST_HB,
            )  # fmt: skip
        )
        gateway, url = start_gateway(
            fe, "--header-timeout", str(DEADLINE), "--body-timeout", str(DEADLINE),
            "--max-connections", str(MAX_CONNECTIONS), *FAST_HB,
        )  # fmt: skip
        procs.append(gateway)
        wait_models(fe, ["slow"], 30)
        yield url
    finally:
        for pr in reversed(procs):
            pr.stop()


def connect(root: str) -> socket.socket:
    host, port = root.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    return s


def read_until_closed(s: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took
    (socket.timeout, 10 s, if it never does)."""
    t0 = time.monotonic()
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out, time.monotonic() - t0


def status_of(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def error_of(reply: bytes) -> dict:
    return json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]


REQUEST_LINE = b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\n"


def test_half_sent_headers_are_closed(root: str) -> None:
    with connect(root) as s:
        s.sendall(REQUEST_LINE + b"Content-Type: appl")
        reply, took = read_until_closed(s)
    assert took < DEADLINE + 3, took
    assert status_of(reply) == 408 and error_of(reply)["code"] == "request_timeout"


def test_silent_connection_is_closed(root: str) -> None:
    with connect(root) as s:
        reply, took = read_until_closed(s)
    assert took < DEADLINE + 3 and status_of(reply) == 408


def test_trickled_headers_are_closed(root: str) -> None:
    """The deadline is for the whole headers, not between their bytes."""
    with connect(root) as s:
        s.settimeout(DEADLINE / 5)
        t0 = time.monotonic()
        s.sendall(REQUEST_LINE)
        reply = b""
        while time.monotonic() - t0 < DEADLINE + 5:
            try:
                chunk = s.recv(65536)
            except TimeoutError:  # nothing yet: one more header line
                try:
                    s.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    break
                continue
            if not chunk:
                break
            reply += chunk
        took = time.monotonic() - t0
    assert took < DEADLINE + 3, took
    assert status_of(reply) == 408


def test_half_sent_body_is_closed(root: str) -> None:
    with connect(root) as s:
        s.sendall(REQUEST_LINE + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        s.sendall(b'{"model": ')
        reply, took = read_until_closed(s)
    assert took < DEADLINE + 3, took
    assert status_of(reply) == 408 and "body" in error_of(reply)["message"]


def test_body_in_parts_within_the_deadline_is_served(root: str) -> None:
    body = json.dumps({"model": "slow", "prompt": "hi", "max_tokens": 1}).encode()
    head = REQUEST_LINE + b"Content-Type: application/json\r\nConnection: close\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with connect(root) as s:
        s.sendall(head + body[:5])
        time.sleep(DEADLINE / 4)  # pacing the client, not waiting for the server
        s.sendall(body[5:])
        reply, _ = read_until_closed(s)
    assert status_of(reply) == 200, reply[:300]


def test_kept_alive_connection_serves_a_later_request(root: str) -> None:
    with httpx.Client(base_url=root, timeout=10) as c:
        assert c.get("/health").status_code == 200
        time.sleep(DEADLINE / 2)  # idle, inside the keep-alive timeout
        assert c.get("/health").status_code == 200


def test_oversized_headers_are_431(root: str) -> None:
    line = b"X-Big: " + b"a" * 1024 + b"\r\n"
    with connect(root) as s:
        s.sendall(REQUEST_LINE + line * (MAX_HEADER_BYTES // len(line) + 8))
        reply, _ = read_until_closed(s)
    assert status_of(reply) == 431 and error_of(reply)["code"] == "headers_too_large"


def test_over_the_connection_cap_is_503_while_streams_go_on(root: str) -> None:
    body = {"model": "slow", "prompt": "hi", "max_tokens": 20, "stream": True}
    clients = [httpx.Client(base_url=root, timeout=30) for _ in range(MAX_CONNECTIONS)]
    streams = []
    try:
        for c in clients:  # the cap's worth of streams, each on its own connection
            r = c.send(c.build_request("POST", "/v1/completions", json=body), stream=True)
            streams.append(r)
            assert r.status_code == 200
        lines = [r.iter_lines() for r in streams]
        for it in lines:
            assert next(it).startswith("data: ")  # each stream is running
        over = httpx.post(root + "/v1/completions", json=body, timeout=10)
        assert over.status_code == 503
        assert over.json()["error"]["code"] == "too_many_connections"
        for it in lines:  # the streams already open finish
            rest = list(it)
            assert "data: [DONE]" in rest
    finally:
        for r in streams:
            r.close()
        for c in clients:
            c.close()

    def served() -> bool:  # once those connections are closed, room again
        return httpx.get(root + "/health", timeout=10).status_code == 200

    wait_for(served, 10, "a request to be served after the streams closed")
