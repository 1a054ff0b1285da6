"""The hf-api engine against a real OpenAI-compatible server: vLLM's own, on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from zserve.errors import BadRequest, ContextOverflow, EngineError
from zserve.launcher import Proc, free_port, wait_for
from zserve.protocol import Delta, SamplingParams
from zserve.worker.engine import GenerateRequest
from zserve.worker.engines import load_engine
from zserve.worker.engines.hf_api import Endpoint, HFApiEngine, load_model_info
from zserve.worker.options import EngineOptions

CONTEXT = 2048  # room for a generation long enough to cancel mid-way
PROMPTS = ["The morning train left the station at seven", "Once upon a time there was"]
CHAT = [{"role": "user", "content": "Tell me a story about a dragon"}]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def server_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("vllm-server") / "server.log"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, server_log: Path) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on an ephemeral loopback port; its /v1 base URL."""
    port = free_port()
    log_path = server_log
    args = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(tiny_model_dir), "--served-model-name", "tiny",
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", str(CONTEXT),
        "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--enable-log-requests",
    ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = Proc(args, name="vllm-server", stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if not proc.alive():
            return True  # stop waiting; reported below
        try:
            return httpx.get(f"{base}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(healthy, 240, "vLLM's server to answer /health")
        if not proc.alive():
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"vLLM's server exited:\n{tail}")
        yield f"{base}/v1"
    finally:
        proc.stop()


def info_file(tmp_path: Path, server: str, **entries: dict[str, Any]) -> Path:
    info = {"tiny-remote": {"model_path": "tiny", "api_base": server,
                            "context_length": CONTEXT, "model_names": ["tr"]}}  # fmt: skip
    info.update(entries)
    path = tmp_path / "models.json"
    path.write_text(json.dumps(info))
    return path


@pytest.fixture
async def engine(server: str, tmp_path: Path) -> AsyncIterator[HFApiEngine]:
    path = info_file(
        tmp_path,
        server,
        nope={"model_path": "no-such-model", "api_base": server},
        closed={"model_path": "tiny", "api_base": f"http://127.0.0.1:{free_port()}/v1"},
    )
    eng = load_engine("hf-api", EngineOptions(models=[], model_info_file=str(path)))
    assert isinstance(eng, HFApiEngine)
    await eng.start()
    try:
        yield eng
    finally:
        await eng.close()


def request(model: str, prompt: str | None = None, **params: Any) -> GenerateRequest:
    messages = params.pop("messages", None)
    rid = params.pop("request_id", "r")
    return GenerateRequest(rid, model, prompt, messages, SamplingParams(**params))


async def run(engine: HFApiEngine, req: GenerateRequest) -> list[Delta]:
    async with asyncio.timeout(60):
        return [d async for d in engine.generate(req)]


def text_of(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


def direct(server: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """The same request straight to the server, not streamed."""
    r = httpx.post(f"{server}/{path}", json={"model": "tiny", **body}, timeout=60)
    r.raise_for_status()
    return dict(r.json())


def metric(server: str, name: str, **labels: str) -> float:
    text = httpx.get(server.removesuffix("/v1") + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name} {labels}")


# ---------------------------------------------------------------- model info


def test_model_info_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({
        "a": {"model_path": "org/a", "api_base": "http://127.0.0.1:9/v1/", "model_names": ["a1"],
              "context_length": 100},
        "b": {"api_base": "https://router.huggingface.co/v1", "token": "hf_x",
              "context_length": 300},
    }))  # fmt: skip
    eng = HFApiEngine.from_options(EngineOptions(models=[], model_info_file=str(path)))
    assert eng.models == ["a", "a1", "b"]
    assert eng.context_length == 300
    a, b = eng.endpoints["a1"], eng.endpoints["b"]
    assert (a.model_path, a.api_base, b.model_path) == ("org/a", "http://127.0.0.1:9/v1", "b")
    # A null token never sends the local Hugging Face login to a third-party host.
    assert a.auth_headers() == {"authorization": None}
    assert Endpoint("h", "m", "https://router.huggingface.co/v1").auth_headers() == {}
    assert b.auth_headers() == {}
    picked = HFApiEngine.from_options(
        EngineOptions(models=["b"], model_info_file=str(path), context_length=64)
    )
    assert picked.models == ["b"] and picked.context_length == 64
    with pytest.raises(ValueError, match="not in"):
        HFApiEngine.from_options(EngineOptions(models=["zz"], model_info_file=str(path)))
    with pytest.raises(ValueError, match="model-info-file"):
        HFApiEngine.from_options(EngineOptions(models=[]))
    path.write_text(json.dumps({"a": {"model_path": "x"}}))
    with pytest.raises(ValueError, match="api_base"):
        load_model_info(path)
    path.write_text(json.dumps({"a": {"api_base": "http://h/v1", "model_names": ["b"]},
                                "b": {"api_base": "http://h/v1"}}))  # fmt: skip
    with pytest.raises(ValueError, match="twice"):
        HFApiEngine(load_model_info(path))


# ---------------------------------------------------------------- against vLLM


@pytest.mark.vllm
async def test_prompt_text_equals_the_server_answer(engine: HFApiEngine, server: str) -> None:
    for prompt in PROMPTS:
        deltas = await run(engine, request("tr", prompt, max_tokens=16, temperature=0))
        want = direct(server, "completions", {"prompt": prompt, "max_tokens": 16, "temperature": 0})
        assert text_of(deltas) == want["choices"][0]["text"]
        assert deltas[-1].finish_reason == want["choices"][0]["finish_reason"] == "length"
        assert deltas[-1].usage == {
            "prompt_tokens": want["usage"]["prompt_tokens"],
            "completion_tokens": want["usage"]["completion_tokens"],
        }
        assert all(d.finish_reason is None for d in deltas[:-1])


@pytest.mark.vllm
async def test_chat_text_equals_the_server_answer(engine: HFApiEngine, server: str) -> None:
    deltas = await run(engine, request("tiny-remote", messages=CHAT, max_tokens=12, temperature=0))
    body = {"messages": CHAT, "max_tokens": 12, "temperature": 0}
    want = direct(server, "chat/completions", body)
    assert text_of(deltas) == want["choices"][0]["message"]["content"]
    assert deltas[-1].usage is not None
    assert deltas[-1].usage["prompt_tokens"] == want["usage"]["prompt_tokens"]


@pytest.mark.vllm
async def test_sampling_parameters_reach_the_server(engine: HFApiEngine, server: str) -> None:
    params = {"max_tokens": 16, "temperature": 0.9, "seed": 11, "top_k": 20,
              "repetition_penalty": 3.0, "presence_penalty": 0.5}  # fmt: skip
    got = await run(engine, request("tr", PROMPTS[0], **params))
    want = direct(server, "completions", {"prompt": PROMPTS[0], **params})
    assert text_of(got) == want["choices"][0]["text"]
    # The extra-body fields matter: without them the server answers otherwise.
    plain = direct(server, "completions", {"prompt": PROMPTS[0], "max_tokens": 16,
                                           "temperature": 0.9, "seed": 11})  # fmt: skip
    assert plain["choices"][0]["text"] != want["choices"][0]["text"]
    # Stop strings reach the server, which ends the text before them.
    full = direct(server, "completions", {"prompt": PROMPTS[1], "max_tokens": 16, "temperature": 0})
    text = full["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    got = await run(engine, request("tr", PROMPTS[1], max_tokens=16, temperature=0, stop=[stop]))
    assert text_of(got) == text[: text.find(stop)]
    assert got[-1].finish_reason == "stop"


@pytest.mark.vllm
async def test_logprobs_in_openai_shape(engine: HFApiEngine) -> None:
    for req in (
        request("tr", PROMPTS[0], max_tokens=5, temperature=0, logprobs=2),
        request("tr", messages=CHAT, max_tokens=5, temperature=0, logprobs=2),
    ):
        deltas = await run(engine, req)
        entries = [e for d in deltas for e in d.logprobs or []]
        assert len(entries) == 5
        for e in entries:
            assert isinstance(e["token"], str) and e["logprob"] <= 0
            assert len(e["top_logprobs"]) == 2
            assert e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])  # greedy
    plain = await run(engine, request("tr", PROMPTS[0], max_tokens=3, temperature=0))
    assert all(d.logprobs is None for d in plain)


@pytest.mark.vllm
async def test_remote_errors_reach_the_client(engine: HFApiEngine) -> None:
    with pytest.raises(BadRequest, match="max_tokens") as bad:
        await run(engine, request("tr", PROMPTS[0], max_tokens=5000))
    assert bad.value.code == "bad_request"
    with pytest.raises(BadRequest, match="max_tokens"):
        await run(engine, request("tr", messages=CHAT, max_tokens=5000))
    with pytest.raises(BadRequest, match="no-such-model"):
        await run(engine, request("nope", messages=CHAT, max_tokens=4))
    with pytest.raises(BadRequest, match="no-such-model"):
        await run(engine, request("nope", PROMPTS[0], max_tokens=4))
    with pytest.raises(ContextOverflow):
        await run(engine, request("tr", "word " * (CONTEXT + 10), max_tokens=4))
    with pytest.raises(BadRequest, match="does not serve"):
        await run(engine, request("other", PROMPTS[0]))


async def test_unreachable_and_silent_endpoints_fail_fast(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        eng = HFApiEngine([
            Endpoint("closed", "tiny", f"http://127.0.0.1:{free_port()}/v1", connect_timeout=2),
            Endpoint("silent", "tiny", f"http://127.0.0.1:{port}/v1", timeout=1),
        ])  # fmt: skip
        await eng.start()
        try:
            for model in ("closed", "silent"):
                for req in (request(model, "hi", max_tokens=2),
                            request(model, messages=CHAT, max_tokens=2)):  # fmt: skip
                    async with asyncio.timeout(15):  # a deadline, not a speed check
                        with pytest.raises(EngineError, match="127.0.0.1") as err:
                            await run(eng, req)
                    assert ("cannot reach" if model == "closed" else "timed out") in str(err.value)
        finally:
            await eng.close()


@pytest.mark.vllm
async def test_cancel_closes_the_remote_request(
    engine: HFApiEngine, server: str, server_log: Path
) -> None:
    def aborted() -> int:  # vLLM logs "Request <id> aborted." when a client goes away
        return server_log.read_text(errors="replace").count(" aborted.")

    for req in (
        request("tr", "The", max_tokens=1500, temperature=0, ignore_eos=True, request_id="a"),
        request("tr", messages=CHAT, max_tokens=1500, temperature=0, ignore_eos=True,
                request_id="b"),
    ):  # fmt: skip
        def done() -> float:
            return metric(server, "vllm:request_success_total", finished_reason="length")

        for _ in range(3):
            before, finished = aborted(), done()
            gen = engine.generate(req)
            async with asyncio.timeout(30):
                first = [await anext(gen), await anext(gen)]
            assert all(d.finish_reason is None for d in first)
            # What the worker runtime does on cancel: stop reading, then abort.
            await gen.aclose()
            await engine.abort(req.request_id)
            try:
                await asyncio.to_thread(
                    wait_for, lambda n=before, f=finished: aborted() > n or done() > f, 40,
                    "the server to abort (or finish) the request",
                )  # fmt: skip
            except TimeoutError as e:
                tail = server_log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{e}; the server's log ends:\n{tail}") from None
            if aborted() > before:
                break
            # vLLM wrote all 1500 tokens into the socket before the abort: a
            # test process descheduled that long (a loaded suite). Again.
        else:
            pytest.fail("the request ran to its end before its abort, 3 times")
        assert done() == finished


@pytest.mark.vllm
def test_worker_process_serves_the_remote(stack: Any, server: str, tmp_path: Path) -> None:
    """zserve worker --engine hf-api, through the broker, as a client sees it."""
    from zserve.errors import BadRequest as ClientBadRequest

    path = info_file(tmp_path, server)
    stack.start_broker()
    stack.worker("--model-info-file", str(path), engine="hf-api")
    workers = stack.wait_workers(1)
    assert sorted(workers[0]["models"]) == ["tiny-remote", "tr"]
    want = direct(server, "completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0})
    with stack.client() as c:
        got = c.generate("tr", PROMPTS[0], max_tokens=8, temperature=0)
        assert got.text == want["choices"][0]["text"]
        assert got.finish_reason == "length"
        assert got.usage["prompt_tokens"] == want["usage"]["prompt_tokens"]
        with pytest.raises(ClientBadRequest, match="max_tokens"):
            c.generate("tr", PROMPTS[0], max_tokens=5000)
