"""What one HTTP request may cost (issue 19, defects 5 and 8): streams
(``n`` x prompts), bytes in flight, the body, its JSON; and input that no
request can carry is a 400 naming the field, never a 500."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from zserve.client import AsyncClient
from zserve.gateway import limits, schema
from zserve.gateway.generation import close_all, open_streams
from zserve.launcher import free_port, start_broker, start_worker, wait_models

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def root() -> Iterator[str]:
    broker, fe, be = start_broker(*FAST_HB)
    procs = [broker]
    try:
        procs.append(
            start_worker(be, "--engine", "null", "--model", "m", "--capacity", "16", *FAST_HB)
        )
        gateway, url = start_gateway(fe, *FAST_HB)
        procs.append(gateway)
        wait_models(fe, ["m"], 30)
        yield url
    finally:
        for pr in reversed(procs):
            pr.stop()


def post(root: str, path: str, body: Any) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(root + "/v1" + path, content=raw, headers=headers, timeout=60)


def assert_400(r: httpx.Response, param: str | None, *words: str) -> None:
    assert r.status_code == 400, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "bad_request"
    assert err["param"] == param, err
    for w in words:
        assert w in err["message"], err


# ------------------------------------------------------------ fan-out


def test_choices_times_prompts_are_bounded(root: str) -> None:
    r = post(root, "/completions", {"model": "m", "prompt": ["hi"] * 64, "n": 4, "max_tokens": 1})
    assert_400(r, "n", "256 choices", str(limits.MAX_STREAMS))
    r = post(root, "/completions", {"model": "m", "prompt": ["hi"] * 129, "max_tokens": 1})
    assert_400(r, "prompt", "129 choices")
    r = post(root, "/completions", {"model": "m", "prompt": ["hi"] * 2, "n": 64, "max_tokens": 1})
    assert r.status_code == 200, r.text[:300]
    assert len(r.json()["choices"]) == 128


def test_bytes_in_flight_are_bounded(root: str) -> None:
    """A 200 KiB prompt x 100 choices is 20 MiB of requests through the
    broker to the workers: refused before any is sent."""
    body = {"model": "m", "prompt": "x" * (200 * 1024), "n": 100, "max_tokens": 1}
    assert_400(post(root, "/completions", body), "n", str(limits.MAX_FANOUT_BYTES))
    chat = {"model": "m", "messages": [{"role": "user", "content": "y" * MiB}], "n": 20}
    assert_400(post(root, "/chat/completions", chat), "n", str(limits.MAX_FANOUT_BYTES))
    body["n"] = 2  # 400 KiB in all: fine
    r = post(root, "/completions", body)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_body_over_8_mib_is_refused(root: str) -> None:
    small = json.dumps({"model": "m", "prompt": "hi", "max_tokens": 1}).encode()
    padded = small[:-1] + b" " * (9 * MiB) + b"}"  # valid JSON, 9 MiB
    assert_400(post(root, "/completions", padded), None, str(limits.MAX_BODY))
    assert post(root, "/completions", small).status_code == 200


def test_choices_of_one_prompt_share_one_encoded_request() -> None:
    """n choices of one input: one encoded request body, n request ids."""

    async def main() -> None:
        client = AsyncClient(f"tcp://127.0.0.1:{free_port()}")  # nothing is sent
        try:
            req = schema.parse_completion(
                {"model": "m", "prompt": ["a" * 100_000, "b"], "n": 4, "max_tokens": 1}
            )
            streams = await open_streams(client, req)
            frames = [s._frames for s in streams]
            assert all(f is not None for f in frames)
            bodies = [f[4] for f in frames if f is not None]
            assert all(b is bodies[0] for b in bodies[:4]), "prompt a encoded more than once"
            assert all(b is bodies[4] for b in bodies[4:]), "prompt b encoded more than once"
            assert bodies[0] is not bodies[4]
            for f in frames:  # model, body, heartbeat and routing frames: the same objects
                first = frames[0] if f[4] is bodies[0] else frames[4]
                assert f is not None and first is not None
                assert all(a is b for a, b in zip(f[3:], first[3:], strict=True))
            ids = [f[2] for f in frames if f is not None]
            assert len(set(ids)) == 8
            await close_all(streams)
            assert not client._core.streams  # closed unsent: nothing left behind
        finally:
            await client.aclose()

    asyncio.run(main())


# --------------------------------------------------------------- JSON


def test_json_nested_100000_deep_is_400(root: str) -> None:
    deep = b'{"model":"m","prompt":"hi","stop":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert_400(post(root, "/completions", deep), None, "nested")
    # Parseable by the C decoder, still past the limit (the small-body path).
    d = limits.MAX_JSON_DEPTH
    deep = b'{"model":"m","prompt":"hi","stop":' + b"[" * d + b"]" * d + b"}"
    assert_400(post(root, "/chat/completions", deep), None, f"deeper than {d}")


def test_json_values_are_bounded(root: str) -> None:
    """A body of many small values is refused once the count is past the
    limit, not parsed whole on the event loop."""
    ids = b"[" + b"0," * limits.MAX_JSON_VALUES + b"0]"
    body = b'{"model":"m","prompt":"hi","stop_token_ids":' + ids + b"}"
    assert_400(post(root, "/completions", body), None, str(limits.MAX_JSON_VALUES))
    # A big body of few values parses (off the loop) and runs.
    big = {"model": "m", "prompt": "z" * (2 * MiB), "max_tokens": 1}
    assert post(root, "/completions", big).status_code == 200


# ---------------------------------------------------------- 500 -> 400


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("max_tokens", 10**20),
        ("stop_token_ids", [2**64]),
        ("temperature", 10**400),
        ("top_p", -(10**400)),
        ("presence_penalty", 10**400),
    ],
    ids=[
        "seed=2**64",
        "seed=-2**63-1",
        "max_tokens=10**20",
        "stop_token_ids=[2**64]",
        "temperature=10**400",
        "top_p=-10**400",
        "presence_penalty=10**400",
    ],
)
def test_out_of_range_numbers_are_400(root: str, field: str, value: Any) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: value}
    assert_400(post(root, "/chat/completions", chat), field)
    assert_400(
        post(root, "/completions", {"model": "m", "prompt": "hi", "n": 2, field: value}), field
    )
