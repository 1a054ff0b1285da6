"""A tool-calling stream whose worker dies mid-call continues on another
worker: the new worker primes its parser with the text already delivered, so
the caller's fragments put together are the uninterrupted run's calls, each
announced once. Real broker and null workers writing a scripted hermes
reply; the serving worker is SIGKILLed. The Python client, which takes the
same tool options as the gateway (``generate`` folds the calls into
``Completion.tool_calls``).

With a stop string, what the earlier attempt held back is content (the stop
strings see the converter's content, not the model's text): a continuation
sent as the client sends one (``continuation``) restores it from the content,
so no tool-call text leaks into it."""

from __future__ import annotations

import json
from typing import Any

import zmq

from tests.conftest import FAST_HB
from tests.system.test_resume import kill_pid, serving_pid
from zserve import protocol as p
from zserve.protocol import Delta, merge_tool_calls

SCRIPT = (
    "Let me check.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather"}},
    {"type": "function", "function": {"name": "get_time"}},
]


def test_a_tool_call_stream_resumes_mid_call(stack: Any) -> None:
    stack.start_broker(*FAST_HB)
    for _ in range(2):
        stack.worker(
            "--model", "m", "--token-delay", "0.05", "--engine-arg", f"script={SCRIPT}",
            "--tool-call-parser", "hermes", *FAST_HB,
        )  # fmt: skip
    stack.wait_workers(2, timeout=60)
    with stack.client() as c:
        s = c.stream("m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
        deltas = []
        ids = 0
        killed = False
        for d in s:
            deltas.append(d)
            ids += len(d.token_ids or [])
            if not killed and ids >= 20:  # 60 characters: inside the first call
                kill_pid(stack, serving_pid(stack, "m"))
                killed = True
        assert killed and c.resumes == 1
        whole = c.generate("m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS)
    assert (whole.text, whole.finish_reason) == ("Let me check.", "tool_calls")
    assert whole.tool_calls is not None
    assert [t["function"]["name"] for t in whole.tool_calls] == ["get_weather", "get_time"]
    assert "".join(d.text for d in deltas) == "Let me check."
    assert deltas[-1].finish_reason == "tool_calls"
    frags = [f for d in deltas for f in d.tool_calls or []]
    assert [f["index"] for f in frags if "id" in f] == [0, 1]  # each call announced once
    calls: list[dict[str, Any]] = []
    merge_tool_calls(calls, frags)
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
    assert got == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"tz": "CET"})]


def continuation(
    frontend: str, model: str, messages: list[dict[str, Any]], params: p.SamplingParams,
    cont: list[int], chars: int,
) -> list[Delta]:  # fmt: skip
    """A continuation sent as a client's resumption sends it (the ids and the
    characters of text the caller got), read to its final: its deltas."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(frontend)
    try:
        body = p.encode_generate(None, messages, params.encode(), cont, chars)
        s.send_multipart([p.CLIENT, p.C_REQUEST, b"resume-1", model.encode(), body])
        out: list[Delta] = []
        while True:
            assert s.poll(60_000), "no answer to the continuation"
            frames = s.recv_multipart()
            if frames[1] != p.C_TOKENS:
                continue  # a broker heartbeat
            for rec in p.decode_tokens(frames[2]):
                _, d = Delta.from_record(rec)
                assert d.finish_reason != p.FINISH_ERROR, d.error
                out.append(d)
                if d.finish_reason is not None:
                    return out
    finally:
        s.close()


def called(deltas: list[Delta]) -> list[tuple[str, Any]]:
    """The calls the deltas' fragments make: (name, arguments parsed)."""
    merged: list[dict[str, Any]] = []
    merge_tool_calls(merged, [f for d in deltas for f in d.tool_calls or []])
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in merged]


HELD = "Let me check the forecast<tool_call>\n" + SCRIPT[SCRIPT.index("{") :]


def test_a_continuation_holds_back_content_not_tool_call_text(stack: Any) -> None:
    """The first attempt delivered the ids past ``<tool_call>`` while its stop
    string held ``forecast`` back (it may begin ``forecasts``): the rest is
    that content and the calls. Restored from the model's text instead, the
    held part held the call's text too, which then came out as content."""
    stack.start_broker(*FAST_HB)
    stack.worker(
        "--model", "m", "--engine-arg", f"script={HELD}", "--tool-call-parser", "hermes",
        *FAST_HB,
    )  # fmt: skip
    stack.wait_workers(1, timeout=60)
    msgs = [{"role": "user", "content": "hi"}]
    kw: dict[str, Any] = {"tools": TOOLS, "stop": ["forecasts"], "max_tokens": 200}
    with stack.client() as c:
        whole = c.generate("m", messages=msgs, **kw)
    assert (whole.text, whole.finish_reason) == ("Let me check the forecast", "tool_calls")
    # 3 characters a token (null's script): cut inside the first call's name
    k = len("Let me check the forecast<tool_call>\n{") // 3 + 1
    got = len("Let me check the ")
    rest = continuation(stack.frontend, "m", msgs, p.SamplingParams(**kw), list(range(k)), got)
    assert "".join(d.text for d in rest) == "forecast"
    assert rest[-1].finish_reason == "tool_calls"
    assert called(rest) == [("get_weather", {"city": "Paris", "days": 2}),
                            ("get_time", {"tz": "CET"})]  # fmt: skip


EXHAUSTED = "abcdefgh#xyz"  # tokens abc, def, gh#, xyz


def test_a_continuation_with_no_tokens_left_ends_as_the_run_would(stack: Any) -> None:
    """Every id ``max_tokens`` allows was delivered, the final was not: the
    continuation generates nothing and its final carries what the
    uninterrupted run's final carried, the text a stop string held back
    (``#`` may begin ``#!``), and, with tools, what the converter holds; it
    came back empty before, the held text lost."""
    stack.start_broker(*FAST_HB)
    stack.worker("--model", "m", "--engine-arg", f"script={EXHAUSTED}", *FAST_HB)
    stack.worker("--model", "t", "--engine-arg", f"script={HELD}", "--tool-call-parser",
                 "hermes", *FAST_HB)  # fmt: skip
    stack.wait_workers(2, timeout=60)
    msgs = [{"role": "user", "content": "hi"}]
    plain: dict[str, Any] = {"stop": ["#!"], "max_tokens": 3}
    # the tool reply cut right after the first call's </tool_call> (39 tokens of 3)
    cut = (HELD.index("</tool_call>\n") + len("</tool_call>\n")) // 3
    tooled: dict[str, Any] = {"tools": TOOLS, "stop": ["forecasts"], "max_tokens": cut}
    with stack.client() as c:
        whole = c.generate("m", messages=msgs, **plain)
        whole_t = c.generate("t", messages=msgs, **tooled)
    assert (whole.text, whole.finish_reason) == ("abcdefgh#", "length")
    rest = continuation(stack.frontend, "m", msgs, p.SamplingParams(**plain), [0, 1, 2], 8)
    assert [(d.text, d.finish_reason) for d in rest] == [("#", "length")]
    assert rest[-1].usage is not None and rest[-1].usage["completion_tokens"] == 3

    assert (whole_t.text, whole_t.finish_reason) == ("Let me check the forecast", "length")
    assert whole_t.tool_calls is not None and len(whole_t.tool_calls) == 1
    got = len("Let me check the ")
    rest = continuation(stack.frontend, "t", msgs, p.SamplingParams(**tooled),
                        list(range(cut)), got)  # fmt: skip
    assert "".join(d.text for d in rest) == "forecast"
    assert rest[-1].finish_reason == "length"
    # the call was announced before the cut: the primed converter does not again
    assert not [f for d in rest for f in d.tool_calls or [] if "id" in f]
