"""A constrained stream outlives its worker: SIGKILLed mid-answer, it goes on
on another worker, which replays the delivered ids into the grammar first,
so the caller gets one unbroken reply, equal id for id to an uninterrupted
run (greedy), and still valid. Real broker and hf worker processes."""

from __future__ import annotations

import json

import jsonschema

from tests.system.test_resume import PROMPT, _greedy_stack, kill_pid, medium_model_dir, read

__all__ = ["medium_model_dir"]  # the fixture, shared with test_resume

# A long required string keeps the stream going long enough to be killed in.
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 40},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    },
    "required": ["title", "year"],
}


def test_a_constrained_hf_stream_resumes_exactly(stack, medium_model_dir):
    _greedy_stack(stack, "hf", medium_model_dir, "--engine-arg", "threads=1")
    kw = {"max_tokens": 96, "temperature": 0,
          "structured": {"type": "json", "value": SCHEMA}}  # fmt: skip
    with stack.client(timeout=120) as c:
        whole = c.generate("tiny", PROMPT, **kw)
        assert whole.finish_reason == "stop"
        jsonschema.validate(json.loads(whole.text), SCHEMA)
        # round robin: the next request goes to the worker that has had none
        (pid,) = [w["pid"] for w in stack.status()["workers"] if w["dispatched"] == 0]
        s = c.stream("tiny", PROMPT, **kw)
        head, head_ids, head_text = read(s, 1)
        kill_pid(stack, pid)
        tail, tail_ids, tail_text = read(s)
        assert c.resumes == 1, f"the worker finished before it was killed ({len(head_ids)} read)"
        assert head_ids + tail_ids == whole.token_ids
        assert head_text + tail_text == whole.text
        assert tail[-1].finish_reason == "stop"


