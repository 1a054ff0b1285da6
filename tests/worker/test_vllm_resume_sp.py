"""Issue 19, defect 7 on the vllm engine: a resumed stream with a stop string
must hold back the very text the first attempt held back. The worker runtime
rebuilt it by decoding ``continue_ids`` alone; on a SentencePiece tokenizer
(Llama-2, Mistral, Gemma) that loses the first word's leading space, which
the stream had (vLLM's detokenizer takes the prompt as context), so the text
shifted one character and the stop could be missed.

The SentencePiece twin of the tiny model (``sp_model_dir``: Metaspace, byte
fallback; head_dim 64, which vLLM on CPU takes) on one in-process vLLM
engine, behind the real ``Worker`` runtime on this module's event loop, with
the test as its broker (a ROUTER on loopback): one engine start for the
module.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import vllm  # noqa: F401 - a missing or broken vLLM fails here, it is not skipped
import zmq
import zmq.asyncio

from tests.worker.conftest import VLLM_CONTEXT, VLLM_ENGINE_ARGS
from tests.worker.test_review_hf import held_stop_case, stream_pieces
from zserve import protocol as p
from zserve.worker.engine import GenerateRequest
from zserve.worker.engines.vllm import VLLMEngine
from zserve.worker.runtime import Worker, WorkerConfig

pytestmark = pytest.mark.vllm
on_engine_loop = pytest.mark.asyncio(loop_scope="module")

PROMPT = "The morning train left the station at seven"
_ids = itertools.count()


@dataclass
class SpWorker:
    engine: VLLMEngine
    sock: zmq.asyncio.Socket  # the broker's ROUTER
    wid: bytes  # the worker session's routing id

    async def stream(
        self, params: p.SamplingParams, cont: list[int] | None = None, chars: int = 0
    ) -> tuple[str, str]:
        """One request through the worker runtime, as a broker sends a
        client's (resumed) request: (text, finish_reason)."""
        rid = f"r{next(_ids)}".encode()
        body = p.encode_generate(PROMPT, None, params.encode(), cont, chars)
        frames = [self.wid, p.WORKER, p.W_REQUEST, b"client", rid, b"sp", body]
        await self.sock.send_multipart(frames)
        text: list[str] = []
        async with asyncio.timeout(60):
            while True:
                frames = await self.sock.recv_multipart()
                if frames[2] == p.W_HEARTBEAT:
                    await self.sock.send_multipart([frames[0], p.WORKER, p.W_HEARTBEAT])
                if frames[2] != p.W_TOKENS:
                    continue
                for rec in p.decode_tokens(frames[5]):
                    assert rec[0] == rid
                    text.append(rec[1])
                    if rec[3] is not None:
                        assert rec[3] != p.FINISH_ERROR, rec[4]
                        return "".join(text), rec[3]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def sp_worker(sp_model_dir: Path) -> AsyncIterator[SpWorker]:
    from zserve.worker.engines import load_engine
    from zserve.worker.options import EngineOptions

    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:*")
    opts = EngineOptions(
        models=[str(sp_model_dir)],
        model_names=[["sp"]],
        dtype="float32",
        context_length=VLLM_CONTEXT,
        engine_args=dict(VLLM_ENGINE_ARGS),
    )
    eng = load_engine("vllm", opts)
    assert isinstance(eng, VLLMEngine)
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    worker = Worker(eng, WorkerConfig(broker=endpoint, heartbeat_interval=2.0))
    task = asyncio.create_task(worker.run())  # starts the engine, then says READY
    try:
        async with asyncio.timeout(300):
            while True:
                frames = await sock.recv_multipart()
                if frames[2] == p.W_READY:
                    break
        yield SpWorker(eng, sock, frames[0])
    finally:
        worker.stop()
        try:
            async with asyncio.timeout(60):
                await task
        finally:
            sock.close(0)
            ctx.term()


async def _engine_run(eng: VLLMEngine, n: int) -> list[p.Delta]:
    req = GenerateRequest(
        f"e{next(_ids)}", "sp", PROMPT,
        params=p.SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
    )  # fmt: skip
    async with asyncio.timeout(60):
        return [d async for d in eng.generate(req)]


@on_engine_loop
async def test_vllm_rebuilds_continued_text_as_its_stream_decoded_it(sp_worker: SpWorker) -> None:
    """``continued_text`` of the ids streamed so far is the text vLLM's own
    detokenizer streamed for them, at every delta: leading space included."""
    eng = sp_worker.engine
    deltas = await _engine_run(eng, 48)
    ids = [t for d in deltas for t in d.token_ids or []]
    text = "".join(d.text for d in deltas)
    assert len(ids) == 48 and text.startswith(" ")
    assert eng.tokenizer("sp").decode(ids, skip_special_tokens=True) == text[1:]  # alone: lost
    got_ids: list[int] = []
    got = ""
    for d in deltas:
        got_ids += d.token_ids or []
        got += d.text
        req = GenerateRequest("x", "sp", PROMPT, continue_ids=list(got_ids))
        assert await eng.continued_text(req) == got, len(got_ids)


@on_engine_loop
async def test_a_resumed_vllm_stream_keeps_its_held_stop_text_on_sentencepiece(
    sp_worker: SpWorker,
) -> None:
    """The first attempt sent ids[:k] and ``chars`` characters, holding the
    rest back (it may begin the stop string); its worker died there. The
    continuation sends the rest exactly as the uninterrupted run did, and
    ends at the stop string."""
    eng = sp_worker.engine
    tok = eng.tokenizer("sp")
    n = 48
    deltas = await _engine_run(eng, n)
    ids = [t for d in deltas for t in d.token_ids or []]
    text = "".join(d.text for d in deltas)
    k, stop, chars = held_stop_case(stream_pieces(tok, list(tok.encode(PROMPT)), ids))
    kw: dict[str, Any] = {"max_tokens": n, "temperature": 0, "ignore_eos": True}
    params = p.SamplingParams(stop=[stop], **kw)
    whole, finish = await sp_worker.stream(params)
    assert finish == p.FINISH_STOP and whole == text[: text.find(stop)]
    rest, finish = await sp_worker.stream(params, ids[:k], chars)
    assert finish == p.FINISH_STOP
    assert text[:chars] + rest == whole
