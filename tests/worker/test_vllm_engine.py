"""The vllm engine in-process on the tiny model: one engine for the module (~25 s to start,
the ``vllm_engine`` fixture of ``tests/worker/conftest.py``)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
from pathlib import Path
from typing import Any

import psutil
import pytest
import vllm  # noqa: F401 - a missing or broken vLLM fails here, it is not skipped

from tests.worker.conftest import VLLM_CONTEXT, VLLM_ENGINE_ARGS
from tests.worker.reference import greedy_ref
from zserve.errors import BadRequest, ContextOverflow, EngineError
from zserve.launcher import wait_for
from zserve.protocol import Delta, SamplingParams
from zserve.worker.engine import GenerateRequest
from zserve.worker.engines.vllm import VLLMEngine
from zserve.worker.options import EngineOptions

pytestmark = pytest.mark.vllm
# Every async test shares the module's event loop, where the engine lives.
on_engine_loop = pytest.mark.asyncio(loop_scope="module")

PROMPTS = [
    "The morning train left the station at seven",
    "Once upon a time there was a small dragon who lived in a cave",
]
_ids = itertools.count()


def request(prompt: str | None = None, **params: Any) -> GenerateRequest:
    messages = params.pop("messages", None)
    return GenerateRequest(f"v{next(_ids)}", "tiny", prompt, messages, SamplingParams(**params))


async def run(engine: VLLMEngine, req: GenerateRequest) -> list[Delta]:
    async with asyncio.timeout(60):
        return [d async for d in engine.generate(req)]


def counts(usage: dict[str, int] | None) -> dict[str, int]:
    """Usage without ``cached_tokens`` (vLLM's prefix cache hits, which vary)."""
    return {k: v for k, v in (usage or {}).items() if k != "cached_tokens"}


def ids_of(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids or []]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


async def wait_until(cond: Any, timeout: float, what: str) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


# ---------------------------------------------------------------- options


def test_options_reject_unknown_engine_args_and_several_models(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="no_such_arg"):
        VLLMEngine.from_options(
            EngineOptions(models=[str(tiny_model_dir)], engine_args={"no_such_arg": 1})
        )
    with pytest.raises(ValueError, match="one model"):
        VLLMEngine.from_options(EngineOptions(models=["a", "b"]))
    eng = VLLMEngine.from_options(
        EngineOptions(
            models=[str(tiny_model_dir)],
            dtype="bfloat16",
            context_length=128,
            engine_args={"tensor_parallel_size": 1, "max_model_len": 64},
        )
    )
    assert eng.models == [tiny_model_dir.name]
    assert eng.engine_args["dtype"] == "bfloat16"
    assert eng.engine_args["max_model_len"] == 64  # the explicit engine argument wins
    assert eng.engine_args["tensor_parallel_size"] == 1


# ---------------------------------------------------------------- generation


@on_engine_loop
async def test_engine_serves_its_names_and_context(vllm_engine: VLLMEngine) -> None:
    assert vllm_engine.models == ["tiny", "tiny-alias"]
    assert vllm_engine.context_length == VLLM_CONTEXT
    assert not vllm_engine.dead


@on_engine_loop
async def test_greedy_equals_transformers_generate(vllm_engine: VLLMEngine, ref: Any) -> None:
    n = 24
    _, tok = ref
    results = await asyncio.gather(
        *(run(vllm_engine, request(p, max_tokens=n, temperature=0)) for p in PROMPTS)
    )
    for prompt, deltas in zip(PROMPTS, results, strict=True):
        pids = tok(prompt)["input_ids"]
        expected = greedy_ref(ref, pids, n)
        assert ids_of(deltas) == expected, prompt
        last = deltas[-1]
        assert last.finish_reason == ("stop" if expected[-1] == tok.eos_token_id else "length")
        want = {"prompt_tokens": len(pids), "completion_tokens": len(expected)}
        assert counts(last.usage) == want
        assert deltas[0].usage is not None and deltas[0].usage["prompt_tokens"] == len(pids)
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert text_of(deltas) == tok.decode(expected, skip_special_tokens=True)


@on_engine_loop
async def test_usage_reports_prefix_cache_hits(vllm_engine: VLLMEngine) -> None:
    # A prompt of several KV blocks, twice: the second run's prefix is cached
    # (cache_aware dispatch is measured by this figure, bench/affinity.py).
    prompt = "a prefix worth caching, " * 12
    first = (await run(vllm_engine, request(prompt, max_tokens=2, temperature=0)))[-1].usage
    again = (await run(vllm_engine, request(prompt, max_tokens=2, temperature=0)))[-1].usage
    assert first is not None and again is not None
    assert first.get("cached_tokens", 0) == 0
    assert 0 < again["cached_tokens"] < again["prompt_tokens"]


@on_engine_loop
async def test_chat_goes_through_the_template(vllm_engine: VLLMEngine, ref: Any) -> None:
    _, tok = ref
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]},
    ]
    deltas = await run(vllm_engine, request(messages=messages, max_tokens=10, temperature=0))
    text = "<s><|system|>\nBe brief.</s>\n<|user|>\nTell me a story</s>\n<|assistant|>\n"
    pids = tok(text, add_special_tokens=False)["input_ids"]
    assert deltas[-1].usage is not None
    assert deltas[-1].usage["prompt_tokens"] == len(pids)
    assert ids_of(deltas) == greedy_ref(ref, pids, 10)


@on_engine_loop
async def test_seeded_sampling_is_reproducible(vllm_engine: VLLMEngine) -> None:
    def req(seed: int) -> GenerateRequest:
        return request(PROMPTS[0], max_tokens=16, temperature=1.0, top_k=50, seed=seed)

    a, b, c = await asyncio.gather(
        run(vllm_engine, req(7)), run(vllm_engine, req(7)), run(vllm_engine, req(8))
    )
    assert ids_of(a) == ids_of(b)
    assert text_of(a) == text_of(b)
    assert ids_of(a) != ids_of(c)


@on_engine_loop
async def test_stop_strings_and_stop_token_ids(vllm_engine: VLLMEngine) -> None:
    full = await run(
        vllm_engine, request(PROMPTS[1], max_tokens=24, temperature=0, ignore_eos=True)
    )
    ids, text = ids_of(full), text_of(full)
    # A stop string taken from the middle of the greedy text.
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = text.find(stop)
    deltas = await run(vllm_engine, request(PROMPTS[1], max_tokens=24, temperature=0, stop=[stop]))
    assert text_of(deltas) == text[:cut]
    assert deltas[-1].finish_reason == "stop"
    # A stop token id: the output ends with its first occurrence.
    tid = ids[8]
    k = ids.index(tid)
    deltas = await run(
        vllm_engine, request(PROMPTS[1], max_tokens=24, temperature=0, stop_token_ids=[tid])
    )
    assert ids_of(deltas) == ids[: k + 1]
    assert deltas[-1].finish_reason == "stop"


@on_engine_loop
async def test_max_tokens_and_repetition_penalty(vllm_engine: VLLMEngine) -> None:
    deltas = await run(vllm_engine, request(PROMPTS[0], max_tokens=5, temperature=0))
    assert len(ids_of(deltas)) == 5
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage is not None and deltas[-1].usage["completion_tokens"] == 5
    # repetition_penalty reaches the sampler: a strong one changes the greedy path.
    plain = await run(vllm_engine, request(PROMPTS[0], max_tokens=32, temperature=0))
    penal = await run(
        vllm_engine, request(PROMPTS[0], max_tokens=32, temperature=0, repetition_penalty=5.0)
    )
    assert ids_of(plain) != ids_of(penal)


@on_engine_loop
async def test_without_max_tokens_generation_ends_at_the_context(vllm_engine: VLLMEngine) -> None:
    prompt = "word " * 200
    deltas = await run(vllm_engine, request(prompt, temperature=0, ignore_eos=True))
    usage = deltas[-1].usage
    assert usage is not None
    assert usage["prompt_tokens"] + usage["completion_tokens"] == VLLM_CONTEXT
    assert deltas[-1].finish_reason == "length"


@on_engine_loop
async def test_logprobs_are_openai_shaped(vllm_engine: VLLMEngine) -> None:
    deltas = await run(vllm_engine, request(PROMPTS[0], max_tokens=6, temperature=0, logprobs=3))
    n = 0
    for d in deltas:
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids or [])
        for entry in d.logprobs:
            n += 1
            assert isinstance(entry["token"], str)
            top = entry["top_logprobs"]
            assert len(top) == 3
            lps = [t["logprob"] for t in top]
            assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
            # Greedy: the chosen token is the most likely one.
            assert entry["logprob"] == pytest.approx(top[0]["logprob"])
            assert entry["token"] == top[0]["token"]
    assert n == 6
    plain = await run(vllm_engine, request(PROMPTS[0], max_tokens=3, temperature=0))
    assert all(d.logprobs is None for d in plain)
    zero = await run(vllm_engine, request(PROMPTS[0], max_tokens=2, temperature=0, logprobs=0))
    assert all(e["top_logprobs"] == [] for d in zero for e in d.logprobs or [])


@on_engine_loop
async def test_abort_frees_the_request(vllm_engine: VLLMEngine) -> None:
    assert vllm_engine.llm is not None
    req = request(PROMPTS[0], max_tokens=200, temperature=0, ignore_eos=True)
    gen = vllm_engine.generate(req)
    got = [await anext(gen), await anext(gen)]
    assert vllm_engine.llm.get_num_unfinished_requests() == 1
    # What the worker runtime does on cancel: stop reading, then abort.
    await gen.aclose()
    await vllm_engine.abort(req.request_id)
    await wait_until(
        lambda: vllm_engine.llm is not None and vllm_engine.llm.get_num_unfinished_requests() == 0,
        10,
        "vLLM still holds the aborted request",
    )
    assert got[0].finish_reason is None
    # The engine still serves after an abort.
    deltas = await run(vllm_engine, request(PROMPTS[0], max_tokens=3, temperature=0))
    assert len(ids_of(deltas)) == 3


@on_engine_loop
async def test_context_overflow_and_bad_params(vllm_engine: VLLMEngine) -> None:
    with pytest.raises(ContextOverflow, match="context"):
        await run(vllm_engine, request("word " * (VLLM_CONTEXT + 10), max_tokens=4))
    # The protocol allows temperature up to 100; vLLM refuses above 2.
    with pytest.raises(BadRequest, match="temperature"):
        await run(vllm_engine, request(PROMPTS[0], max_tokens=4, temperature=5.0))
    with pytest.raises(BadRequest, match="vocab"):
        await run(vllm_engine, request(PROMPTS[0], max_tokens=4, stop_token_ids=[10**6]))
    assert vllm_engine.llm is not None and vllm_engine.llm.get_num_unfinished_requests() == 0
    assert await vllm_engine.count_tokens("tiny", "The morning train") > 1


def _command_line(proc: psutil.Process) -> str:
    """``proc``'s command line and name; empty for one that has exited (the
    core of an engine another test module closed may linger as a zombie)."""
    try:
        return " ".join([*proc.cmdline(), proc.name()])
    except psutil.Error:
        return ""


@on_engine_loop
async def test_structured_outputs(vllm_engine: VLLMEngine, ref: Any, tiny_model_dir: Path) -> None:
    """tests/worker/test_structured_engines.py's checks on this engine (no
    second engine start), and the same greedy tokens as the hf engine: both
    run zserve/worker/grammar.py's policy."""
    from tests.worker import test_structured_engines as t
    from zserve.worker.engines.hf import HFEngine

    await t._rows_with_and_without_grammars(vllm_engine, ref)
    await t._seeds_and_budgets(vllm_engine)
    whole = await t._resumed_equals_uninterrupted(vllm_engine)
    await t._bad_requests(vllm_engine, ref[1])
    hf = HFEngine([(str(tiny_model_dir), ["tiny"])], engine_args={"threads": 1})
    await hf.start()
    try:
        ids, _, _ = await t.run(hf, t.request(max_tokens=64, temperature=0, structured=t.JSON))
    finally:
        await hf.close()
    assert ids == whole


@on_engine_loop
async def test_tool_calls_required_and_named(vllm_engine: VLLMEngine) -> None:
    """The worker's tool plan on this engine, as the runtime runs it: the
    tools reach the template, and required / named calls validate."""
    import json

    import jsonschema

    from zserve.protocol import merge_tool_calls
    from zserve.worker.tools import plan

    days = {"type": "integer", "minimum": 1, "maximum": 7}
    city = {"type": "object", "properties": {"city": {"type": "string"}, "days": days},
            "required": ["city", "days"]}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": city}}]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    bare = await run(vllm_engine, request(messages=msgs, max_tokens=1))
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        for seed in (None, 1):
            sp = SamplingParams.from_dict({"tools": tools, "tool_choice": choice, "seed": seed,
                "temperature": 0 if seed is None else 1.0, "max_tokens": 64,
                "parallel_tool_calls": False})  # fmt: skip
            tp = plan(sp, None)
            assert tp is not None
            req = GenerateRequest(f"v{next(_ids)}", "tiny", None, msgs, tp.params, tools=tp.offer)
            async with asyncio.timeout(60):
                conv = tp.converter(vllm_engine.tokenizer("tiny"))
                gen = tp.wrap(vllm_engine.generate(req), conv)
                out = [d async for d in gen]
            assert out[-1].finish_reason == "tool_calls", (choice, seed)
            assert out[-1].usage["prompt_tokens"] > bare[-1].usage["prompt_tokens"] + 20
            calls: list[dict[str, Any]] = []
            merge_tool_calls(calls, [f for d in out for f in d.tool_calls or []])
            assert [c["function"]["name"] for c in calls] == ["get_weather"]
            jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), city)


@on_engine_loop
async def test_token_id_prompts_and_prompt_logprobs(vllm_engine: VLLMEngine, ref: Any) -> None:
    import torch

    model, tok = ref
    pids = tok(PROMPTS[0])["input_ids"]
    req = request(max_tokens=8, temperature=0, ignore_eos=True, prompt_logprobs=2)
    req.prompt_ids = pids
    deltas = await run(vllm_engine, req)
    assert ids_of(deltas) == greedy_ref(ref, pids, 8, ignore_eos=True)
    assert counts(deltas[-1].usage) == {"prompt_tokens": len(pids), "completion_tokens": 8}
    scored = deltas[0].prompt_logprobs
    assert scored is not None and all(d.prompt_logprobs is None for d in deltas[1:])
    with torch.inference_mode():
        logits = model(torch.tensor([pids])).logits[0, :-1].float()
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(pids[1:])[:, None])[:, 0]
    assert scored[0]["logprob"] is None and len(scored) == len(pids)
    assert [e["logprob"] for e in scored[1:]] == pytest.approx(want.tolist(), abs=1e-3)
    assert all(len(e["top_logprobs"]) == 2 for e in scored[1:])
    # max_tokens 0: the prompt scored, nothing generated
    (only,) = await run(vllm_engine, request(PROMPTS[0], max_tokens=0, prompt_logprobs=0))
    assert only.finish_reason == "length" and not only.token_ids and not only.text
    assert counts(only.usage) == {"prompt_tokens": len(pids), "completion_tokens": 0}
    assert [e["logprob"] for e in only.prompt_logprobs or []][1:] == pytest.approx(
        want.tolist(), abs=1e-3
    )


@on_engine_loop
async def test_tokenize_and_detokenize(vllm_engine: VLLMEngine, ref: Any) -> None:
    _, tok = ref
    msgs = [{"role": "user", "content": "Hi there"}]
    ids = await vllm_engine.tokenize(request(PROMPTS[1]))
    assert ids == tok(PROMPTS[1])["input_ids"]
    chat = await vllm_engine.tokenize(request(messages=msgs))
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat == tok(text, add_special_tokens=False)["input_ids"]
    assert await vllm_engine.detokenize("tiny", ids) == tok.decode(ids)


@on_engine_loop
async def test_engine_death_fails_requests_and_sets_dead(vllm_engine: VLLMEngine) -> None:
    """Last in the module: kills the engine core under the shared engine."""
    children = psutil.Process().children()  # ours only, not a stack worker's
    cores = [c for c in children if "EngineCore" in _command_line(c)]
    assert cores, f"cannot find vLLM's engine core among {[c.name() for c in children]}"
    for c in cores:
        os.kill(c.pid, signal.SIGKILL)
    await wait_until(lambda: vllm_engine.dead, 30, "the engine never noticed its core died")
    with pytest.raises(EngineError):
        await run(vllm_engine, request(PROMPTS[0], max_tokens=3))


def test_worker_process_serves_and_leaves_when_the_engine_dies(
    stack: Any, tiny_model_dir: Path, ref: Any
) -> None:
    """zserve worker --engine vllm through the broker; a dead engine core ends the worker."""
    stack.start_broker("--heartbeat-interval", "0.2")
    worker = stack.worker(
        "--model", str(tiny_model_dir), "--model-names", "tiny", "--dtype", "float32",
        "--max-model-len", str(VLLM_CONTEXT), "--engine-arg", "enforce_eager=true",
        "--engine-arg", f"kv_cache_memory_bytes={VLLM_ENGINE_ARGS['kv_cache_memory_bytes']}",
        "--heartbeat-interval", "0.2",
        engine="vllm",
    )  # fmt: skip
    (info,) = stack.wait_workers(1, timeout=180)
    assert info["models"] == ["tiny"]
    _, tok = ref
    pids = tok(PROMPTS[0])["input_ids"]
    with stack.client(timeout=60) as c:
        got = c.generate("tiny", PROMPTS[0], max_tokens=12, temperature=0)
        assert got.token_ids == greedy_ref(ref, pids, 12)
        assert counts(got.usage) == {"prompt_tokens": len(pids), "completion_tokens": 12}
        with pytest.raises(ContextOverflow):
            c.generate("tiny", "word " * (VLLM_CONTEXT + 10), max_tokens=2)
    cores = [
        c for c in psutil.Process(worker.pid).children(recursive=True)
        if "EngineCore" in " ".join([c.name(), *c.cmdline()])
    ]  # fmt: skip
    assert cores, "no vLLM engine core under the worker"
    for c in cores:
        c.kill()
    wait_for(lambda: not worker.alive(), 60, "the worker to leave after its engine died")
    wait_for(lambda: not stack.status()["workers"], 20, "the broker to drop the worker")
