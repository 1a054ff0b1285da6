"""Tool calling end to end: broker, workers and ``zserve gateway`` as real
processes, real clients (the ``openai`` SDK, LangChain's ``ChatOpenAI``, the
OpenAI Agents SDK over chat completions).

Served models:

* ``tiny``: the tiny random-weight model on the hf engine, with the hermes
  parser. It never calls a tool by itself, so every valid call that comes
  back for ``tool_choice`` required or named was made valid by zserve
  (constrained decoding), within ``max_tokens`` 64.
* ``scripted``: the null engine writing a fixed hermes-format reply (text,
  then two ``<tool_call>`` blocks) token by token: ``auto`` parses it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.gateway.conftest import start_gateway
from zserve.launcher import Proc, start_broker, start_worker, wait_models

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "days"],
}
TIME = {
    "type": "object",
    "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["tz"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast",
                                      "parameters": WEATHER}},  # fmt: skip
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
SCRIPT = (
    "Let me check.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"tz": "CET"}}\n</tool_call>'
)
MAX_TOKENS = 64
SAMPLING: list[dict[str, Any]] = [
    {"temperature": 0},
    {"temperature": 1.0, "seed": 1},
    {"temperature": 0.8, "top_p": 0.9, "seed": 3},
]


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path) -> Iterator[str]:
    procs: list[Proc] = []
    try:
        broker, fe, be = start_broker()
        procs.append(broker)
        procs.append(start_worker(
            be, "--engine", "hf", "--dtype", "float32", "--capacity", "4",
            "--model", str(tiny_model_dir), "--model-names", "tiny",
            "--tool-call-parser", "hermes",
        ))  # fmt: skip
        procs.append(start_worker(
            be, "--engine", "null", "--model", "scripted", "--token-delay", "0.002",
            "--engine-arg", f"script={SCRIPT}", "--tool-call-parser", "hermes",
        ))  # fmt: skip
        gateway, root = start_gateway(fe)
        procs.append(gateway)
        wait_models(fe, ["tiny", "scripted"], 180)
        yield root + "/v1"
    finally:
        for pr in reversed(procs):
            pr.stop()


def aclient(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=180)


def check_calls(calls: list[dict[str, Any]], only: str | None = None) -> None:
    """Each call is OpenAI-shaped, names a tool (``only`` if given) and its
    arguments parse and validate against that tool's parameters."""
    assert calls
    for c in calls:
        assert c["id"].startswith("call_") and c["type"] == "function"
        name = c["function"]["name"]
        assert name == only if only else name in SCHEMAS
        jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


async def one(
    client: openai.AsyncOpenAI, stream: bool, **kw: Any
) -> tuple[str | None, list[dict[str, Any]], str | None, int]:
    """(content, tool calls, finish reason, completion tokens) of one chat
    completion; a stream is put together as OpenAI's clients do, checking
    its shape: a call's first fragment has index, id, type and name, later
    ones only argument text."""
    args: dict[str, Any] = {"model": "tiny", "messages": USER, "tools": TOOLS,
                            "max_tokens": MAX_TOKENS, **kw}  # fmt: skip
    if not stream:
        r = await client.chat.completions.create(**args)
        (ch,) = r.choices
        assert r.usage is not None
        calls = [t.model_dump() for t in ch.message.tool_calls or []]
        return ch.message.content, calls, ch.finish_reason, r.usage.completion_tokens
    s = await client.chat.completions.create(
        **args, stream=True, stream_options={"include_usage": True}
    )
    content: list[str] = []
    calls = []
    finish = None
    used = 0
    async for chunk in s:
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
        for ch in chunk.choices:
            d = ch.delta
            if d.content:
                content.append(d.content)
            for t in d.tool_calls or []:
                if t.index == len(calls):  # a new call: its header
                    assert t.id and t.id.startswith("call_") and t.type == "function"
                    assert t.function is not None and t.function.name
                    fn = {"name": t.function.name, "arguments": t.function.arguments or ""}
                    calls.append({"id": t.id, "type": "function", "function": fn})
                else:
                    assert t.index == len(calls) - 1 and t.id is None
                    assert t.function is not None and not t.function.name
                    calls[-1]["function"]["arguments"] += t.function.arguments or ""
            if ch.finish_reason is not None:
                finish = ch.finish_reason
    return "".join(content) or None, calls, finish, used


def run_all(url: str, cases: list[dict[str, Any]]) -> list[Any]:
    async def go() -> list[Any]:
        client = aclient(url)
        try:
            return await asyncio.gather(*(one(client, **c) for c in cases))
        finally:
            await client.close()

    return asyncio.run(go())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_required_and_named_calls_are_valid(url: str, stream: bool) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    cases = [
        {"stream": stream, "tool_choice": choice, "parallel_tool_calls": False, **s}
        for choice in ("required", named)
        for s in SAMPLING
    ]
    for case, (content, calls, finish, used) in zip(cases, run_all(url, cases), strict=True):
        assert finish == "tool_calls", case
        assert content is None, case
        assert len(calls) == 1, case
        check_calls(calls, "get_weather" if case["tool_choice"] is named else None)
        assert 0 < used <= MAX_TOKENS


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_parallel_required_calls_are_valid(url: str, stream: bool) -> None:
    """Parallel calls (the default): as many as fit, every one complete
    within max_tokens. The budget rule refuses to open another call that
    max_tokens could not close (it used to: seed 2 was cut at length)."""
    seeds = [{"temperature": 1.0, "seed": k} for k in range(2, 6)]
    cases = [{"stream": stream, "tool_choice": "required", **s} for s in SAMPLING + seeds]
    for case, (content, calls, finish, used) in zip(cases, run_all(url, cases), strict=True):
        assert (finish, content) == ("tool_calls", None), case
        assert len(calls) >= 1, case
        check_calls(calls)
        assert 0 < used <= MAX_TOKENS


def test_tools_reach_the_template(url: str) -> None:
    """The tools are in the prompt (more prompt tokens) unless tool_choice is none."""

    async def prompt_tokens(**kw: Any) -> int:
        client = aclient(url)
        try:
            r = await client.chat.completions.create(
                model="tiny", messages=USER, max_tokens=1, temperature=0, **kw
            )
        finally:
            await client.close()
        assert r.usage is not None
        return r.usage.prompt_tokens

    bare = asyncio.run(prompt_tokens())
    assert asyncio.run(prompt_tokens(tools=TOOLS, tool_choice="none")) == bare
    offered = asyncio.run(prompt_tokens(tools=TOOLS, tool_choice="auto"))
    assert offered > bare + 50  # both tools' JSON


def test_auto_on_a_model_that_writes_no_call_is_text(url: str) -> None:
    ((content, calls, finish, _),) = run_all(url, [{"stream": False, "temperature": 0}])
    assert content and not calls and finish == "length"


SCRIPTED_CALLS = [
    ("get_weather", {"city": "Paris", "days": 2}),
    ("get_time", {"tz": "CET"}),
]


def test_auto_parses_the_models_own_format(url: str) -> None:
    async def go() -> list[Any]:
        client = aclient(url)
        try:
            return await asyncio.gather(*(
                one(client, stream, model="scripted") for stream in (False, True)
            ))  # fmt: skip
        finally:
            await client.close()

    for content, calls, finish, _ in asyncio.run(go()):
        assert content == "Let me check."
        assert finish == "tool_calls"
        check_calls(calls)
        got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]
        assert got == SCRIPTED_CALLS
        assert len({c["id"] for c in calls}) == 2


def test_a_conversation_with_calls_and_results_renders(url: str) -> None:
    """An assistant turn with tool_calls (JSON-string arguments) and the tool's
    result go through the template: the next turn is served, and longer."""
    fn = {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}
    call = {"id": "call_abc", "type": "function", "function": fn}
    history = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny, 21 C"},
    ]

    async def go() -> tuple[Any, Any]:
        client = aclient(url)
        try:
            short = await client.chat.completions.create(
                model="tiny", messages=USER, tools=TOOLS, tool_choice="none", max_tokens=1
            )
            long = await client.chat.completions.create(
                model="tiny", messages=history, tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=0,
            )  # fmt: skip
            return short, long
        finally:
            await client.close()

    short, long = asyncio.run(go())
    assert long.usage.prompt_tokens > short.usage.prompt_tokens + 20
    assert long.choices[0].finish_reason == "tool_calls"
    check_calls([t.model_dump() for t in long.choices[0].message.tool_calls or []])


# ------------------------------------------------------------------ real clients


def test_langchain_bind_tools_and_structured_output(url: str) -> None:
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str, days: int) -> str:
        """The forecast for a city, some days ahead."""
        return f"sunny in {city} for {days} days"

    class Forecast(BaseModel):
        city: str
        days: int = Field(ge=1, le=7)

    llm = ChatOpenAI(model="tiny", base_url=url, api_key="none", max_tokens=MAX_TOKENS,
                     temperature=0, max_retries=0, timeout=180)  # fmt: skip
    msg = llm.bind_tools([get_weather], tool_choice="required",
                         parallel_tool_calls=False).invoke("Weather in Paris?")  # fmt: skip
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert isinstance(call["args"]["city"], str) and isinstance(call["args"]["days"], int)
    assert get_weather.invoke(call["args"]).startswith("sunny in")

    for s in SAMPLING[:2]:
        out = llm.bind(**s).with_structured_output(Forecast, method="function_calling").invoke(
            "Weather in Paris?"
        )
        assert isinstance(out, Forecast) and 1 <= out.days <= 7


def test_openai_agents_sdk_calls_a_python_tool_and_finishes(url: str) -> None:
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)
    seen: list[tuple[str, int]] = []

    @function_tool
    def get_weather(city: str, days: int) -> str:
        """The forecast for a city, some days ahead."""
        seen.append((city, days))
        return f"sunny in {city}"

    async def go() -> Any:
        client = aclient(url)
        try:
            agent = Agent(
                name="weather",
                instructions="Answer with the forecast.",
                tools=[get_weather],
                model=OpenAIChatCompletionsModel(model="tiny", openai_client=client),
                model_settings=ModelSettings(
                    tool_choice="required", max_tokens=MAX_TOKENS, temperature=0,
                    parallel_tool_calls=False,
                ),  # fmt: skip
            )
            return await Runner.run(agent, "Weather in Paris?", max_turns=4)
        finally:
            await client.close()

    result = asyncio.run(go())
    assert len(seen) == 1 and isinstance(seen[0][1], int)
    # the tool ran, its result went back (auto: hermes parser, no call), and the run ended
    assert isinstance(result.final_output, str) and result.final_output
