"""cache_aware dispatch with real processes and null workers: conversations
stay on one worker while loads stay within the threshold; malformed routing
frames are counted and answered, and the broker keeps serving."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess

import zmq

from tests.conftest import FAST_HB
from zserve import AsyncClient
from zserve import protocol as p
from zserve.launcher import wait_for, zserve_cmd

SYSTEM = "You are a careful assistant. " * 40  # ~1,100 characters, shared by all


def _dispatched(stack) -> dict[str, int]:
    return {w["id"]: w["dispatched"] for w in stack.status()["workers"]}


def _turn(i: int, t: int) -> str:
    return f"conversation {i}, question {t}: " + "tell me more about it. " * 12


def test_turns_of_a_conversation_land_on_one_worker(stack):
    stack.start_broker("--dispatch", "cache_aware", *FAST_HB)
    for _ in range(2):
        stack.worker("--model", "m", "--capacity", "8")
    stack.wait_workers(2)
    homes: list[str] = []
    with stack.client() as c:
        for i in range(8):
            before = _dispatched(stack)
            msgs = [{"role": "system", "content": SYSTEM}]
            for t in range(4):
                msgs.append({"role": "user", "content": _turn(i, t)})
                out = c.generate("m", messages=msgs, max_tokens=8)
                msgs.append({"role": "assistant", "content": out.text})
            after = _dispatched(stack)
            grew = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w, 0)}
            assert list(grew.values()) == [4], grew  # every turn on one worker
            homes.append(next(iter(grew)))
    # One at a time, loads stay equal: the shared system prompt keeps every
    # conversation where it was first sent (load spreads them: next test).
    assert len(set(homes)) == 1, homes
    st = stack.status()
    pm = st["prefix_map"]
    assert pm["hits"] >= 8 * 3 and pm["entries"] > 0
    assert st["counters"]["cache_hits"] == pm["hits"]
    # `zserve status` shows the map's size and hit rate
    out = subprocess.run(
        zserve_cmd("status", "--broker", stack.frontend), capture_output=True, text=True,
        timeout=60, check=True,
    ).stdout  # fmt: skip
    assert f"prefix map: {pm['entries']} / 65536 entries, hit rate" in out
    js = json.loads(subprocess.run(
        zserve_cmd("status", "--broker", stack.frontend, "--json"), capture_output=True,
        text=True, timeout=60, check=True,
    ).stdout)  # fmt: skip
    assert js["dispatch"] == "cache_aware" and js["prefix_map"]["hits"] == pm["hits"]


def test_concurrent_conversations_stick_within_the_load_threshold(stack):
    stack.start_broker(
        "--dispatch", "cache_aware", "--cache-threshold-abs", "2", "--cache-threshold-rel", "1",
        *FAST_HB,
    )  # fmt: skip
    for _ in range(2):
        stack.worker("--model", "m", "--capacity", "16", "--token-delay", "0.005")
    stack.wait_workers(2)

    async def run() -> None:
        async with AsyncClient(stack.frontend, timeout=30) as ac:

            async def conversation(i: int) -> None:
                msgs = [{"role": "system", "content": SYSTEM}]
                for t in range(5):
                    msgs.append({"role": "user", "content": _turn(i, t)})
                    out = await ac.generate("m", messages=msgs, max_tokens=10)
                    msgs.append({"role": "assistant", "content": out.text})

            await asyncio.gather(*(conversation(i) for i in range(12)))

    asyncio.run(run())
    st = stack.status()
    c = st["counters"]
    assert c["cache_hits"] + c["cache_misses"] == 60
    # Turns 2 to 5 find their conversation's own prefix, unless its worker
    # was over the threshold at that moment.
    assert c["cache_hits"] >= 12 * 4 - c.get("cache_overridden", 0)
    # The threshold spreads conversations that all share one system prompt:
    # at least 4 of the 12 (5 turns each) on each worker.
    assert min(w["dispatched"] for w in st["workers"]) >= 20, st["workers"]


def test_a_session_stays_on_one_worker(stack):
    stack.start_broker("--dispatch", "cache_aware", *FAST_HB)
    for _ in range(3):
        stack.worker("--model", "m", "--capacity", "4")
    stack.wait_workers(3)
    with stack.client() as c:
        for s in range(6):
            before = _dispatched(stack)
            for t in range(5):  # short prompts: no prefix hashes, the session alone
                c.generate("m", f"turn {t}", max_tokens=2, session_id=f"user-{s}")
            after = _dispatched(stack)
            grew = {w: after[w] - before.get(w, 0) for w in after if after[w] != before.get(w, 0)}
            assert list(grew.values()) == [5], grew
    # (how sessions spread over workers: tests/broker/test_cache_aware.py)
    assert stack.status()["prefix_map"]["sessions"] == 30


def test_a_removed_worker_leaves_the_map_and_its_conversations_move(stack):
    stack.start_broker("--dispatch", "cache_aware", *FAST_HB)
    a = stack.worker("--model", "m", "--capacity", "8")
    stack.wait_workers(1)
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _turn(0, 0)}]
    with stack.client() as c:
        c.generate("m", messages=msgs, max_tokens=2)
        assert stack.status()["prefix_map"]["entries"] > 0
        stack.worker("--model", "m", "--capacity", "8")
        stack.wait_workers(2)
        a.stop()
        wait_for(lambda: len(stack.status()["workers"]) == 1, 10, "the stopped worker removed")
        assert stack.status()["prefix_map"]["entries"] == 0
        assert c.generate("m", messages=msgs, max_tokens=2).finish_reason == "length"


def test_malformed_routing_frames_are_counted_and_the_broker_serves_on(stack):
    stack.start_broker("--dispatch", "cache_aware", *FAST_HB)
    stack.worker("--model", "m", "--capacity", "8")
    stack.wait_workers(1)
    body = p.encode_generate("x", None, p.SamplingParams(max_tokens=1).encode())
    rng = random.Random(13)
    frames: list[bytes] = [b"\x02", b"\xff" * 9, b"\x00abc", b"\x01" + b"s" * 7,
                           b"\x00" + bytes(8 * (p.MAX_ROUTE_BLOCKS + 1))]  # fmt: skip
    frames += [rng.randbytes(rng.randrange(1, 300)) for _ in range(300)]
    bad = 0
    for f in frames:
        try:
            p.decode_routing(f)
        except ValueError:
            bad += 1
    assert bad > 250
    before = stack.status()["counters"].get("malformed", 0)
    ctx = zmq.Context.instance()
    fe = ctx.socket(zmq.DEALER)
    fe.setsockopt(zmq.LINGER, 0)
    fe.connect(stack.frontend)
    try:
        for i, f in enumerate(frames):
            fe.send_multipart([p.CLIENT, p.C_REQUEST, b"r%d" % i, b"m", body, b"1000", f])
        finals: dict[bytes, str] = {}
        while len(finals) < len(frames):  # each request ends once: bad_request or its tokens
            assert fe.poll(10_000), f"{len(finals)} of {len(frames)} answered"
            msg = fe.recv_multipart()
            if msg[1] != p.C_TOKENS:
                continue
            for r in p.decode_tokens(msg[2]):
                if r[3] is not None:
                    assert r[0] not in finals
                    finals[r[0]] = (r[4] or {}).get("error", {}).get("code", r[3])
    finally:
        fe.close()
    assert sum(1 for v in finals.values() if v == "bad_request") == bad
    st = stack.status()
    assert st["counters"]["malformed"] - before == bad
    with stack.client() as c:
        assert c.generate("m", "still serving", max_tokens=3).usage["completion_tokens"] == 3
