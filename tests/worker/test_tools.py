"""zserve/worker/tools.py without processes: the plan per tool_choice, the
converters from text to OpenAI tool-call fragments (streamed in any
chunking, and resumed from delivered text), the template side, and the
fragments' way through the protocol and the outbox."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from zserve import protocol as p
from zserve.errors import BadRequest
from zserve.protocol import Delta, SamplingParams, merge_tool_calls
from zserve.worker.engine import render_chat
from zserve.worker.outbox import Outbox
from zserve.worker.tools import JSONCalls, ParserCalls, ToolPlan, parser_class, plan

CITY = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": CITY}},
    {"type": "function", "function": {"name": "now"}},
]


def params(**kw: Any) -> SamplingParams:
    return SamplingParams.from_dict({"tools": TOOLS, **kw})


def run(conv: Any, text: str, step: int) -> list[dict[str, Any]]:
    """Feed ``text`` in pieces of ``step`` characters; every fragment emitted."""
    out: list[dict[str, Any]] = []
    for i in range(0, len(text), step):
        content, calls = conv.feed(text[i : i + step], [i])
        assert content == "" or isinstance(conv, ParserCalls)
        out += calls or []
    out += conv.end()[1] or []
    return out


def calls(fragments: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    merged: list[dict[str, Any]] = []
    merge_tool_calls(merged, fragments)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in merged)
    return [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in merged]


# ------------------------------------------------------------------ the plan


def test_plan_per_tool_choice() -> None:
    assert plan(params(tool_choice="none"), None) is None
    assert plan(SamplingParams(), None) is None
    with pytest.raises(BadRequest, match="--tool-call-parser"):
        plan(params(), None)  # auto is the default with tools
    auto = plan(params(tool_choice="auto"), object)
    assert auto is not None and auto.mode == "auto" and auto.offer == TOOLS
    assert auto.params.structured is None

    req = plan(params(tool_choice="required", parallel_tool_calls=False), None)
    assert req is not None and req.mode == "required" and req.offer == TOOLS
    spec = req.params.structured
    assert spec is not None and spec["type"] == "json" and not spec["whitespace"]
    schema = spec["value"]
    assert (schema["type"], schema["minItems"], schema["maxItems"]) == ("array", 1, 1)
    names = [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["now"]]
    assert schema["items"]["anyOf"][0]["properties"]["parameters"] == CITY
    assert schema["items"]["anyOf"][1]["properties"]["parameters"]["type"] == "object"
    par = plan(params(tool_choice="required"), None)
    assert par is not None and "maxItems" not in par.params.structured["value"]

    weather = {"type": "function", "function": {"name": "get_weather"}}
    named = plan(params(tool_choice=weather), None)
    assert named is not None and named.mode == "named" and named.name == "get_weather"
    assert named.params.structured["value"] == CITY
    both = params(tool_choice="required", structured={"type": "json_object"})
    with pytest.raises(BadRequest, match="cannot be combined"):
        plan(both, None)


def test_the_schema_validates_what_the_converter_reads() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    req = plan(params(tool_choice="required"), None)
    assert req is not None
    text = '[{"name":"get_weather","parameters":{"city":"Oslo"}},{"name":"now","parameters":{}}]'
    jsonschema.validate(json.loads(text), req.params.structured["value"])
    got = calls(run(JSONCalls(None), text, 7))
    assert got == [(0, "get_weather", '{"city":"Oslo"}'), (1, "now", "{}")]


# ------------------------------------------------------------------ converters


REQUIRED = (
    '[{"name": "get_weather", "parameters": {"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}},'
    ' {"parameters": {}, "name": "now"}]'
)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 11, 1000])
def test_required_calls_in_any_chunking(step: int) -> None:
    frags = run(JSONCalls(None), REQUIRED, step)
    assert calls(frags) == [
        (0, "get_weather", '{"city": "Pa\\"ris}", "n": [1, {"a": "]"}]}'),
        (1, "now", "{}"),
    ]
    # a call's header comes first, then its argument fragments, in order
    assert frags[0]["function"]["arguments"] == ""
    assert [f["index"] for f in frags] == sorted(f["index"] for f in frags)


def test_required_resumes_from_delivered_text() -> None:
    for cut in range(len(REQUIRED)):
        whole = run(JSONCalls(None), REQUIRED, 4)
        first = JSONCalls(None)
        before = run_partial(first, REQUIRED[:cut])
        second = JSONCalls(None)
        second.feed(REQUIRED[:cut], [])  # primed, output discarded
        after = run(second, REQUIRED[cut:], 4)
        both = [{**f, "id": "x"} if "id" in f else f for f in before + after]
        expect = [{**f, "id": "x"} if "id" in f else f for f in whole]
        merged_both: list[dict[str, Any]] = []
        merged_expect: list[dict[str, Any]] = []
        merge_tool_calls(merged_both, both)
        merge_tool_calls(merged_expect, expect)
        assert merged_both == merged_expect, cut


def run_partial(conv: Any, text: str) -> list[dict[str, Any]]:
    return conv.feed(text, [])[1] or [] if text else []


def test_named_call_is_the_whole_text() -> None:
    frags = run(JSONCalls("get_weather"), ' {"city": "Rome"}\n', 2)
    assert calls(frags) == [(0, "get_weather", '{"city": "Rome"}')]


@pytest.fixture(scope="module")
def hermes() -> Any:
    return parser_class("hermes")  # imports vLLM


HERMES = (
    'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_hermes_parser_calls_and_content(hermes: Any, step: int) -> None:
    conv = ParserCalls(hermes, _Vocab(), TOOLS)
    content, frags = "", []
    for i in range(0, len(HERMES), step):
        c, f = conv.feed(HERMES[i : i + step], [i])
        content += c
        frags += f or []
    frags += conv.end()[1] or []
    assert content == "Let me check."
    assert calls(frags) == [(0, "get_weather", '{"city": "Paris"}'), (1, "now", "{}")]
    assert conv.called


def test_the_parser_says_whether_special_tokens_stay(hermes: Any) -> None:
    """hermes' tags are special tokens in Qwen2.5 and Hermes: its requests keep
    special tokens in the text (its adjust_request, as vllm serve asks);
    pythonic reads plain text; the constrained calls are plain JSON."""
    assert ParserCalls(hermes, _Vocab(), TOOLS).skip_special_tokens is False
    assert ParserCalls(parser_class("pythonic"), _Vocab(), TOOLS).skip_special_tokens is True
    assert JSONCalls(named=None).skip_special_tokens is True


def test_unknown_parser_lists_the_names() -> None:
    with pytest.raises(ValueError, match="hermes"):
        parser_class("no-such-parser")


class _Vocab:
    def get_vocab(self) -> dict[str, int]:
        return {}


async def _engine(pieces: list[str], finish: str) -> AsyncIterator[Delta]:
    for i, t in enumerate(pieces):
        last = i == len(pieces) - 1
        yield Delta(t, [i], finish if last else None, {"prompt_tokens": 1} if last else None)


def _wrap(tp: ToolPlan, pieces: list[str], finish: str, said: str = "") -> list[Delta]:
    conv = tp.converter(None)
    conv.feed(said, [])  # (a resumption's delivered text)

    async def go() -> list[Delta]:
        return [d async for d in tp.wrap(_engine(pieces, finish), conv)]

    return asyncio.run(go())


def test_wrap_finish_reason_and_text() -> None:
    tp = plan(params(tool_choice={"type": "function", "function": {"name": "now"}}), None)
    assert tp is not None
    out = _wrap(tp, ["{", '"a"', ":1}"], p.FINISH_STOP)
    assert [d.text for d in out] == ["", "", ""]
    assert [d.token_ids for d in out] == [[0], [1], [2]]  # ids travel on (resumption)
    assert out[-1].finish_reason == p.FINISH_TOOL_CALLS
    assert calls([f for d in out for f in d.tool_calls or []]) == [(0, "now", '{"a":1}')]
    cut = _wrap(tp, ["{", '"a"'], p.FINISH_LENGTH)
    assert cut[-1].finish_reason == p.FINISH_LENGTH  # a truncated call is not "tool_calls"
    resumed = _wrap(tp, [":1}"], p.FINISH_STOP, said='{"a"')
    assert [f["function"] for f in resumed[-1].tool_calls or []] == [{"arguments": ":1}"}]


# ------------------------------------------------------------------ template, wire


def test_tiny_template_renders_tools_calls_and_results(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    plain = render_chat(tok, [{"role": "user", "content": "hi"}])
    assert plain == "<s><|user|>\nhi</s>\n<|assistant|>\n"  # unchanged without tools
    conv = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }]},  # fmt: skip
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    text = render_chat(tok, conv, TOOLS)
    assert text.startswith("<s><|system|>\n<tools>\n" + json.dumps(TOOLS[0]) + "\n")
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert f"<|assistant|>\n<tool_call>\n{call}\n</tool_call></s>\n" in text
    assert "<|tool|>\n<tool_response>\nsunny\n</tool_response></s>\n<|assistant|>\n" in text
    assert render_chat(tok, conv[:1], None) == "<s><|user|>\nweather?</s>\n<|assistant|>\n"


def test_tool_calls_travel_and_merge() -> None:
    d = Delta("", [3], None, tool_calls=[{"index": 0, "function": {"arguments": "x"}}])
    assert Delta.from_record(d.record(b"r"))[1].tool_calls == d.tool_calls
    head = {"index": 0, "id": "call_a", "type": "function",
            "function": {"name": "f", "arguments": ""}}  # fmt: skip
    box = Outbox()
    sent: list[Any] = []

    async def go() -> None:
        loop = asyncio.get_running_loop()

        def send(msg: Any) -> asyncio.Future[Any]:
            sent.append(msg)
            fut = loop.create_future()
            fut.set_result(None)
            return fut

        box.put(b"c", b"r", Delta("", [1], tool_calls=[head]), True)
        box.put(b"c", b"r", Delta("", [2], tool_calls=[{"index": 0,
                "function": {"arguments": '{"a"'}}]), False)  # fmt: skip
        box.put(b"c", b"r", Delta("", [3], p.FINISH_TOOL_CALLS, {"completion_tokens": 3},
                tool_calls=[{"index": 0, "function": {"arguments": ":1}"}}]), False)  # fmt: skip
        box.attach(send)
        await asyncio.sleep(0)

    asyncio.run(go())
    (rec,) = [r for m in sent for r in m[3]]
    assert rec[2] == [1, 2, 3] and rec[3] == p.FINISH_TOOL_CALLS
    assert rec[4]["tool_calls"] == [{**head, "function": {"name": "f", "arguments": '{"a":1}'}}]
    assert rec[4]["usage"] == {"completion_tokens": 3}
