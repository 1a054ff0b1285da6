"""The floor of the HTTP path: bare Starlette on uvicorn (uvloop, httptools), no broker.

One route, ``POST /v1/chat/completions``, answers like a null engine (token i
is ``"t{i} "``) with just enough of the OpenAI shape for `bench.loadgen`: a
JSON completion, or an SSE stream with one chunk per token, a final chunk
with ``finish_reason`` and ``data: [DONE]``. No validation, no logging, no
middleware: whatever a real gateway costs above this is its own overhead.

With ``broker=`` (``--broker ADDR``) the same bare handler takes its tokens
from a zserve broker through one ``zserve.AsyncClient`` (``generate`` or
``stream``, the prompt passed through) instead of making them: bare Starlette
plus the native round trip, nothing of the gateway's own. Beside the floor
and the gateway in one run it splits the gateway's latency into the HTTP
floor, the broker round trip as seen from inside an HTTP server, and what the
gateway adds to both.

`starlette_floor()` runs it as a separate process on a free port and yields
its base URL (``http://127.0.0.1:PORT/v1``); ``python -m bench.starlette_floor
--port P [--broker ADDR]`` runs it in the foreground.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bench._procs import start_logged, wait_ready
from zserve.launcher import free_port

STARTUP_TIMEOUT = 30.0


def _chunk(model: str, created: int, delta: dict[str, str], finish: str | None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return b"data: " + json.dumps({
        "id": "chatcmpl-floor", "object": "chat.completion.chunk", "created": created,
        "model": model, "choices": [choice],
    }).encode() + b"\n\n"  # fmt: skip


_client: Any = None  # a zserve.AsyncClient in --broker mode


async def _texts(body: dict[str, Any], n: int) -> AsyncIterator[str]:
    """The token texts: made here, or streamed from the broker in --broker mode."""
    if _client is None:
        for i in range(n):
            yield f"t{i} "
        return
    async with _client.stream(body["model"], messages=body["messages"], max_tokens=n) as s:
        async for d in s:
            if d.text:
                yield d.text


async def _sse(body: dict[str, Any], model: str, n: int) -> AsyncIterator[bytes]:
    created = int(time.time())
    yield _chunk(model, created, {"role": "assistant", "content": ""}, None)
    async for text in _texts(body, n):
        yield _chunk(model, created, {"content": text}, None)
    yield _chunk(model, created, {}, "length")
    yield b"data: [DONE]\n\n"


async def chat_completions(request: Request) -> Response:
    body = json.loads(await request.body())
    model = str(body.get("model", "null"))
    n = int(body.get("max_tokens") or 16)
    if body.get("stream"):
        return StreamingResponse(_sse(body, model, n), media_type="text/event-stream")
    if _client is None:
        text = "".join(f"t{i} " for i in range(n))
    else:
        text = (await _client.generate(model, messages=body["messages"], max_tokens=n)).text
    return JSONResponse({
        "id": "chatcmpl-floor",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "length",
        }],
        "usage": {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n},
    })  # fmt: skip


async def models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "null", "object": "model"}]})


def create_app(broker: str | None = None) -> Starlette:
    """The floor app; with ``broker``, tokens come from it (one AsyncClient)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        global _client
        if broker is None:
            yield
            return
        from zserve.client import AsyncClient

        _client = AsyncClient(broker)
        try:
            yield
        finally:
            await _client.aclose()
            _client = None

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def _answers(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2.0) as resp:
        return resp.status == 200


@contextmanager
def starlette_floor(
    python: str | Path | None = None,
    *,
    port: int | None = None,
    broker: str | None = None,
    startup_timeout: float = STARTUP_TIMEOUT,
) -> Iterator[str]:
    """Run the floor server in its own process group; yield ``http://HOST:PORT/v1``.
    With ``broker``, its tokens come from that zserve broker."""
    host = "127.0.0.1"  # zserve.launcher.free_port() finds loopback ports
    python = str(python or sys.executable)
    port = port or free_port()
    repo = Path(__file__).resolve().parent.parent
    with ExitStack() as stack:
        logs = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="floor-")))
        argv = [python, "-m", "bench.starlette_floor", "--host", host, "--port", str(port)]
        if broker:
            argv += ["--broker", broker]
        proc = start_logged(stack, "starlette_floor", argv, logs / "floor.out", cwd=repo)
        base = f"http://{host}:{port}/v1"
        wait_ready(lambda: _answers(base + "/models"), timeout=startup_timeout,
                   what="Starlette floor", procs=[proc])  # fmt: skip
        yield base


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="bare Starlette SSE floor server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--broker", help="take the tokens from this zserve broker's frontend")
    args = parser.parse_args()
    uvicorn.run(create_app(args.broker), host=args.host, port=args.port, loop="uvloop",
                http="httptools", log_level="warning", access_log=False)  # fmt: skip


if __name__ == "__main__":
    main()
