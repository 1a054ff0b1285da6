"""Token-level endpoints on the tiny model, real processes (a broker, one hf
worker in float32, the gateway), checked against plain transformers in
float32: token-id prompts (HTTP and the Python client), prompt logprobs
(``echo`` with ``logprobs``, ``max_tokens`` 0), ``/tokenize`` (chat
template included), ``/detokenize``, ``/version``, ``max_model_len``; and
the Responses API's constrained paths (json_schema, a required call),
which the null engine cannot exercise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest
import torch

import zserve
from tests.gateway.conftest import start_gateway
from tests.worker.reference import greedy_ref
from zserve.client import Client
from zserve.launcher import Proc, start_broker, start_worker, wait_models

PROMPTS = ["The morning train left the station at seven", "Once upon a time there was"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12},
                   "sunny": {"type": "boolean"}},
    "required": ["city", "sunny"],
    "additionalProperties": False,
}  # fmt: skip
TOOL = {"type": "function", "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}  # fmt: skip


class Stack:
    def __init__(self, frontend: str, root: str) -> None:
        self.frontend, self.root = frontend, root

    def post(self, path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(self.root + path, json=body, timeout=120)

    def ok(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = self.post(path, body)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def st(tiny_model_dir: Path) -> Iterator[Stack]:
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
        yield Stack(fe, root)
    finally:
        for p in reversed(procs):
            p.stop()


def ref_prompt_logprobs(ref: tuple[Any, Any], ids: list[int]) -> list[float]:
    """transformers float32: the logprob of each prompt token after the first."""
    model, _ = ref
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def test_token_id_prompts_equal_transformers(st: Stack, ref: tuple[Any, Any]) -> None:
    ids = [ref[1](p)["input_ids"] for p in PROMPTS]
    want = [greedy_ref(ref, x, 6, ignore_eos=True) for x in ids]
    with Client(st.frontend, timeout=120) as c:  # the Python client, one id list
        got = c.generate("tiny", ids[0], max_tokens=6, temperature=0, ignore_eos=True)
    assert got.token_ids == want[0]
    assert got.usage["prompt_tokens"] == len(ids[0])
    by_ids = st.ok("/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 6,
                                       "temperature": 0, "ignore_eos": True})  # fmt: skip
    by_text = st.ok("/v1/completions", {"model": "tiny", "prompt": PROMPTS, "max_tokens": 6,
                                        "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert [c["text"] for c in by_ids["choices"]] == [c["text"] for c in by_text["choices"]]
    assert by_ids["usage"]["prompt_tokens"] == sum(map(len, ids))
    one = st.ok("/v1/completions", {"model": "tiny", "prompt": ids[1], "max_tokens": 6,
                                    "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert one["choices"][0]["text"] == by_text["choices"][1]["text"]
    for bad, param in (([1, "a"], "prompt"), ([[1], [-1]], "prompt[1]"), ([[]], "prompt[0]")):
        r = st.post("/v1/completions", {"model": "tiny", "prompt": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = st.post("/v1/completions", {"model": "tiny", "prompt": [10**6], "max_tokens": 1})
    assert r.status_code == 400 and "vocabulary" in r.text


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_logprobs_score_the_prompt_as_transformers(
    st: Stack, ref: tuple[Any, Any], max_tokens: int
) -> None:
    ids = ref[1](PROMPTS[0])["input_ids"]
    want = ref_prompt_logprobs(ref, ids)
    for prompt in (PROMPTS[0], ids):
        r = st.ok("/v1/completions", {"model": "tiny", "prompt": prompt, "echo": True,
                                      "logprobs": 2, "max_tokens": max_tokens,
                                      "temperature": 0})  # fmt: skip
        (c,) = r["choices"]
        lp = c["logprobs"]
        n = len(ids)
        assert len(lp["tokens"]) == n + max_tokens
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["token_logprobs"][1:n] == pytest.approx(want, abs=1e-4)
        for top in lp["top_logprobs"][1:]:
            assert len(top) == 2  # the 2 alternatives asked for
        assert lp["text_offset"][0] == 0
        # echo repeats what was sent: the text, or the ids' text (special tokens included)
        sent = prompt if isinstance(prompt, str) else ref[1].decode(ids)
        assert c["text"].startswith(sent)
        assert r["usage"]["prompt_tokens"] == n
        assert r["usage"]["completion_tokens"] == max_tokens
        if max_tokens == 0:
            assert c["text"] == sent and c["finish_reason"] == "length"
    r = st.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_streamed_echo_logprobs_equal_the_unstreamed_ones(st: Stack, max_tokens: int) -> None:
    """Streamed, echo with logprobs sends the prompt (its first chunk) with
    the prompt's logprobs, then the reply's: joined, the same text, tokens,
    logprobs and offsets as the unstreamed response."""
    body = {"model": "tiny", "prompt": PROMPTS[1], "echo": True, "logprobs": 1,
            "max_tokens": max_tokens, "temperature": 0}  # fmt: skip
    (whole,) = st.ok("/v1/completions", body)["choices"]
    chunks = []
    with httpx.stream("POST", st.root + "/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:  # fmt: skip
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:])["choices"][0])
    assert chunks[0]["text"] == PROMPTS[1]  # the echo comes first, with its logprobs
    assert chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == whole["text"]
    assert chunks[-1]["finish_reason"] == whole["finish_reason"]
    joined: dict[str, list[Any]] = {k: [] for k in whole["logprobs"]}
    for c in chunks:
        for k, v in (c["logprobs"] or {}).items():
            joined[k] += v
    assert joined["tokens"] == whole["logprobs"]["tokens"]
    assert joined["text_offset"] == whole["logprobs"]["text_offset"]
    assert joined["token_logprobs"] == pytest.approx(whole["logprobs"]["token_logprobs"])


def test_tokenize_and_detokenize_agree_with_the_tokenizer(st: Stack, ref: tuple[Any, Any]) -> None:
    tok = ref[1]
    models = httpx.get(st.root + "/v1/models", timeout=10).json()["data"]
    ctx = models[0]["max_model_len"]
    assert isinstance(ctx, int) and ctx > 0
    assert httpx.get(st.root + "/v1/models/tiny", timeout=10).json()["max_model_len"] == ctx
    out = st.ok("/tokenize", {"model": "tiny", "prompt": PROMPTS[0], "return_token_strs": True})
    ids = tok(PROMPTS[0])["input_ids"]
    assert out == {"tokens": ids, "count": len(ids), "max_model_len": ctx,
                   "token_strs": tok.convert_ids_to_tokens(ids)}  # fmt: skip
    no_bos = st.ok("/tokenize", {"prompt": PROMPTS[0], "add_special_tokens": False})  # one model
    assert no_bos["tokens"] == tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    chat = st.ok("/tokenize", {"model": "tiny", "messages": MESSAGES})
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert chat["tokens"] == tok(text, add_special_tokens=False)["input_ids"]
    # what a chat request is charged: the same count
    r = st.ok("/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1})
    assert r["usage"]["prompt_tokens"] == chat["count"]
    assert st.ok("/detokenize", {"model": "tiny", "tokens": ids})["prompt"] == tok.decode(ids)
    assert st.post("/tokenize", {"model": "tiny", "prompt": "x", "chat_template": "y"}).json()[
        "error"]["param"] == "chat_template"  # fmt: skip
    assert st.post("/tokenize", {"model": "nope", "prompt": "x"}).status_code == 404
    v = httpx.get(st.root + "/version", timeout=10)
    assert v.json() == {"version": zserve.__version__}


def test_responses_json_schema_and_a_required_call_on_a_real_model(st: Stack) -> None:
    sdk = openai.OpenAI(base_url=st.root + "/v1", api_key="none", max_retries=0, timeout=120)
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": SCHEMA, "strict": True}}
    r = sdk.responses.create(model="tiny", input="A city as JSON", text=fmt,  # type: ignore[arg-type]
                             max_output_tokens=64, temperature=0, store=False)  # fmt: skip
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    with sdk.responses.stream(model="tiny", input="Weather?", tools=[TOOL],  # type: ignore[list-item]
                              tool_choice="required", max_output_tokens=64,
                              temperature=0, store=False) as stream:  # fmt: skip
        final = stream.get_final_response()
    (call,) = final.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)
