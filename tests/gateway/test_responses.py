"""The Responses API through the gateway with the unmodified ``openai`` SDK
(``responses.create``, ``responses.stream``, ``retrieve``, ``delete``), on
real processes: two brokers, null workers registered with both, and two
gateways that share only the brokers.

The null engine's token i is ``t{i} ``; ``calls`` is scripted to write
some text and a tool call in Hermes' format, which the worker's parser
turns into a call (a required call, through the grammar, is exercised on
the tiny model in test_tokens_http.py).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import FAST_HB
from tests.gateway.conftest import start_gateway
from zserve import protocol as p
from zserve.client import Client
from zserve.gateway import responses
from zserve.launcher import Proc, start_broker, start_worker, wait_for, wait_models

STORE_MAX = 6  # stored responses per broker
# what the scripted model writes: some text, then a call in Hermes' format
CALL = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
        "\n</tool_call>")  # fmt: skip
TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}  # fmt: skip


@dataclass
class Stack:
    fronts: list[str] = field(default_factory=list)
    roots: list[str] = field(default_factory=list)  # gateway A, gateway B
    procs: dict[str, Proc] = field(default_factory=dict)

    def sdk(self, i: int = 0) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.roots[i] + "/v1", api_key="none", max_retries=0,
                             timeout=30)  # fmt: skip

    def stored(self, front: int) -> int:
        with Client(self.fronts[front], timeout=10) as c:
            return int(c.status()["store"]["count"])


def serving(front: str, model: str) -> list[dict[str, Any]]:
    with Client(front, timeout=10) as c:
        return [w for w in c.status()["workers"] if model in w["models"]]


def events(r: httpx.Response) -> Iterator[dict[str, Any]]:
    for line in r.iter_lines():
        if line.startswith("data: "):
            yield json.loads(line[6:])


@pytest.fixture(scope="module")
def st() -> Iterator[Stack]:
    s = Stack()
    try:
        backs = []
        for i in range(2):
            b, fe, be = start_broker("--store-max-count", str(STORE_MAX), *FAST_HB)
            s.procs[f"broker{i}"] = b
            s.fronts.append(fe)
            backs.append(be)
        both = ",".join(backs)
        s.procs["m"] = start_worker(both, "--engine", "null", "--model", "m", *FAST_HB)
        script = f"script={json.dumps(CALL)}"
        s.procs["calls"] = start_worker(both, "--engine", "null", "--model", "calls",
                                        "--engine-arg", script, "--tool-call-parser", "hermes",
                                        *FAST_HB)  # fmt: skip
        for i in range(2):  # two, so that a stream whose worker dies goes on
            s.procs[f"slow{i}"] = start_worker(both, "--engine", "null", "--model", "slow",
                                               "--token-delay", "0.05", *FAST_HB)  # fmt: skip
        for name, fronts in (("gwA", s.fronts), ("gwB", s.fronts[::-1])):
            proc, root = start_gateway(",".join(fronts), *FAST_HB)
            s.procs[name] = proc
            s.roots.append(root)
        for fe in s.fronts:
            wait_for(lambda fe=fe: len(serving(fe, "slow")) == 2, 30, "two slow workers")
            wait_models(fe, ["m", "calls"], 90)  # calls imports vLLM for its parser
        yield s
    finally:
        for proc in reversed(s.procs.values()):
            proc.stop()


def test_create_text_and_its_shape(st: Stack) -> None:
    r = st.sdk().responses.create(model="m", input="hi", max_output_tokens=4,
                                  instructions="be brief", store=False,
                                  reasoning={"effort": "low"})  # fmt: skip
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "t0 t1 t2 t3 "
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant"
    assert r.usage.output_tokens == 4 and r.usage.input_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + 4
    assert r.instructions == "be brief" and r.max_output_tokens == 4 and r.store is False
    r = st.sdk().responses.create(model="calls", input="hi", store=False)  # a scripted reply
    assert r.status == "completed" and r.incomplete_details is None and r.output_text == CALL


def test_stream_emits_the_full_event_sequence(st: Stack) -> None:
    with st.sdk().responses.stream(model="m", input="hi", max_output_tokens=3,
                                   store=False) as stream:  # fmt: skip
        events = list(stream)
        final = stream.get_final_response() if events[-1].type == "response.completed" else None
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")  # 1 to 3: tokens read together share one
    assert 1 <= deltas <= 3
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.incomplete",
    ]  # fmt: skip
    assert "".join(e.delta for e in events if e.type.endswith("text.delta")) == "t0 t1 t2 "
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final is None  # incomplete: the SDK has no completed response to give
    assert events[-1].response.output[0].content[0].text == "t0 t1 t2 "
    assert events[-1].response.usage.output_tokens == 3
    with st.sdk().responses.stream(model="calls", input="hi", store=False) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text == CALL


@pytest.mark.parametrize("streamed", [False, True])
def test_text_then_a_function_call(st: Stack, streamed: bool) -> None:
    kw: dict[str, Any] = dict(model="calls", input="weather in Paris?", tools=[TOOL],
                              store=False)  # fmt: skip
    if streamed:
        with st.sdk().responses.stream(**kw) as stream:
            events = list(stream)
            r = stream.get_final_response()
        kinds = [e.type for e in events]
        message = kinds.index("response.output_text.done")
        call = kinds.index("response.function_call_arguments.done")
        assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
        assert kinds[message:message + 3] == ["response.output_text.done",
                                              "response.content_part.done",
                                              "response.output_item.done"]  # fmt: skip
        assert kinds[message + 3] == "response.output_item.added"  # the call, after the text
        assert "response.function_call_arguments.delta" in kinds[message + 3 : call]
        assert kinds[call:] == ["response.function_call_arguments.done",
                                "response.output_item.done", "response.completed"]  # fmt: skip
        args = "".join(e.delta for e in events if e.type.endswith("arguments.delta"))
        assert json.loads(args) == {"city": "Paris"}
        assert [e.sequence_number for e in events] == list(range(len(events)))
    else:
        r = st.sdk().responses.create(**kw)
    assert r.status == "completed"
    text, call = r.output
    assert text.type == "message" and r.output_text == "Let me check."
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and json.loads(call.arguments) == {"city": "Paris"}
    assert r.tool_choice == "auto" and r.tools[0].name == "get_weather"


def test_stored_responses_are_shared_by_the_gateways(st: Stack) -> None:
    a, b = st.sdk(0), st.sdk(1)
    first = a.responses.create(model="m", input="hello", max_output_tokens=2,
                               metadata={"k": "v"})  # fmt: skip
    got = b.responses.retrieve(first.id)  # through the other gateway
    assert got.id == first.id and got.output_text == "t0 t1 " and got.metadata == {"k": "v"}
    assert got.model_dump() == first.model_dump()
    # continued through B: the earlier turn comes first (null's prompt count grows)
    second = b.responses.create(model="m", input="and more", previous_response_id=first.id,
                                max_output_tokens=2)  # fmt: skip
    alone = b.responses.create(model="m", input="and more", max_output_tokens=2, store=False)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > alone.usage.input_tokens
    assert a.responses.retrieve(second.id).id == second.id
    # streamed and stored
    with a.responses.stream(model="calls", input="x") as stream:
        streamed = stream.get_final_response()
    assert b.responses.retrieve(streamed.id).output_text == streamed.output_text
    # deleted through A, gone through B
    a.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError) as e:
        b.responses.retrieve(second.id)
    assert "never stored" in str(e.value) and "evicted" in str(e.value)
    with pytest.raises(openai.NotFoundError):
        b.responses.delete(second.id)


def test_unknown_and_evicted_ids_are_a_clear_404(st: Stack) -> None:
    sdk = st.sdk()
    with pytest.raises(openai.NotFoundError) as e:
        sdk.responses.create(model="m", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"  # type: ignore[index]
    oldest = sdk.responses.create(model="m", input="x", max_output_tokens=1)
    for _ in range(STORE_MAX):
        sdk.responses.create(model="m", input="x", max_output_tokens=1)
    wait_for(lambda: st.stored(0) == st.stored(1) == STORE_MAX, 10, "both brokers full")
    for root in st.roots:
        r = httpx.get(f"{root}/v1/responses/{oldest.id}")
        assert r.status_code == 404 and "evicted" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        sdk.responses.create(model="m", input="x", previous_response_id=oldest.id)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"conversation": "c1"}, "conversation"),
        ({"truncation": "auto"}, "truncation"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"input": [{"type": "input_image"}]}, "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]},
         "input[0].content[0]"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [{**TOOL, "name": "a b"}]}, "tools[0].name"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": "no"}}},
         "text.format.schema"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
    ],
)  # fmt: skip
def test_what_is_not_supported_is_a_400_naming_it(
    st: Stack, extra: dict[str, Any], param: str
) -> None:
    body = {"model": "m", "input": "x", **extra}
    r = httpx.post(st.roots[0] + "/v1/responses", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_the_neutral_values_and_input_items_are_taken(st: Stack) -> None:
    body = {
        "model": "calls", "truncation": "disabled", "background": False, "include": [],
        "store": False, "tools": [TOOL], "parallel_tool_calls": False,
        "input": [
            {"role": "developer", "content": "be exact"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "weather?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Oslo"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "rain"},
        ],
        "tool_choice": "auto",
    }  # fmt: skip
    r = httpx.post(st.roots[0] + "/v1/responses", json=body, timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["tool_choice"] == "auto"
    named = {"type": "function", "name": "get_weather"}
    assert responses.chat_tool_choice(named) == {"type": "function",
                                                  "function": {"name": "get_weather"}}  # fmt: skip


def test_the_store_protocol_on_the_broker(st: Stack) -> None:
    with Client(st.fronts[1], timeout=10) as c:
        assert c.query(p.SERVICE_STORE_PUT, b"k1", b"v1") is True
        assert c.query(p.SERVICE_STORE_GET, b"k1") == b"v1"
        assert c.query(p.SERVICE_STORE_DELETE, b"k1") is True
        assert c.query(p.SERVICE_STORE_GET, b"k1") is None
        with pytest.raises(Exception, match="takes 2 frame"):
            c.query(p.SERVICE_STORE_PUT, b"k1")


def test_a_client_that_leaves_cancels_the_generation(st: Stack) -> None:
    body = {"model": "slow", "input": "x", "stream": True, "max_output_tokens": 200,
            "store": False}  # fmt: skip
    with httpx.stream("POST", st.roots[0] + "/v1/responses", json=body, timeout=30) as r:
        deltas = 0
        for e in events(r):
            deltas += e["type"] == "response.output_text.delta"
            if deltas == 3:
                break  # and hang up
    busy = lambda: sum(w["in_flight"] for fe in st.fronts for w in serving(fe, "slow"))  # noqa: E731
    wait_for(lambda: busy() == 0, 10, "the slow workers to be free")


def test_a_stream_whose_worker_dies_resumes_exactly(st: Stack) -> None:
    n = 30
    body = {"model": "slow", "input": "x", "stream": True, "max_output_tokens": n,
            "store": False}  # fmt: skip
    got: list[dict[str, Any]] = []
    with httpx.stream("POST", st.roots[0] + "/v1/responses", json=body, timeout=30) as r:
        for e in events(r):
            got.append(e)
            if sum(x["type"] == "response.output_text.delta" for x in got) == 5:
                (w,) = [w for fe in st.fronts for w in serving(fe, "slow") if w["in_flight"]]
                os.kill(w["pid"], signal.SIGKILL)
    text = "".join(e["delta"] for e in got if e["type"] == "response.output_text.delta")
    assert text == "".join(f"t{i} " for i in range(n))  # no token lost or sent twice
    assert got[-1]["type"] == "response.incomplete"
    assert got[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert [e["sequence_number"] for e in got] == list(range(len(got)))


def test_a_restarted_gateway_or_a_lost_broker_loses_nothing(st: Stack) -> None:
    r = st.sdk(0).responses.create(model="m", input="keep me", max_output_tokens=2)
    st.procs["gwA"].stop()
    proc, st.roots[0] = start_gateway(",".join(st.fronts), *FAST_HB)
    st.procs["gwA"] = proc
    assert st.sdk(0).responses.retrieve(r.id).output_text == "t0 t1 "
    st.procs["broker0"].stop()  # every gateway still reads the other broker's copy
    for i in (0, 1):
        assert st.sdk(i).responses.retrieve(r.id).output_text == "t0 t1 "
