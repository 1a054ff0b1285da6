"""An hf worker behind a real broker and gateway, for the defects of issue 19
it had on the request path:

* a multi-MiB prompt was tokenized on the worker's event loop: heartbeats
  stopped, the broker dropped the worker with every stream it ran;
* a resumed stream with a stop string lost a character of held-back text on
  a SentencePiece tokenizer (the runtime decoded ``continue_ids`` without
  the prompt's context);
* ``n > 1`` with a ``seed`` gave n identical choices.

One broker, one hf worker (the tiny model as ``tiny``, its SentencePiece
twin as ``sp``), one gateway, heartbeats every 0.2 s (a worker silent for
2 s is dropped: a margin for a loaded test machine, far below the seconds a
7 MiB prompt took to tokenize).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from tests.gateway.conftest import start_gateway
from tests.worker.test_review_hf import held_stop_case, stream_pieces
from zserve import protocol as p
from zserve.client import Client
from zserve.errors import BadRequest, ContextOverflow
from zserve.launcher import Proc, start_broker, start_worker, wait_models

PROMPT = "The morning train left the station at seven"
HB = ["--heartbeat-interval", "0.2", "--heartbeat-liveness", "10"]


@dataclass
class Served:
    frontend: str
    url: str  # the gateway's /v1
    sp_dir: Path


@pytest.fixture(scope="module")
def served(tiny_model_dir: Path, sp_model_dir: Path) -> Iterator[Served]:
    procs: list[Proc] = []
    try:
        broker, fe, be = start_broker(*HB)
        procs.append(broker)
        worker = ["--engine", "hf", "--dtype", "float32", "--capacity", "4"]
        worker += ["--engine-arg", "threads=1", "--model", str(tiny_model_dir)]
        worker += ["--model-names", "tiny", "--model", str(sp_model_dir), "--model-names", "sp"]
        procs.append(start_worker(be, *worker, *HB))
        wait_models(fe, ["tiny", "sp"], 180)
        gateway, root = start_gateway(fe, *HB)
        procs.append(gateway)
        yield Served(fe, root + "/v1", sp_model_dir)
    finally:
        for pr in reversed(procs):
            pr.stop()


def test_a_multi_mib_prompt_leaves_the_worker_beating(served: Served) -> None:
    """The big prompt is refused (context_overflow, a bad_request) without
    stopping the worker's loop: the stream beside it completes, unresumed,
    and the worker is never dropped."""
    n = 600
    with Client(served.frontend, timeout=60) as c:
        before = c.status()
        (worker,) = before["workers"]
        s = c.stream("tiny", PROMPT, max_tokens=n, temperature=0, ignore_eos=True)
        got = [next(iter(s))]
        big = "The morning train left the station. " * ((7 << 20) // 36)  # 7 MiB
        with pytest.raises(ContextOverflow, match="context") as e:
            c.generate("tiny", big, max_tokens=4)
        assert e.value.code == "context_overflow" and isinstance(e.value, BadRequest)
        got += list(s)
        assert sum(len(d.token_ids or []) for d in got) == n
        assert got[-1].finish_reason == "length"
        assert c.resumes == 0
        after = c.status()
    (same,) = after["workers"]
    assert same["worker_id"] == worker["worker_id"]
    assert after["counters"]["workers_registered"] == before["counters"]["workers_registered"]


def _resume(frontend: str, params: p.SamplingParams, cont: list[int], chars: int) -> Any:
    """A continuation sent as a client's resumption sends it: (text, finish)."""
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(frontend)
    try:
        body = p.encode_generate(PROMPT, None, params.encode(), cont, chars)
        s.send_multipart([p.CLIENT, p.C_REQUEST, b"resume-1", b"sp", body])
        text: list[str] = []
        while True:
            assert s.poll(60_000), "no answer to the continuation"
            frames = s.recv_multipart()
            if frames[1] != p.C_TOKENS:
                continue  # a broker heartbeat
            for rec in p.decode_tokens(frames[2]):
                assert rec[0] == b"resume-1"
                text.append(rec[1])
                if rec[3] is not None:
                    assert rec[3] != "error", rec[4]
                    return "".join(text), rec[3]
    finally:
        s.close()


def test_a_resumed_stream_keeps_its_held_stop_text_on_sentencepiece(served: Served) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(served.sp_dir))
    n = 48
    kw: dict[str, Any] = {"max_tokens": n, "temperature": 0, "ignore_eos": True}
    with Client(served.frontend, timeout=60) as c:
        full = c.generate("sp", PROMPT, **kw)
        ids, text = full.token_ids, full.text
        assert ids is not None and text.startswith(" ")  # decoded alone, it loses that space
        k, stop, chars = held_stop_case(stream_pieces(tok, list(tok(PROMPT)["input_ids"]), ids))
        whole = c.generate("sp", PROMPT, stop=stop, **kw)
    assert whole.finish_reason == "stop" and whole.text == text[: text.find(stop)]
    # The first attempt sent ids[:k] and ``chars`` characters, holding the rest
    # back (it may begin the stop string); its worker died there.
    params = p.SamplingParams(stop=[stop], **kw)
    rest, finish = _resume(served.frontend, params, ids[:k], chars)
    assert finish == "stop"
    assert text[:chars] + rest == whole.text


def _choices(served: Served, **body: Any) -> list[str]:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 16, "ignore_eos": True, **body}
    r = httpx.post(served.url + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return [ch["text"] for ch in sorted(r.json()["choices"], key=lambda ch: ch["index"])]


def test_n_seeded_choices_differ_and_repeat(served: Served) -> None:
    first = _choices(served, n=3, seed=5, temperature=1.0)
    assert len(set(first)) == 3, first
    assert _choices(served, n=3, seed=5, temperature=1.0) == first
    assert _choices(served, seed=5, temperature=1.0) == first[:1]  # choice 0 keeps the seed
