"""The one HTTP load generator for every row of the OpenAI-API benchmark (httpx, asyncio).

Both workloads speak ``POST {base_url}/chat/completions`` (``base_url`` as the
openai client takes it, e.g. ``http://127.0.0.1:8000/v1``) to a null engine,
whose token i is the word ``t{i}``. Every response is checked: HTTP 200, the
exact text ``t0 t1 ... t{n-1}`` (whitespace aside), ``finish_reason ==
"length"``, and for streams the closing ``data: [DONE]``. Anything else raises
`LoadGenError`: a benchmark never reports numbers from broken responses.

* `latency`: sequential non-streaming requests on one keep-alive connection,
  one sample per request (seconds, from sending the request to the parsed body).
* `stream_throughput`: `concurrency` streaming requests at once, each reading
  its SSE stream to the end; tokens are counted from the content deltas.
* `stream_one`: one such stream, read and checked; bench/soak.py counts the
  `LoadGenError` codes it raises.
* `stream_latency`: sequential streams of one token, read to their end,
  through chat completions or the Responses API (``api``), one sample each.
* The streaming workloads take ``api="responses"`` to speak
  ``POST {base_url}/responses`` instead (``stream_one_response``: the
  text from ``response.output_text.delta`` events, the end an
  ``incomplete`` response for ``max_output_tokens``). It parses only those
  events, picked by their SSE ``event:`` name as a client that dispatches
  on it does (the OpenAI SDK parses all); every chat chunk carries text
  and is parsed. The other events (the response as created, the item and
  part openings, the three done events that repeat the whole text) are
  read as lines, not decoded: decoding them cost this 2-core machine's
  load generator ~1.3 us per token, beside the servers it measures.
* `raw_latency`: like `latency`, from a bare blocking socket that writes each
  request (headers and body) in one ``send`` and reads the response by its
  ``content-length``: next to nothing on the client side, so what it
  measures is the server. httpx writes headers and body separately and costs
  a few hundred microseconds of CPU per request, on the same two cores.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx

PROMPT = [{"role": "user", "content": "Say something."}]
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class LoadGenError(RuntimeError):
    """A response that was not the complete, correct null-engine output.

    ``code`` says what went wrong, for callers that count failures: the error
    code the server gave (in the HTTP body or a stream's error event),
    ``http_<status>`` where it gave none, ``wrong_text``, ``wrong_finish``,
    ``no_done`` (a stream without its closing ``[DONE]``) or ``malformed``.
    """

    def __init__(self, message: str, code: str = "malformed") -> None:
        super().__init__(message)
        self.code = code


def _http_error(status: int, raw: bytes) -> LoadGenError:
    """A non-200 response: its OpenAI error code where the body has one."""
    try:
        code = str(json.loads(raw)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = f"http_{status}"
    return LoadGenError(f"HTTP {status}: {raw[:500]!r}", code)


def expected_words(max_tokens: int) -> list[str]:
    return [f"t{i}" for i in range(max_tokens)]


def _check_text(text: str, max_tokens: int, finish_reason: Any, where: str) -> None:
    words = text.split()
    if words != expected_words(max_tokens):
        shown = text if len(text) < 200 else text[:100] + " ... " + text[-100:]
        raise LoadGenError(f"{where}: expected {max_tokens} tokens t0..t{max_tokens - 1}, "
                           f"got {len(words)}: {shown!r}", "wrong_text")  # fmt: skip
    if finish_reason != "length":
        raise LoadGenError(
            f"{where}: finish_reason {finish_reason!r}, expected 'length'", "wrong_finish"
        )


def chat_body(model: str, max_tokens: int, stream: bool) -> dict[str, Any]:
    """A greedy chat completion request of `max_tokens` on `PROMPT`."""
    return {
        "model": model,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }


def _check_completion(status: int, raw: bytes, max_tokens: int) -> None:
    """A non-streaming answer: HTTP 200 and the whole null-engine text."""
    if status != 200:
        raise _http_error(status, raw)
    data = json.loads(raw)
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as exc:
        raise LoadGenError(f"malformed completion: {str(data)[:500]}") from exc
    _check_text(text or "", max_tokens, choice.get("finish_reason"), "completion")


async def _complete(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    resp = await client.post(url, json=body)
    _check_completion(resp.status_code, resp.content, body["max_tokens"])


async def latency(
    base_url: str,
    model: str,
    n: int,
    *,
    max_tokens: int = 1,
    warmup: int = 20,
) -> list[float]:
    """Time `n` sequential non-streaming chat completions; return each one's seconds.

    `warmup` untimed requests go first (connection set-up, caches, lazy imports).
    """
    url = base_url.rstrip("/") + "/chat/completions"
    body = chat_body(model, max_tokens, stream=False)
    samples: list[float] = []
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for _ in range(warmup):
            await _complete(client, url, body)
        for _ in range(n):
            t0 = time.perf_counter()
            await _complete(client, url, body)
            samples.append(time.perf_counter() - t0)
    return samples


def raw_latency(
    base_url: str, model: str, n: int, *, max_tokens: int = 1, warmup: int = 20
) -> list[float]:
    """Time `n` sequential non-streaming chat completions over one bare
    keep-alive socket (see the module docstring); return each one's seconds."""
    url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
    payload = json.dumps(chat_body(model, max_tokens, stream=False)).encode()
    head = (
        f"POST {url.raw_path.decode()} HTTP/1.1\r\nhost: {url.host}:{url.port}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    )
    request = head.encode() + payload
    samples: list[float] = []
    with socket.create_connection((url.host, url.port), timeout=60) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(warmup + n):
            t0 = time.perf_counter()
            sock.sendall(request)
            buf = b""
            while True:
                got = sock.recv(65536)
                if not got:
                    raise LoadGenError("the server closed the connection")
                buf += got
                headers, sep, body = buf.partition(b"\r\n\r\n")
                if sep:
                    lines = headers.split(b"\r\n")
                    length = next((int(x.split(b":", 1)[1]) for x in lines[1:]
                                   if x.lower().startswith(b"content-length:")), None)  # fmt: skip
                    if length is None:
                        raise LoadGenError(f"no content-length: {headers[:300]!r}")
                    if len(body) >= length:
                        break
            t1 = time.perf_counter()
            status = int(lines[0].split()[1])  # HTTP/1.1 200 OK
            _check_completion(status, body[:length], max_tokens)
            if i >= warmup:
                samples.append(t1 - t0)
    return samples


async def stream_one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> tuple[int, int]:
    """Read one SSE stream to its end and check it; return (tokens, content chunks).

    Raises `LoadGenError` (with its ``code``) for anything but the whole,
    correct null-engine text; httpx's own errors pass through.
    """
    parts: list[str] = []
    finish_reason = None
    done = False
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise _http_error(resp.status_code, await resp.aread())
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, event: lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:  # the error event of a stream that failed mid-way
                code = (chunk["error"] or {}).get("code") or "error"
                raise LoadGenError(f"stream error chunk: {payload[:500]}", str(code))
            choices = chunk.get("choices")
            if not choices:
                if "usage" in chunk:
                    continue  # a usage-only chunk (stream_options.include_usage)
                raise LoadGenError(f"stream chunk without choices: {payload[:500]}")
            choice = choices[0]
            content = (choice.get("delta") or {}).get("content")
            if content:
                parts.append(content)
            if choice.get("finish_reason") is not None:
                finish_reason = choice["finish_reason"]
    if not done:
        raise LoadGenError("stream ended without data: [DONE]", "no_done")
    max_tokens = body["max_tokens"]
    _check_text("".join(parts), max_tokens, finish_reason, "stream")
    return max_tokens, len(parts)


def responses_body(model: str, max_tokens: int) -> dict[str, Any]:
    """A greedy streamed Responses API request of `max_tokens` on `PROMPT`
    (stored, as the API does by default)."""
    return {
        "model": model,
        "input": PROMPT[0]["content"],
        "max_output_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
    }


# the events `stream_one_response` parses: the text and the response's end
_CHECKED = frozenset((
    "response.output_text.delta", "response.completed", "response.incomplete", "response.failed",
))  # fmt: skip


async def stream_one_response(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[int, int]:
    """As `stream_one`, for a Responses API stream."""
    parts: list[str] = []
    final: dict[str, Any] | None = None
    async with client.stream("POST", url, json=body) as resp:
        if resp.status_code != 200:
            raise _http_error(resp.status_code, await resp.aread())
        kind = None
        async for line in resp.aiter_lines():
            if line.startswith("event:"):  # the event's name: only those checked are parsed
                kind = line[6:].strip()
                continue
            if not line.startswith("data:") or kind not in _CHECKED:
                continue
            event = json.loads(line[5:])
            if event.get("type") != kind:
                raise LoadGenError(f"event {kind!r} carries {line[:200]!r}")
            if kind == "response.output_text.delta":
                parts.append(event["delta"])
            elif kind in ("response.completed", "response.incomplete", "response.failed"):
                final = event["response"]
                break  # the last event (as stream_one stops at [DONE])
    if final is None:
        raise LoadGenError("stream ended without its response", "no_done")
    if final.get("status") == "failed":
        raise LoadGenError(f"response failed: {final.get('error')}", "error")
    reason = (final.get("incomplete_details") or {}).get("reason")
    max_tokens = body["max_output_tokens"]
    _check_text("".join(parts), max_tokens, "length" if reason == "max_output_tokens" else
                final.get("status"), "response stream")  # fmt: skip
    return max_tokens, len(parts)


def _stream_call(base_url: str, model: str, max_tokens: int, api: str) -> tuple[str, Any, Any]:
    """(url, body, reader) of one streamed request through ``api``."""
    if api == "responses":
        url = base_url.rstrip("/") + "/responses"
        return url, responses_body(model, max_tokens), stream_one_response
    url = base_url.rstrip("/") + "/chat/completions"
    return url, chat_body(model, max_tokens, stream=True), stream_one


async def stream_latency(
    base_url: str, model: str, n: int, *, api: str = "chat", warmup: int = 20
) -> list[float]:
    """Time `n` sequential one-token streams, each read to its end."""
    url, body, one = _stream_call(base_url, model, 1, api)
    samples: list[float] = []
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await one(client, url, body)
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
    return samples


async def stream_throughput(
    base_url: str,
    model: str,
    concurrency: int,
    max_tokens: int,
    *,
    rounds: int = 1,
    warmup: bool = True,
    api: str = "chat",
) -> dict[str, float]:
    """Run `concurrency` streaming requests at once, `rounds` times back to back per slot.

    Returns ``{"tokens", "seconds", "tok_s", "requests", "chunks"}``: tokens
    received (verified), wall time from the first request to the last
    ``[DONE]``, their ratio, and the request and content-chunk counts. With
    `warmup`, one untimed round of `concurrency` short streams opens the
    connections first.
    """
    url, body, one = _stream_call(base_url, model, max_tokens, api)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as client:
        if warmup:
            short = _stream_call(base_url, model, 2, api)[1]
            await asyncio.gather(*(one(client, url, short) for _ in range(concurrency)))

        async def slot() -> tuple[int, int]:
            tokens = chunks = 0
            for _ in range(rounds):
                t, c = await one(client, url, body)
                tokens += t
                chunks += c
            return tokens, chunks

        t0 = time.perf_counter()
        results = await asyncio.gather(*(slot() for _ in range(concurrency)))
        seconds = time.perf_counter() - t0
    tokens = sum(t for t, _ in results)
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tok_s": tokens / seconds,
        "requests": concurrency * rounds,
        "chunks": sum(c for _, c in results),
    }
