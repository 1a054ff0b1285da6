"""Sampling parameters through the gateway on a real engine: the hf worker on
the tiny model, behind a real broker and ``zserve gateway``.

Each parameter must reach the engine and change its output as it should,
checked against plain transformers on the same weights where a reference
exists (greedy, repetition penalty, presence/frequency penalties, logprobs).

Served models (one hf worker):

* ``tiny``: the tiny model as written.
* ``eos``: the same weights with one more end-of-sequence id: the token that
  greedy decoding of ``PROMPT`` emits at position ``k`` (its first token not
  seen before), so ``ignore_eos`` has something to ignore.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.gateway.conftest import start_gateway
from tests.worker.reference import greedy_ref, prompt_ids
from zserve.launcher import Proc, start_broker, start_worker, wait_models

PROMPT = "The morning train left the station at seven"
N = 24  # tokens per generation


@dataclass
class HFGateway:
    url: str  # http://127.0.0.1:PORT/v1
    ref: Any  # (model, tokenizer) through plain transformers
    full: list[int]  # greedy ids for PROMPT, N tokens, EOS ignored
    k: int  # the position of the token that is ``eos``'s extra EOS

    def complete(self, model: str = "tiny", **body: Any) -> dict[str, Any]:
        body = {"model": model, "prompt": PROMPT, "max_tokens": N, **body}
        r = httpx.post(self.url + "/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()

    def text(self, **body: Any) -> str:
        return self.complete(**body)["choices"][0]["text"]

    def decode(self, ids: list[int]) -> str:
        return self.ref[1].decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def hf(
    tiny_model_dir: Path, ref: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[HFGateway]:
    full = greedy_ref(ref, prompt_ids(ref, PROMPT), N, ignore_eos=True)
    k = next(i for i in range(2, N) if full[i] not in full[:i])
    eos_dir = tmp_path_factory.mktemp("tiny-eos") / "model"
    shutil.copytree(tiny_model_dir, eos_dir)
    gen_cfg = eos_dir / "generation_config.json"
    cfg = json.loads(gen_cfg.read_text())
    cfg["eos_token_id"] = [cfg["eos_token_id"], full[k]]
    gen_cfg.write_text(json.dumps(cfg))

    procs: list[Proc] = []
    try:
        broker, fe, be = start_broker()
        procs.append(broker)
        procs.append(
            start_worker(
                be,
                "--engine",
                "hf",
                "--dtype",
                "float32",
                "--capacity",
                "4",
                "--model",
                str(tiny_model_dir),
                "--model-names",
                "tiny",
                "--model",
                str(eos_dir),
                "--model-names",
                "eos",
            )  # fmt: skip
        )
        wait_models(fe, ["tiny", "eos"], 180)
        gateway, root = start_gateway(fe)
        procs.append(gateway)
        yield HFGateway(root + "/v1", ref, full, k)
    finally:
        for pr in reversed(procs):
            pr.stop()


def test_temperature_zero_is_transformers_greedy(hf: HFGateway) -> None:
    out = hf.complete(temperature=0, ignore_eos=True)
    (choice,) = out["choices"]
    assert choice["text"] == hf.decode(hf.full)
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == N
    assert out["usage"]["prompt_tokens"] == len(prompt_ids(hf.ref, PROMPT))


def test_seed_makes_sampling_reproducible(hf: HFGateway) -> None:
    a = hf.text(temperature=1.0, seed=7, ignore_eos=True)
    assert hf.text(temperature=1.0, seed=7, ignore_eos=True) == a
    assert hf.text(temperature=1.0, seed=8, ignore_eos=True) != a
    assert a != hf.decode(hf.full)  # it really sampled


def test_tiny_top_p_and_top_k_one_are_greedy(hf: HFGateway) -> None:
    greedy = hf.decode(hf.full)
    for seed in (1, 2):
        assert hf.text(temperature=1.5, top_p=1e-6, seed=seed, ignore_eos=True) == greedy
        assert hf.text(temperature=1.5, top_k=1, seed=seed, ignore_eos=True) == greedy


def test_repetition_penalty_matches_transformers(hf: HFGateway) -> None:
    model, tok = hf.ref
    ids = prompt_ids(hf.ref, PROMPT)
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=N,
            min_new_tokens=N, pad_token_id=tok.eos_token_id, repetition_penalty=1.5,
        )  # fmt: skip
    expected = out[0, len(ids) :].tolist()
    assert expected != hf.full  # the penalty changes greedy output on this prompt
    got = hf.text(temperature=0, repetition_penalty=1.5, ignore_eos=True)
    assert got == hf.decode(expected)


def _penalised_greedy(
    ref: Any, ids: list[int], n: int, presence: float, frequency: float
) -> list[int]:
    """OpenAI's penalties by hand: each step, logits minus ``frequency`` x the
    count of each token generated so far, minus ``presence`` where it is > 0."""
    model, _ = ref
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            counts = torch.zeros_like(logits)
            for t in out:
                counts[t] += 1
            logits = logits - frequency * counts - presence * (counts > 0)
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize(("presence", "frequency"), [(2.0, 0.0), (0.0, 1.5), (0.5, 0.5)])
def test_presence_and_frequency_penalties_match_their_definition(
    hf: HFGateway, presence: float, frequency: float
) -> None:
    ids = prompt_ids(hf.ref, PROMPT)
    expected = _penalised_greedy(hf.ref, ids, N, presence, frequency)
    assert expected != hf.full  # the penalty changes greedy output on this prompt
    got = hf.text(
        temperature=0, presence_penalty=presence, frequency_penalty=frequency, ignore_eos=True
    )
    assert got == hf.decode(expected)


def test_eos_stops_and_ignore_eos_runs_to_max_tokens(hf: HFGateway) -> None:
    stopped = hf.complete("eos", temperature=0)
    (choice,) = stopped["choices"]
    assert choice["finish_reason"] == "stop"
    assert stopped["usage"]["completion_tokens"] == hf.k + 1  # the EOS counts, its text not
    assert choice["text"] == hf.decode(hf.full[: hf.k])

    ran = hf.complete("eos", temperature=0, ignore_eos=True)
    (choice,) = ran["choices"]
    assert choice["finish_reason"] == "length"
    assert ran["usage"]["completion_tokens"] == N
    assert choice["text"] == hf.decode(hf.full)


def test_stop_token_ids_stop_at_that_id(hf: HFGateway) -> None:
    out = hf.complete(temperature=0, ignore_eos=True, stop_token_ids=[hf.full[hf.k]])
    (choice,) = out["choices"]
    assert choice["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == hf.k + 1
    assert choice["text"] == hf.decode(hf.full[: hf.k])


def test_logprobs_completions_and_chat(hf: HFGateway) -> None:
    model, tok = hf.ref
    out = hf.complete(temperature=0, ignore_eos=True, max_tokens=6, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in hf.full[:6]]
    assert len(lp["token_logprobs"]) == 6 and len(lp["top_logprobs"]) == 6
    assert all(len(top) == 3 for top in lp["top_logprobs"])
    # greedy: each chosen token is the top alternative, with its logprob
    for token, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
    x = torch.tensor([prompt_ids(hf.ref, PROMPT)])
    with torch.inference_mode():
        first = model(x).logits[0, -1].float().log_softmax(-1)
    assert lp["token_logprobs"][0] == pytest.approx(float(first.max()), abs=1e-4)

    body = {
        "model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5,
        "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2,
    }  # fmt: skip
    r = httpx.post(hf.url + "/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for e in content:
        assert len(e["top_logprobs"]) == 2
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
        assert e["logprob"] <= 0

    plain = hf.complete(temperature=0, ignore_eos=True, max_tokens=3)
    assert plain["choices"][0]["logprobs"] is None  # none unless asked for
