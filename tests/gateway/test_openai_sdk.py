"""The gateway through the official ``openai`` client, sync and async,
streaming and not. The null engine's token i is ``t{i} ``."""

from __future__ import annotations

import base64
import math
import struct

import openai
import pytest

from tests.gateway.conftest import KEY, MODELS, GatewayStack


def words(n: int) -> str:
    return "".join(f"t{i} " for i in range(n))


@pytest.fixture(scope="module")
def sdk(gw: GatewayStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


@pytest.fixture
def asdk(gw: GatewayStack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0, timeout=30)


USER = [{"role": "user", "content": "hello there world"}]  # 3 prompt tokens


def test_models_list_and_retrieve(sdk: openai.OpenAI) -> None:
    ids = sorted(m.id for m in sdk.models.list())
    assert ids == sorted(MODELS)
    card = sdk.models.retrieve("m")
    assert card.id == "m" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("no-such-model")


def test_chat_completion_text_usage_and_finish(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model="m", messages=USER, max_tokens=5)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.model == "m"
    (c,) = r.choices
    assert c.index == 0 and c.message.role == "assistant"
    assert c.message.content == words(5)
    assert c.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)


def test_max_completion_tokens_wins_over_max_tokens(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model="m", messages=USER, max_tokens=9, max_completion_tokens=2
    )
    assert r.choices[0].message.content == words(2)


def test_stop_string_ends_the_text_before_it(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model="m", messages=USER, max_tokens=20, stop=["t4"])
    assert r.choices[0].message.content.strip() == "t0 t1 t2 t3"
    assert r.choices[0].finish_reason == "stop"
    s = sdk.completions.create(model="m", prompt="x", max_tokens=20, stop="t2 ")
    assert s.choices[0].text == "t0 t1 " and s.choices[0].finish_reason == "stop"


def test_chat_n_choices(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model="m", messages=USER, max_tokens=4, n=3)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert all(c.message.content == words(4) for c in r.choices)
    assert r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 12


def test_completion_prompt_string_and_list(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="m", prompt="one two", max_tokens=3)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == words(3) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (2, 3)

    r = sdk.completions.create(model="m", prompt=["a", "b c d"], max_tokens=2, n=2)
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    assert all(c.text == words(2) for c in r.choices)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (1 + 3, 8)


def test_completion_echo(sdk: openai.OpenAI) -> None:
    r = sdk.completions.create(model="m", prompt="say: ", max_tokens=2, echo=True)
    assert r.choices[0].text == "say: " + words(2)


def test_extensions_are_accepted(sdk: openai.OpenAI) -> None:
    """(An unknown field is a 400: tests/gateway/test_fields.py.)"""
    r = sdk.chat.completions.create(
        model="m",
        messages=USER,
        max_tokens=3,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.1,
        logprobs=True,
        top_logprobs=2,
        user="someone",
        extra_body={"top_k": 5, "repetition_penalty": 1.1, "ignore_eos": True},
    )
    assert r.choices[0].message.content == words(3)
    assert r.choices[0].logprobs is None  # the null engine has none


def test_chat_stream_sync(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(
            model="m",
            messages=USER,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices]
    text = "".join(c.choices[0].delta.content or "" for c in content)
    assert text == words(6)
    assert [c.choices[0].finish_reason for c in content][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, 6)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_without_usage_and_n(sdk: openai.OpenAI) -> None:
    chunks = list(
        sdk.chat.completions.create(model="m", messages=USER, max_tokens=3, n=2, stream=True)
    )
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    by_index: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert by_index == {0: words(3), 1: words(3)}
    assert finish == {0: "length", 1: "length"}


def test_completion_stream_sync(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(
        model="m", prompt="x", max_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == words(4)
    assert chunks[-1].usage.completion_tokens == 4


def _vector(data: object) -> list[float]:
    return list(data) if isinstance(data, list) else list(data)  # type: ignore[call-overload]


def test_embeddings(sdk: openai.OpenAI) -> None:
    r = sdk.embeddings.create(model="m", input=["the cat", "a dog", "the cat"])
    assert [d.index for d in r.data] == [0, 1, 2]
    vecs = [_vector(d.embedding) for d in r.data]
    assert all(len(v) == 64 for v in vecs)
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vecs)
    assert vecs[0] == pytest.approx(vecs[2]) and vecs[0] != pytest.approx(vecs[1])
    assert r.usage.prompt_tokens == 6 and r.usage.total_tokens == 6
    f = sdk.embeddings.create(model="m", input="the cat", encoding_format="float")
    assert f.data[0].embedding == pytest.approx(vecs[0], abs=1e-6)


def test_embeddings_base64_is_little_endian_float32(gw: GatewayStack) -> None:
    import httpx

    body = {"model": "m", "input": "abc", "encoding_format": "base64"}
    r = httpx.post(gw.base_url + "/embeddings", json=body, headers=gw.headers)
    raw = base64.b64decode(r.json()["data"][0]["embedding"])
    vec = struct.unpack("<64f", raw)
    body["encoding_format"] = "float"
    floats = httpx.post(gw.base_url + "/embeddings", json=body, headers=gw.headers).json()
    assert list(vec) == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


async def test_async_chat_completion_stream_and_embeddings(asdk: openai.AsyncOpenAI) -> None:
    async with asdk:
        r = await asdk.chat.completions.create(model="m", messages=USER, max_tokens=4)
        assert r.choices[0].message.content == words(4)
        assert r.usage.completion_tokens == 4

        text = ""
        roles = []
        async for chunk in await asdk.chat.completions.create(
            model="m", messages=USER, max_tokens=7, stream=True
        ):
            for ch in chunk.choices:
                text += ch.delta.content or ""
                if ch.delta.role:
                    roles.append(ch.delta.role)
        assert text == words(7) and roles == ["assistant"]

        c = await asdk.completions.create(model="m", prompt=["p", "q"], max_tokens=2)
        assert [ch.text for ch in c.choices] == [words(2), words(2)]

        e = await asdk.embeddings.create(model="m", input="hi")
        assert len(_vector(e.data[0].embedding)) == 64

        ids = [m.id async for m in asdk.models.list()]
        assert "m" in ids


async def test_async_errors(asdk: openai.AsyncOpenAI) -> None:
    async with asdk:
        with pytest.raises(openai.NotFoundError):
            await asdk.chat.completions.create(model="nope", messages=USER)
        with pytest.raises(openai.BadRequestError):
            await asdk.chat.completions.create(model="m", messages=USER, top_p=7)
        with pytest.raises(openai.NotFoundError):
            await asdk.chat.completions.create(model="nope", messages=USER, stream=True)
