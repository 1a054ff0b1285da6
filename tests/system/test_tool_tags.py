"""Tool-call tags that are special tokens reach the tool-call parser.

Qwen2.5 and Hermes write ``<tool_call>`` and ``</tool_call>`` as added
special tokens, which a decode that skips special tokens drops: the call
came back as content. Here the worker keeps special tokens in the text of a
request whose parser asks for them (hermes does, as in ``vllm serve``), in
the stream and in the text of ids an earlier attempt delivered, and the
token that ends the turn (``</s>``) is still never text.

The model is the tiny one with those two special tokens and two ordinary
added tokens for the call's JSON, its weights set so that greedy (or any)
decoding writes a fixed script of ids: every layer's ``o_proj`` and
``down_proj`` are zero, so the last hidden state is the current token's
embedding, a basis vector of its own for each script token (one shared by
every other token), and ``lm_head`` maps each to the next id of the script
(the last to ``</s>``). Broker and hf worker are real processes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.system.test_tool_resume import called, continuation
from zserve import protocol as p
from zserve.client import Client
from zserve.launcher import Proc, start_broker, start_worker, wait_models

CONTENT = "Let me check the forecast"
CALL = ['{"name": "get_weather", ', '"arguments": {"city": "Paris"}}']
SCRIPT = CONTENT + "<tool_call>" + "".join(CALL) + "</tool_call>"
TAGS = ["<tool_call>", "</tool_call>"]
TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
HB = ["--heartbeat-interval", "0.2", "--heartbeat-liveness", "10"]


def write_scripted_model(base: Path, out: Path) -> None:
    """The tiny model at ``base`` rewritten into ``out`` to write ``SCRIPT``
    then ``</s>``, whatever the prompt."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_special_tokens({"additional_special_tokens": TAGS})
    tok.add_tokens(CALL)
    tok.save_pretrained(str(out))
    ids = list(tok(SCRIPT, add_special_tokens=False)["input_ids"])
    assert len(set(ids)) == len(ids), "each script token needs a successor of its own"
    config = json.loads((base / "config.json").read_text())
    config["vocab_size"] = vocab = len(tok)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copy(base / "generation_config.json", out)

    state = load_file(str(base / "model.safetensors"))
    hidden = state["model.embed_tokens.weight"].shape[1]
    assert len(ids) < hidden
    embed = torch.zeros(vocab, hidden)
    embed[:, 0] = 1.0  # every token not in the script: basis vector 0
    head = torch.zeros(vocab, hidden)
    head[ids[0], 0] = 10.0  # ... is followed by the script's first token
    for i, t in enumerate(ids):
        embed[t] = 0.0
        embed[t, i + 1] = 1.0
        head[ids[i + 1] if i + 1 < len(ids) else tok.eos_token_id, i + 1] = 10.0
    state["model.embed_tokens.weight"] = embed
    state["lm_head.weight"] = head
    for k in range(config["num_hidden_layers"]):
        state[f"model.layers.{k}.self_attn.o_proj.weight"].zero_()
        state[f"model.layers.{k}.mlp.down_proj.weight"].zero_()
    state["model.norm.weight"].fill_(1.0)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})


@dataclass
class Served:
    frontend: str
    ids: list[int]  # the script's
    eos: int


ENGINES = {
    "hf": ["--engine-arg", "threads=1"],
    "vllm": ["--max-model-len", "256", "--engine-arg", "enforce_eager=true",
             "--engine-arg", f"kv_cache_memory_bytes={64 << 20}"],
}  # fmt: skip


@pytest.fixture(scope="module")
def scripted_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scripted-model")
    write_scripted_model(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module", params=list(ENGINES))
def served(scripted_dir: Path, request: pytest.FixtureRequest) -> Iterator[Served]:
    """A broker and one worker of each engine in turn, serving the model as
    ``scripted`` with the hermes parser."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(scripted_dir))
    ids = list(tok(SCRIPT, add_special_tokens=False)["input_ids"])
    procs: list[Proc] = []
    try:
        broker, fe, be = start_broker(*HB)
        procs.append(broker)
        procs.append(start_worker(
            be, "--engine", request.param, "--dtype", "float32", "--model", str(scripted_dir),
            "--model-names", "scripted", "--tool-call-parser", "hermes",
            *ENGINES[request.param], *HB,
        ))  # fmt: skip
        wait_models(fe, ["scripted"], 300)
        yield Served(fe, ids, tok.eos_token_id)
    finally:
        for pr in reversed(procs):
            pr.stop()


def test_special_tags_reach_the_parser(served: Served) -> None:
    with Client(served.frontend, timeout=60) as c:
        deltas = list(c.stream("scripted", messages=USER, tools=TOOLS, max_tokens=32,
                               temperature=0))  # fmt: skip
        # without tools, special tokens are skipped as ever
        plain = c.generate("scripted", messages=USER, max_tokens=32, temperature=0)
    assert [t for d in deltas for t in d.token_ids or []] == served.ids + [served.eos]
    assert "".join(d.text for d in deltas) == CONTENT  # no tags, no </s>
    assert deltas[-1].finish_reason == "tool_calls"
    assert called(deltas) == [("get_weather", {"city": "Paris"})]
    assert (plain.text, plain.finish_reason) == (CONTENT + "".join(CALL), "stop")


@pytest.mark.parametrize("stop", [None, "forecasts"])
def test_a_continuation_after_the_tag_goes_on_with_the_call(
    served: Served, stop: str | None
) -> None:
    """The earlier attempt delivered the ids up to ``<tool_call>``: the
    continuation primes the parser with their text, tag included. With a stop
    string the caller had not got ``forecast`` (it may begin ``forecasts``):
    it comes first, as content, never the call's text."""
    kw: dict[str, Any] = {"tools": TOOLS, "max_tokens": 32, "temperature": 0}
    if stop:
        kw["stop"] = [stop]
        with Client(served.frontend, timeout=60) as c:
            whole = c.generate("scripted", messages=USER, **kw)
        assert (whole.text, whole.finish_reason) == (CONTENT, "tool_calls")
    k = len(served.ids) - len(CALL) - 1  # the ids through <tool_call>
    got = CONTENT.index("forecast") if stop else len(CONTENT)
    params = p.SamplingParams(**kw)
    rest = continuation(served.frontend, "scripted", USER, params, served.ids[:k], got)
    assert "".join(d.text for d in rest) == CONTENT[got:]
    assert rest[-1].finish_reason == "tool_calls"
    assert called(rest) == [("get_weather", {"city": "Paris"})]
