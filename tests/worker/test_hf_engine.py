"""The hf engine in-process: batching, parameters, detokenization, embeddings."""

from __future__ import annotations

import asyncio
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.worker.reference import greedy_ref, prompt_ids
from zserve.errors import BadRequest, ContextOverflow, EngineError, ModelNotFound
from zserve.protocol import Delta, SamplingParams
from zserve.worker.engine import GenerateRequest
from zserve.worker.engines import load_engine
from zserve.worker.engines.hf import HFEngine
from zserve.worker.engines.hf_detok import IncrementalDetokenizer
from zserve.worker.options import EngineOptions

PROMPTS = [
    "Hello",
    "The morning train left the station at seven",
    "In the small café by the river, the baker opened his doors before sunrise. He sold",
    "A",
    "Numbers appear everywhere: 3 apples, 12 eggs, 100 metres, 2048 positions, the year",
    "Once upon a time there was a small dragon who lived in a cave",
]
_ids = itertools.count()


@dataclass
class Result:
    deltas: list[Delta] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return [t for d in self.deltas for t in d.token_ids or []]

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def last(self) -> Delta:
        return self.deltas[-1]


def request(model: str = "tiny", prompt: str | None = None, **params: Any) -> GenerateRequest:
    messages = params.pop("messages", None)
    rid = params.pop("request_id", None) or f"t{next(_ids)}"
    return GenerateRequest(rid, model, prompt, messages, SamplingParams(**params))


async def run(engine: HFEngine, req: GenerateRequest) -> Result:
    res = Result()
    async with asyncio.timeout(60):
        async for d in engine.generate(req):
            res.deltas.append(d)
    return res


def start(engine: HFEngine) -> HFEngine:
    asyncio.run(engine.start())
    return engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[HFEngine]:
    eng = start(HFEngine([(str(tiny_model_dir), ["tiny"])]))
    yield eng
    asyncio.run(eng.close())

# ---------------------------------------------------------------- generation


async def test_greedy_equals_generate_for_concurrent_requests(engine: HFEngine, ref: Any) -> None:
    n = 40
    first = [
        asyncio.create_task(run(engine, request(prompt=p, max_tokens=n, temperature=0)))
        for p in PROMPTS[:3]
    ]
    # The rest join a batch that is already decoding.
    async with asyncio.timeout(30):
        while engine.stats()["steps"] < 3:
            await asyncio.sleep(0.005)
    later = [
        asyncio.create_task(run(engine, request(prompt=p, max_tokens=n, temperature=0)))
        for p in PROMPTS[3:]
    ]
    results = await asyncio.gather(*first, *later)
    _, tok = ref
    for prompt, res in zip(PROMPTS, results, strict=True):
        pids = prompt_ids(ref, prompt)
        expected = greedy_ref(ref, pids, n)
        assert res.ids == expected, prompt
        hit_eos = expected[-1] == tok.eos_token_id
        assert res.last.finish_reason == ("stop" if hit_eos else "length")
        assert res.last.usage == {"prompt_tokens": len(pids), "completion_tokens": len(expected)}
        assert res.deltas[0].usage is not None
        assert res.deltas[0].usage["prompt_tokens"] == len(pids)
        assert res.text == tok.decode(res.ids, skip_special_tokens=True)


async def test_chat_goes_through_the_template(engine: HFEngine, ref: Any) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Tell me a story"}]},
    ]
    res = await run(engine, request(messages=messages, max_tokens=12, temperature=0))
    _, tok = ref
    text = "<s><|system|>\nBe brief.</s>\n<|user|>\nTell me a story</s>\n<|assistant|>\n"
    pids = tok(text, add_special_tokens=False)["input_ids"]
    assert res.last.usage["prompt_tokens"] == len(pids)
    assert res.ids == greedy_ref(ref, pids, 12)


async def test_seeded_sampling_is_reproducible_alone_and_in_a_batch(engine: HFEngine) -> None:
    params = dict(
        temperature=0.9, top_p=0.95, top_k=200, seed=1234, max_tokens=40, prompt=PROMPTS[1]
    )
    alone = await run(engine, request(**params))
    crowd = [
        request(prompt=p, temperature=1.0, max_tokens=40, seed=i) for i, p in enumerate(PROMPTS)
    ]
    results = await asyncio.gather(*(run(engine, r) for r in crowd), run(engine, request(**params)))
    assert results[-1].ids == alone.ids
    other = await run(engine, request(**{**params, "seed": 4321}))
    assert other.ids != alone.ids


async def test_top_k_one_is_greedy(engine: HFEngine, ref: Any) -> None:
    res = await run(engine, request(prompt=PROMPTS[2], temperature=1.5, top_k=1, max_tokens=20))
    assert res.ids == greedy_ref(ref, prompt_ids(ref, PROMPTS[2]), 20)


async def test_repetition_penalty(engine: HFEngine, ref: Any) -> None:
    pids = prompt_ids(ref, PROMPTS[1])
    plain = greedy_ref(ref, pids, 60)
    assert len(set(plain)) < len(plain)  # the random model loops without a penalty
    res = await run(
        engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=60, repetition_penalty=50.0)
    )
    assert len(set(res.ids)) == len(res.ids)
    assert not set(res.ids) & set(pids)


async def test_max_tokens_stop_token_ids_and_eos(engine: HFEngine, ref: Any) -> None:
    _, tok = ref
    full = (await run(engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=30))).ids
    k = next(i for i in range(2, len(full)) if full[i] not in full[:i])
    stopper = full[k]

    res = await run(engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=5))
    assert (res.ids, res.last.finish_reason) == (full[:5], "length")
    assert res.last.usage["completion_tokens"] == 5

    res = await run(
        engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=30, stop_token_ids=[stopper])
    )
    assert res.ids == full[: k + 1]
    assert res.last.finish_reason == "stop"
    assert res.text == tok.decode(full[:k], skip_special_tokens=True)  # stopper's text held

    sm = engine._served["tiny"]
    saved = sm.eos_ids
    sm.eos_ids = frozenset({stopper})  # pretend the model's EOS is that token
    try:
        res = await run(engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=30))
        assert (res.ids, res.last.finish_reason) == (full[: k + 1], "stop")
        res = await run(
            engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=30, ignore_eos=True)
        )
        assert (res.ids, res.last.finish_reason) == (full, "length")
    finally:
        sm.eos_ids = saved


async def test_stop_strings(engine: HFEngine) -> None:
    full = await run(engine, request(prompt=PROMPTS[4], temperature=0, max_tokens=40))
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = text.index(stop)
    res = await run(engine, request(prompt=PROMPTS[4], temperature=0, max_tokens=40, stop=[stop]))
    assert res.text == text[:cut]
    assert res.last.finish_reason == "stop"
    assert res.last.usage["completion_tokens"] == len(res.ids) < 40


async def test_logprobs(engine: HFEngine, ref: Any) -> None:
    res = await run(engine, request(prompt=PROMPTS[0], temperature=0, max_tokens=6, logprobs=3))
    entries = [e for d in res.deltas for e in d.logprobs or []]
    for d in res.deltas:
        assert len(d.logprobs or []) == len(d.token_ids or [])
    assert len(entries) == 6
    model, tok = ref
    for tid, e in zip(res.ids, entries, strict=True):
        assert set(e) == {"token", "logprob", "top_logprobs"}
        assert e["token"] == tok.decode([tid])
        tops = e["top_logprobs"]
        assert len(tops) == 3 and all(set(t) == {"token", "logprob"} for t in tops)
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == e["token"]  # greedy picks the top token
        assert e["logprob"] == pytest.approx(tops[0]["logprob"]) and e["logprob"] <= 0
    x = torch.tensor([prompt_ids(ref, PROMPTS[0])])
    with torch.inference_mode():
        first = model(x).logits[0, -1].float().log_softmax(-1)
    assert entries[0]["logprob"] == pytest.approx(float(first.max()), abs=1e-4)

    res = await run(engine, request(prompt=PROMPTS[0], temperature=0, max_tokens=3, logprobs=0))
    assert all(e["top_logprobs"] == [] for d in res.deltas for e in d.logprobs)
    res = await run(engine, request(prompt=PROMPTS[0], temperature=0, max_tokens=3))
    assert all(d.logprobs is None for d in res.deltas)


# ---------------------------------------------------------------- UTF-8


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE's alphabet)."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def test_detokenizer_never_splits_a_character(ref: Any) -> None:
    _, tok = ref
    text = "café 日本 🙂 naïve—ok"
    byte_char = bytes_to_unicode()
    ids = [tok.convert_tokens_to_ids(byte_char[b]) for b in text.encode()]
    assert tok.decode(ids[:4]) == "caf\ufffd"  # the first byte of 'é' alone is broken
    detok = IncrementalDetokenizer(tok, prompt_ids(ref, "Hi"))
    pieces = [detok.push([i]) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == text
    dangling = IncrementalDetokenizer(tok)
    assert dangling.push(ids[:4]) == ""  # "caf" + half a character: held back
    assert dangling.flush() == "caf\ufffd"  # an unfinished character shows at the end only


async def test_deltas_concatenate_to_the_full_decode(engine: HFEngine, ref: Any) -> None:
    _, tok = ref
    res = await run(
        engine,
        request(prompt="Symbols such as €, £, ° and 日本", temperature=1.3, seed=5, max_tokens=120),
    )
    assert res.text == tok.decode(res.ids, skip_special_tokens=True)
    assert all(not d.text.endswith("\ufffd") for d in res.deltas[:-1])


# ---------------------------------------------------------------- batching, abort


async def test_concurrent_requests_are_batched(tiny_model_dir: Path) -> None:
    eng = HFEngine([(str(tiny_model_dir), ["tiny"])])
    await eng.start()
    try:
        results = await asyncio.gather(
            *(
                run(eng, request(prompt=p, temperature=0, max_tokens=32))
                for p in PROMPTS + PROMPTS[:2]
            )
        )
        stats = eng.stats()
        assert sum(len(r.ids) for r in results) == 8 * 32
        assert stats["max_batch_size"] > 1
        assert stats["steps"] < 8 * 32 // 2  # one forward pass served many requests
        assert stats["active"] == 0
    finally:
        await eng.close()


async def test_prompts_joining_together_are_prefilled_together(
    tiny_model_dir: Path, ref: Any
) -> None:
    """One padded prefill pass for prompts that arrive at once; greedy output
    equals generate() for each, seeded sampling equals the one-at-a-time runs."""
    prompts = PROMPTS + PROMPTS[:2]
    outputs: dict[bool, list[Result]] = {}
    for batched in (True, False):
        eng = HFEngine([(str(tiny_model_dir), ["tiny"])], engine_args={"batch_prefill": batched})
        await eng.start()
        try:
            # Written before the batch thread wakes, so they join at one step.
            reqs = [request(prompt=p, temperature=0, max_tokens=16) for p in prompts]
            reqs += [request(prompt=p, temperature=0.8, seed=7, max_tokens=16) for p in prompts]
            outputs[batched] = await asyncio.gather(*(run(eng, r) for r in reqs))
            stats = eng.stats()
            assert stats["prefills"] == len(reqs)
            if batched:
                assert stats["prefill_passes"] < len(reqs) // 2
            else:
                assert stats["prefill_passes"] == len(reqs)
        finally:
            await eng.close()
    assert [r.ids for r in outputs[True]] == [r.ids for r in outputs[False]]
    for prompt, res in zip(prompts, outputs[True], strict=False):
        assert res.ids == greedy_ref(ref, prompt_ids(ref, prompt), 16), prompt


async def test_abort_frees_the_batch_slot(engine: HFEngine, ref: Any) -> None:
    long = request(prompt=PROMPTS[3], temperature=0)  # no max_tokens: until the context fills
    other = request(prompt=PROMPTS[1], temperature=0, max_tokens=50)
    other_task = asyncio.create_task(run(engine, other))
    gen = engine.generate(long)
    async with asyncio.timeout(30):
        got = [await anext(gen) for _ in range(3)]
    assert got[0].token_ids
    assert engine.stats()["active"] >= 1
    await gen.aclose()
    await engine.abort(long.request_id)
    assert long.request_id not in engine._seqs
    other_res = await other_task
    assert other_res.ids == greedy_ref(ref, prompt_ids(ref, PROMPTS[1]), 50)
    assert engine.stats()["active"] == 0


async def test_abort_while_being_read_ends_the_stream(engine: HFEngine) -> None:
    req = request(prompt=PROMPTS[0], temperature=0)
    deltas = []
    async with asyncio.timeout(30):
        async for d in engine.generate(req):
            deltas.append(d)
            if len(deltas) == 2:
                await engine.abort(req.request_id)
    assert deltas[-1].finish_reason is None  # ended by the abort, not by a finish
    assert len(deltas) < 100
    assert engine.stats()["active"] == 0


async def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    engine: HFEngine, ref: Any
) -> None:
    runner = engine._served["tiny"].runner
    real = runner.model
    calls = 0

    def broken(**kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("simulated device failure")
        return real(**kw)

    runner.model = broken
    try:
        with pytest.raises(EngineError, match="simulated device failure"):
            await run(engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=20))
    finally:
        runner.model = real
    res = await run(engine, request(prompt=PROMPTS[1], temperature=0, max_tokens=20))
    assert res.ids == greedy_ref(ref, prompt_ids(ref, PROMPTS[1]), 20)
    assert engine.stats()["active"] == 0


async def test_abort_of_an_unknown_request_is_a_no_op(engine: HFEngine) -> None:
    await engine.abort("never-seen")


# ---------------------------------------------------------------- limits, errors


async def test_context_overflow_and_clamping(tiny_model_dir: Path, ref: Any) -> None:
    eng = HFEngine([(str(tiny_model_dir), ["tiny"])], context_length=64)
    await eng.start()
    try:
        assert eng.context_length == 64
        long_prompt = " ".join(["word"] * 100)
        with pytest.raises(ContextOverflow) as exc:
            await run(eng, request(prompt=long_prompt, max_tokens=1))
        assert exc.value.code == "context_overflow"
        prompt = " ".join(["apple"] * 30)
        n_prompt = len(prompt_ids(ref, prompt))
        assert n_prompt < 64
        res = await run(eng, request(prompt=prompt, temperature=0, max_tokens=500))
        assert res.last.finish_reason == "length"
        assert len(res.ids) == 64 - n_prompt  # max_tokens clamped to the context
        assert res.last.usage == {"prompt_tokens": n_prompt, "completion_tokens": 64 - n_prompt}
    finally:
        await eng.close()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"max_tokens": 0},
        {"logprobs": 99},
        {"repetition_penalty": 0.0},
        {"stop_token_ids": "x"},
    ],
)
async def test_bad_params(engine: HFEngine, params: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        await run(engine, request(prompt="Hi", **params))


async def test_bad_requests(engine: HFEngine) -> None:
    with pytest.raises(ModelNotFound):
        await run(engine, request(model="nope", prompt="Hi"))
    with pytest.raises(BadRequest):
        await run(engine, request(prompt=None))
    assert engine.stats()["active"] == 0


def test_missing_model_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_engine("hf", EngineOptions(models=[missing]))
    with pytest.raises(ValueError, match="unknown hf engine arguments"):
        HFEngine.from_options(EngineOptions(models=[str(tmp_path)], engine_args={"bogus": 1}))
    with pytest.raises(ValueError, match="threads must be >= 1"):
        HFEngine.from_options(EngineOptions(models=[str(tmp_path)], engine_args={"threads": -2}))


async def test_threads_argument_sets_torch_threads(tiny_model_dir: Path, ref: Any) -> None:
    before = torch.get_num_threads()
    eng = HFEngine([(str(tiny_model_dir), ["tiny"])], engine_args={"threads": 1})
    await eng.start()
    try:
        assert torch.get_num_threads() == 1
        got = await run(eng, request(prompt=PROMPTS[0], temperature=0, max_tokens=5))
        assert got.ids == greedy_ref(ref, prompt_ids(ref, PROMPTS[0]), 5)
    finally:
        await eng.close()
        torch.set_num_threads(before)


# ---------------------------------------------------------------- several models, embeddings


async def test_several_models_embeddings_and_routing(
    tiny_model_dir: Path, minilm_dir: Path, tmp_path: Path, ref: Any
) -> None:
    from zserve.tiny_model import write_tiny_model

    other = write_tiny_model(tmp_path / "tiny-seed1", seed=1)
    opts = EngineOptions(
        models=[str(tiny_model_dir), str(other), str(minilm_dir)],
        model_names=[["tiny", "tiny-alias"], ["tiny1"], ["minilm"]],
    )
    eng = load_engine("hf", opts)
    assert isinstance(eng, HFEngine)
    await eng.start()
    try:
        assert eng.models == ["tiny", "tiny-alias", "tiny1", "minilm"]
        assert eng.context_length == 2048
        a, alias, b = await asyncio.gather(
            *(
                run(eng, request(model=m, prompt=PROMPTS[1], temperature=0, max_tokens=20))
                for m in ("tiny", "tiny-alias", "tiny1")
            )
        )
        assert a.ids == alias.ids == greedy_ref(ref, prompt_ids(ref, PROMPTS[1]), 20)
        assert b.ids != a.ids

        with pytest.raises(BadRequest, match="embeddings only"):
            await run(eng, request(model="minilm", prompt="Hi"))

        texts = [
            "A man is eating food.",
            "Un café, s'il vous plaît",
            "The quick brown fox " * 200,
        ]  # the last one is truncated to 256 tokens
        vecs, n_tokens = await eng.embed("minilm", texts)
        expected, expected_tokens = st_recipe(minilm_dir, texts)
        assert n_tokens == expected_tokens
        for v, e in zip(vecs, expected, strict=True):
            assert len(v) == 384
            assert math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-5)
            assert sum(x * y for x, y in zip(v, e, strict=True)) > 0.9999

        assert await eng.count_tokens("minilm", "hello world") == 4  # [CLS] hello world [SEP]
        assert await eng.count_tokens("tiny", PROMPTS[1]) == len(prompt_ids(ref, PROMPTS[1]))
        vecs, n = await eng.embed("tiny", ["hello", "a longer text here"])
        assert len(vecs) == 2 and len(vecs[0]) == 128 and n > 0
    finally:
        await eng.close()


def st_recipe(path: Path, texts: list[str]) -> tuple[list[list[float]], int]:
    """sentence-transformers' recipe, done directly with transformers."""
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**enc)[0]
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1).tolist(), int(mask.sum())
