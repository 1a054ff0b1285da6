"""No silent drops: a request field the gateway does not implement is a 400
that names it (``param``), a documented no-op is accepted, and malformed
``tools`` / ``tool_choice`` are 400s naming the field. Raw httpx and the
``openai`` SDK's ``extra_body``, against the null-engine stack."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.gateway.conftest import KEY, GatewayStack
from zserve.gateway.schema import NEUTRAL_VALUES, NOOP_FIELDS

USER = [{"role": "user", "content": "hello"}]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def post(gw: GatewayStack, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.base_url + path, json=body, headers=gw.headers, timeout=30)


def refused(gw: GatewayStack, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = post(gw, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    return err


def chat(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "messages": USER, "max_tokens": 2, **kw}


def completion(**kw: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", "max_tokens": 2, **kw}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/chat/completions", chat(zzz=1), "zzz"),
        ("/chat/completions", chat(logit_bias={"5": 10}), "logit_bias"),
        ("/chat/completions", chat(reasoning_effort="high"), "reasoning_effort"),
        ("/chat/completions", chat(functions=[{"name": "f"}]), "functions"),
        ("/chat/completions", chat(echo=True), "echo"),
        ("/chat/completions", chat(modalities=["text", "audio"]), "modalities"),
        ("/chat/completions", chat(stream_options={"continuous_usage_stats": True}),
         "stream_options.continuous_usage_stats"),  # fmt: skip
        ("/chat/completions", chat(messages=[{**USER[0], "audio": {"id": "a"}}]),
         "messages[0].audio"),  # fmt: skip
        ("/completions", completion(suffix="the end"), "suffix"),
        ("/completions", completion(best_of=3), "best_of"),
        ("/completions", completion(min_p=0.1), "min_p"),
        ("/embeddings", {"model": "m", "input": "x", "dimensions": 8}, "dimensions"),
    ],
)
def test_an_unknown_field_is_a_400_naming_it(
    gw: GatewayStack, path: str, body: dict[str, Any], param: str
) -> None:
    err = refused(gw, path, body)
    assert err["param"] == param
    assert param in err["message"] or "suffix" in err["message"]


def test_suffix_says_fill_in_the_middle(gw: GatewayStack) -> None:
    err = refused(gw, "/completions", completion(suffix="x"))
    assert "fill-in-the-middle" in err["message"]


def test_the_documented_no_ops_and_neutral_values_are_accepted(gw: GatewayStack) -> None:
    top = {k: "x" for k in NOOP_FIELDS if "." not in k and "[" not in k and k != "user"}
    r = post(gw, "/chat/completions", chat(
        **top,
        stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False},
        messages=[{**USER[0], "annotations": [{"type": "url_citation"}]}],
    ))  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.text.endswith("data: [DONE]\n\n")
    chat_neutral = {k: v for k, v in NEUTRAL_VALUES.items() if k not in ("suffix", "best_of")}
    r = post(gw, "/chat/completions", chat(**chat_neutral))
    assert r.status_code == 200, r.text
    r = post(gw, "/completions", completion(suffix="", best_of=1, logit_bias={}, store=True))
    assert r.status_code == 200, r.text
    r = post(gw, "/embeddings", {"model": "m", "input": "x", "user": "u"})
    assert r.status_code == 200, r.text


def test_null_counts_as_not_sent(gw: GatewayStack) -> None:
    body = chat(zzz=None, functions=None, logit_bias=None, tools=None, tool_choice=None)
    assert post(gw, "/chat/completions", body).status_code == 200


def test_openai_sdk_extra_body_field_is_refused(gw: GatewayStack) -> None:
    sdk = openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="m", messages=USER, extra_body={"guided_whitespace": 1})
    assert e.value.body["param"] == "guided_whitespace"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.chat.completions.create(model="m", messages=USER, logit_bias={"3": 1})
    assert e.value.body["param"] == "logit_bias"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="m", prompt="a", suffix="b")
    assert e.value.body["param"] == "suffix"  # type: ignore[index]
    # and what is implemented still goes through
    r = sdk.chat.completions.create(model="m", messages=USER, max_tokens=2, metadata={"a": "b"})
    assert r.choices[0].message.content == "t0 t1 "


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(tools={"type": "function"}), "tools"),
        (chat(tools=[{"type": "code_interpreter"}]), "tools[0]"),
        (chat(tools=[{"type": "function"}]), "tools[0].function"),
        (chat(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
        (chat(tools=[TOOL, TOOL]), "tools[1].function.name"),
        (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
         "tools[0].function.parameters"),  # fmt: skip
        (chat(tools=[TOOL], tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice"),  # fmt: skip
        (chat(tools=[TOOL], tool_choice="sometimes"), "tool_choice"),
        (chat(tool_choice="required"), "tool_choice"),
        (chat(tool_choice="auto"), "tool_choice"),
        (chat(tool_choice={"type": "function", "function": {"name": "get_weather"}}),
         "tool_choice"),  # fmt: skip
        (chat(tools=[TOOL], parallel_tool_calls="yes"), "parallel_tool_calls"),
        (chat(messages=[{"role": "assistant", "tool_calls": [{"id": "x"}]}]),
         "messages[0].tool_calls[0]"),  # fmt: skip
        (chat(messages=[{"role": "tool", "tool_call_id": 5, "content": "x"}]),
         "messages[0].tool_call_id"),  # fmt: skip
    ],
)
def test_bad_tools_are_a_400_naming_the_field(
    gw: GatewayStack, body: dict[str, Any], param: str
) -> None:
    assert refused(gw, "/chat/completions", body)["param"] == param


def test_tool_choice_none_offers_nothing_and_auto_needs_a_parser(gw: GatewayStack) -> None:
    r = post(gw, "/chat/completions", chat(tools=[TOOL], tool_choice="none"))
    assert r.status_code == 200, r.text
    msg = r.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "t0 t1 "}
    err = refused(gw, "/chat/completions", chat(tools=[TOOL]))  # auto by default
    assert "--tool-call-parser" in err["message"]
