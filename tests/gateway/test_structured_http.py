"""Structured outputs through the gateway with the unmodified ``openai`` SDK:
a broker, one hf worker on the tiny random-weight model (it never writes JSON
on its own) and ``zserve gateway``, real processes. Every reply must parse,
validate against its schema and end with ``stop`` within ``max_tokens``."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.gateway.conftest import start_gateway
from zserve.launcher import Proc, start_broker, start_worker, wait_models

MAX_TOKENS = 128
SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "population": {"type": "integer", "minimum": 0},
        "sunny": {"type": "boolean"},
        "districts": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "required": ["city", "population", "sunny", "districts"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Describe a city as JSON."}]
SAMPLINGS = [{"temperature": 0}, {"temperature": 1.0, "seed": 1},
             {"temperature": 1.0, "seed": 2}, {"temperature": 0.7, "seed": 3}]  # fmt: skip
JSON_SCHEMA = {"type": "json_schema",
               "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}  # fmt: skip


@pytest.fixture(scope="module")
def url(tiny_model_dir: Path) -> Iterator[str]:
    procs: list[Proc] = []
    try:
        broker, fe, be = start_broker()
        procs.append(broker)
        procs.append(start_worker(be, "--engine", "hf", "--model", str(tiny_model_dir),
                                  "--model-names", "tiny", "--dtype", "float32",
                                  "--engine-arg", "threads=1"))  # fmt: skip
        gateway, root = start_gateway(fe)
        procs.append(gateway)
        wait_models(fe, ["tiny"], 120)
        yield root + "/v1"
    finally:
        for p in reversed(procs):
            p.stop()


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)


def checked(content: str | None, finish: str | None, used: int, schema: Any = None) -> Any:
    assert finish == "stop", content
    assert used <= MAX_TOKENS
    value = json.loads(content or "")
    if schema is not None:
        jsonschema.validate(value, schema)
    return value


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_json_object(client: openai.OpenAI, sampling: dict[str, Any]) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                       response_format={"type": "json_object"}, **sampling)
    c = r.choices[0]
    assert isinstance(checked(c.message.content, c.finish_reason, r.usage.completion_tokens), dict)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_json_schema(client: openai.OpenAI, sampling: dict[str, Any]) -> None:
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS,
                                       response_format=JSON_SCHEMA, **sampling)  # fmt: skip
    c = r.choices[0]
    checked(c.message.content, c.finish_reason, r.usage.completion_tokens, SCHEMA)


@pytest.mark.parametrize("sampling", SAMPLINGS[:2])
def test_json_schema_streamed_equals_not_streamed(client: openai.OpenAI,
                                                  sampling: dict[str, Any]) -> None:  # fmt: skip
    kw = {"model": "tiny", "messages": MESSAGES, "max_tokens": MAX_TOKENS,
          "response_format": JSON_SCHEMA, **sampling}  # fmt: skip
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(
        **kw, stream=True, stream_options={"include_usage": True}
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert usage is not None
    checked("".join(parts), finish, usage.completion_tokens, SCHEMA)
    assert "".join(parts) == whole


async def test_constrained_and_plain_rows_in_one_batch(url: str) -> None:
    """Several constrained and plain requests at once: each constrained reply
    validates, each plain one is what it is alone (the masks are per row)."""
    ac = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    plain = {"model": "tiny", "prompt": "The city of", "max_tokens": 32, "temperature": 0}
    alone = (await ac.completions.create(**plain)).choices[0].text

    async def constrained() -> Any:
        return await ac.chat.completions.create(model="tiny", messages=MESSAGES,
                                                max_tokens=MAX_TOKENS, temperature=0,
                                                response_format=JSON_SCHEMA)  # fmt: skip

    results = await asyncio.gather(
        constrained(), ac.completions.create(**plain), constrained(),
        ac.completions.create(**plain),
    )  # fmt: skip
    for r in results[0::2]:
        c = r.choices[0]
        checked(c.message.content, c.finish_reason, r.usage.completion_tokens, SCHEMA)
    assert [r.choices[0].text for r in results[1::2]] == [alone, alone]
    await ac.close()


def test_vllm_style_fields_on_completions(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = {"model": "tiny", "prompt": "Answer:", "max_tokens": 32,
                          "temperature": 0}  # fmt: skip
    choice = {"structured_outputs": {"choice": ["yes", "no"]}}
    r = client.completions.create(**kw, extra_body=choice)
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = client.completions.create(**kw, extra_body={"guided_regex": r"[a-z]{2,5}-[0-9]{3}"})
    assert r.choices[0].finish_reason == "stop"
    assert re.fullmatch(r"[a-z]{2,5}-[0-9]{3}", r.choices[0].text)
    r = client.completions.create(**{**kw, "max_tokens": MAX_TOKENS},
                                  extra_body={"guided_json": SCHEMA})  # fmt: skip
    checked(r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens, SCHEMA)
    grammar = 'root ::= "(" [0-9]+ ("+" [0-9]+)* ")"'
    r = client.completions.create(**kw, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"\(\d+(\+\d+)*\)", r.choices[0].text)


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"guided_regex": "a(b"}, "guided_regex"),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
        ({"guided_choice": "yes"}, "guided_choice"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "guided_regex"),
        ({"structured_budget": "off"}, "structured_budget"),
        ({"guided_grammar": 'root ::= "a" | '}, "structured"),  # only the worker compiles EBNF
    ],
)
def test_a_bad_spec_is_a_400_naming_the_field(client: openai.OpenAI, extra: dict[str, Any],
                                              param: str) -> None:  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8,
                                       extra_body=extra)  # fmt: skip
    assert e.value.param == param, e.value.body
