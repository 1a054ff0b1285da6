"""A tool-calling stream whose worker dies mid-call continues on another
worker: the new worker primes its parser with the text already delivered, so
the caller's fragments put together are the uninterrupted run's calls, each
announced once. Real broker and null workers writing a scripted hermes
reply; the serving worker is SIGKILLed. The Python client, which takes the
same tool options as the gateway (``generate`` folds the calls into
``Completion.tool_calls``)."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import FAST_HB
from tests.system.test_resume import kill_pid, serving_pid
from zserve.protocol import merge_tool_calls

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
