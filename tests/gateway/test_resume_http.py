"""Resumption through the OpenAI gateway: an SSE stream whose worker is
SIGKILLed mid-answer reads on, unbroken, from another worker; with
``"resume": false`` it ends with a worker_lost error event instead."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from tests.gateway.test_http import sample
from tests.system.test_resume import kill_pid, serving_pid


def _events(lines):  # type: ignore[no-untyped-def]
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield None if data == "[DONE]" else json.loads(data)


@pytest.mark.parametrize("resume", [True, False])
def test_an_sse_stream_outlives_its_worker(stack, resume):
    stack.start_broker(*FAST_HB)
    for _ in range(2):
        stack.worker("--model", "m", "--capacity", "4", "--token-delay", "0.05", *FAST_HB)
    stack.wait_workers(2)
    proc, root = start_gateway(stack.frontend, *FAST_HB)
    stack.procs.append(proc)
    body = {"model": "m", "prompt": "x", "max_tokens": 60, "stream": True,
            "stream_options": {"include_usage": True}, "resume": resume}  # fmt: skip
    before = httpx.get(root + "/metrics").text
    text, error, usage, killed = "", None, None, False
    with httpx.stream("POST", root + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        for ev in _events(r.iter_lines()):
            if ev is None:
                break
            if "error" in ev:
                error = ev["error"]
                continue
            if ev.get("usage"):
                usage = ev["usage"]
            for ch in ev.get("choices", []):
                text += ch.get("text") or ""
            if len(text.split()) >= 20 and not killed:
                kill_pid(stack, serving_pid(stack, "m"))
                killed = True
    after = httpx.get(root + "/metrics").text
    resumes = sample(after, "zserve_gateway_stream_resumes_total") - sample(
        before, "zserve_gateway_stream_resumes_total"
    )
    if resume:
        assert error is None
        assert text == "".join(f"t{i} " for i in range(60))
        assert usage is not None and usage["completion_tokens"] == 60
        assert resumes == 1
    else:
        assert error is not None and error["code"] == "worker_lost"
        assert text.split() == [f"t{i}" for i in range(len(text.split()))]
        assert resumes == 0
