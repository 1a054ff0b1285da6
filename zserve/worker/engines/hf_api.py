"""The ``hf-api`` engine: remote endpoints through ``huggingface_hub`` (the seed's
HuggingfaceApiWorker).

One worker serves every model of a model-info file (JSON)::

    {
      "llama-remote": {
        "model_path": "meta-llama/Llama-3.1-8B-Instruct",  # "model" sent to the remote
        "api_base": "https://router.huggingface.co/v1",    # OpenAI-compatible base URL
        "token": null,               # null: HF_TOKEN / `hf auth login`, HF hosts only
        "context_length": 8192,
        "model_names": ["llama"],    # optional aliases
        "extra_body": {},            # optional, merged into every request body
        "connect_timeout": 10,       # optional, seconds
        "timeout": 300               # optional, seconds of silence while reading
      }
    }

``api_base`` is any OpenAI-compatible server: the Hugging Face router,
Inference Endpoints and TGI (``.../v1``), vLLM's own server, OpenAI. A
``messages`` request goes to ``{api_base}/chat/completions`` through
``AsyncInferenceClient.chat_completion(stream=True)``. A plain ``prompt``
goes to ``{api_base}/completions`` (raw text, no chat template), streamed
through ``huggingface_hub``'s HTTP session: ``text_generation`` speaks TGI's
native protocol only, and wrapping a prompt in a user message would change
what the model sees.

Parameters: temperature, top_p, max_tokens, stop, seed, presence and
frequency penalties and logprobs travel as OpenAI fields; top_k,
repetition_penalty, ignore_eos and stop_token_ids, when not at their
defaults, as extra body fields (vLLM and TGI accept them). Usage comes from
the stream (``stream_options.include_usage``); a server that sends none gets
a local estimate (words in the prompt, chunks of output).

Errors: the remote's HTTP 4xx becomes ``BadRequest`` with the remote's own
message (``ContextOverflow`` when it speaks of the context length, 429 is
``Overloaded``), 5xx and in-stream errors ``EngineError``; an unreachable
endpoint fails within ``connect_timeout``. Cancelling a request closes its
HTTP stream, which is how an OpenAI-compatible server learns to stop.

A token given as null is only ever sent to Hugging Face hosts, so that a
local Hugging Face login never leaks to a third-party endpoint.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlparse

from zserve.errors import BadRequest, EngineError, ZServeError
from zserve.protocol import FINISH_LENGTH, FINISH_STOP, Delta
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.engines.hf_api_wire import (
    chat_logprob,
    completion_logprobs,
    extra_body,
    http_timeout,
    map_error,
    sse_data,
    stream_error,
    usage_of,
)
from zserve.worker.options import EngineOptions

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 300.0
_HF_HOSTS = ("huggingface.co", "hf.co")

# What each chunk source yields: (text, token_ids, finish_reason, logprobs, usage).
_Chunk = tuple[str, list[int] | None, str | None, list[Any] | None, dict[str, int] | None]


@dataclass(eq=False)
class Endpoint:
    """One served model: where it lives and how to call it."""

    name: str  # the served name (the model-info key)
    model_path: str  # the "model" sent to the remote
    api_base: str  # OpenAI-compatible base URL, e.g. http://host:8000/v1
    token: str | None = None
    context_length: int = 0
    aliases: list[str] = field(default_factory=list)
    extra_body: dict[str, Any] = field(default_factory=dict)
    connect_timeout: float = CONNECT_TIMEOUT
    timeout: float = READ_TIMEOUT

    @property
    def hf_host(self) -> bool:
        host = urlparse(self.api_base).hostname or ""
        return any(host == h or host.endswith("." + h) for h in _HF_HOSTS)

    def timeouts(self) -> Any:
        return http_timeout(self.connect_timeout, self.timeout)

    def auth_headers(self) -> dict[str, Any]:
        """Headers that override huggingface_hub's implicit token where it must not go."""
        if self.token is None and not self.hf_host:
            return {"authorization": None}  # huggingface_hub drops None-valued headers
        return {}


# Requests in flight per remote endpoint when --capacity is not given: a
# remote server (TGI, vLLM, the Hugging Face router) queues and batches on its
# own side; this only bounds what one worker keeps open against it.
REMOTE_CONCURRENCY = 32


class HFApiEngine(Engine):
    name = "hf-api"
    takes_tools = False  # the endpoint's own tool calling is not wired up

    def __init__(self, endpoints: list[Endpoint]) -> None:
        super().__init__()
        if not endpoints:
            raise ValueError("hf-api: no models to serve")
        self.endpoints: dict[str, Endpoint] = {}
        for ep in endpoints:
            for n in [ep.name, *ep.aliases]:
                if n in self.endpoints:
                    raise ValueError(f"hf-api: served name {n!r} is used twice")
                self.endpoints[n] = ep
        self.models = list(self.endpoints)
        self.context_length = max(ep.context_length for ep in endpoints)
        self._session: Any = None  # httpx2.AsyncClient for the completions endpoint
        self._closers: dict[str, Callable[[], Awaitable[None]]] = {}

    def default_capacity(self) -> tuple[int, str]:
        n = len({id(ep) for ep in self.endpoints.values()})
        return REMOTE_CONCURRENCY * n, f"{REMOTE_CONCURRENCY} per remote endpoint x {n}"

    @classmethod
    def from_options(cls, opts: EngineOptions) -> HFApiEngine:
        if not opts.model_info_file:
            raise ValueError("the hf-api engine needs --model-info-file")
        endpoints = load_model_info(opts.model_info_file)
        if opts.models:  # --model picks entries of the file
            by_name = {ep.name: ep for ep in endpoints}
            missing = [m for m in opts.models if m not in by_name]
            if missing:
                raise ValueError(f"hf-api: {', '.join(missing)} not in {opts.model_info_file}")
            endpoints = [by_name[m] for m in opts.models]
        if opts.context_length:
            for ep in endpoints:
                ep.context_length = opts.context_length
        return cls(endpoints)

    async def start(self) -> None:
        from huggingface_hub.utils import get_async_session

        self._session = get_async_session()
        for ep in dict.fromkeys(self.endpoints.values()):
            log.info("hf-api: %s -> %s at %s", ep.name, ep.model_path, ep.api_base)

    async def close(self) -> None:
        for closer in list(self._closers.values()):
            await closer()
        session, self._session = self._session, None
        if session is not None:
            await session.aclose()

    async def abort(self, request_id: str) -> None:
        closer = self._closers.pop(request_id, None)
        if closer is not None:
            await closer()

    # ------------------------------------------------------------- generate

    async def generate(self, request: GenerateRequest) -> AsyncIterator[Delta]:
        ep = self.endpoints.get(request.model)
        if ep is None:
            raise BadRequest(f"hf-api does not serve {request.model!r}")
        if request.prompt_ids is not None:
            raise BadRequest("the hf-api engine takes text, not token ids (prompt_ids)")
        p = request.params
        chunks = (
            self._chat_chunks(ep, request)
            if request.messages is not None
            else self._completion_chunks(ep, request)
        )
        pending: Delta | None = None  # the finishing delta, held until usage arrives
        usage: dict[str, int] | None = None
        carried: list[Any] = []  # logprobs of chunks without text (partial characters)
        n_chunks = n_ids = 0
        try:
            async for text, ids, finish, logprobs, chunk_usage in chunks:
                if chunk_usage is not None:
                    usage = chunk_usage
                if pending is not None:
                    continue
                if logprobs:
                    carried.extend(logprobs)
                if not text and not ids and finish is None:
                    continue
                n_chunks += 1 if text or ids else 0
                n_ids += len(ids or [])
                lps, carried = (carried or None), []
                if finish is None:
                    yield Delta(text, ids, None, None, lps)
                elif finish in ("abort", "error"):
                    raise EngineError(f"{ep.api_base} ended the request: {finish}")
                else:
                    finish = FINISH_LENGTH if finish == "length" else FINISH_STOP
                    pending = Delta(text, ids, finish, None, lps)
        except ZServeError:
            raise
        except Exception as e:
            raise map_error(ep.api_base, e) from e
        finally:
            await chunks.aclose()
        if pending is None:
            raise EngineError(f"{ep.api_base} closed the stream before the request finished")
        if usage is None:
            prompt = request.prompt or " ".join(
                str(m.get("content") or "") for m in request.messages or []
            )
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": n_ids or n_chunks,
            }
        if p.logprobs is None:
            pending.logprobs = None
        pending.usage = usage
        yield pending

    async def _chat_chunks(self, ep: Endpoint, request: GenerateRequest) -> AsyncIterator[_Chunk]:
        from huggingface_hub import AsyncInferenceClient

        p = request.params
        client = AsyncInferenceClient(
            base_url=ep.api_base,
            token=ep.token,
            headers=ep.auth_headers(),
            timeout=cast(Any, ep.timeouts()),  # an httpx2.Timeout, not a float
        )
        self._closers[request.request_id] = client.close
        try:
            extra = extra_body(p, ep.extra_body)
            stream = await client.chat_completion(
                cast(Any, request.messages),
                model=ep.model_path,
                stream=True,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                stop=list(p.stop) or None,
                seed=p.seed,
                presence_penalty=p.presence_penalty or None,
                frequency_penalty=p.frequency_penalty or None,
                logprobs=True if p.logprobs is not None else None,
                top_logprobs=p.logprobs,
                stream_options=cast(Any, {"include_usage": True}),
                extra_body=extra or None,
            )
            async for chunk in stream:
                usage = usage_of(chunk.usage)
                if not chunk.choices:
                    if usage is not None:
                        yield "", None, None, None, usage
                    continue
                ch = chunk.choices[0]
                ids = getattr(ch, "token_ids", None)
                lps = None
                if ch.logprobs is not None and ch.logprobs.content:
                    lps = [chat_logprob(e) for e in ch.logprobs.content]
                yield ch.delta.content or "", ids, ch.finish_reason, lps, usage
        finally:
            self._closers.pop(request.request_id, None)
            await client.close()

    async def _completion_chunks(
        self, ep: Endpoint, request: GenerateRequest
    ) -> AsyncIterator[_Chunk]:
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

        if self._session is None:
            raise EngineError("the hf-api engine is not started")
        p = request.params
        body: dict[str, Any] = {
            "model": ep.model_path,
            "prompt": request.prompt or "",
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": p.temperature,
            "top_p": p.top_p,
        }
        for key, value in (
            ("max_tokens", p.max_tokens),
            ("stop", list(p.stop) or None),
            ("seed", p.seed),
            ("presence_penalty", p.presence_penalty or None),
            ("frequency_penalty", p.frequency_penalty or None),
            ("logprobs", p.logprobs),
        ):
            if value is not None:
                body[key] = value
        body.update(extra_body(p, ep.extra_body))
        token: str | bool | None = ep.token if ep.token is not None or ep.hf_host else False
        headers = build_hf_headers(token=token, library_name="zserve")
        url = ep.api_base.rstrip("/") + "/completions"
        # The response is closed by hand, not by ``async with``: a generator closed
        # at a yield inside an async context manager trips contextlib.
        response = await self._session.send(
            self._session.build_request(
                "POST", url, json=body, headers=headers, timeout=ep.timeouts()
            ),
            stream=True,
        )
        self._closers[request.request_id] = response.aclose
        try:
            if response.status_code >= 400:
                await response.aread()
            hf_raise_for_status(response)
            async for line in response.aiter_lines():
                data = sse_data(line)
                if data is None:
                    continue
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error") is not None:
                    raise stream_error(ep.api_base, chunk["error"])
                usage = usage_of(chunk.get("usage"))
                choices = chunk.get("choices") or []
                if not choices:
                    if usage is not None:
                        yield "", None, None, None, usage
                    continue
                ch = choices[0]
                lps = completion_logprobs(ch.get("logprobs"), p.logprobs)
                yield ch.get("text") or "", ch.get("token_ids"), ch.get("finish_reason"), lps, usage
        finally:
            self._closers.pop(request.request_id, None)
            await response.aclose()


# ------------------------------------------------------------------ model info


def load_model_info(path: str | Path) -> list[Endpoint]:
    """Parse a model-info file; a ValueError names what is wrong."""
    try:
        info = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from e
    if not isinstance(info, dict) or not info:
        raise ValueError(f"{path}: expected a non-empty JSON object of served name -> info")
    endpoints = []
    for name, entry in info.items():
        if not isinstance(entry, dict):
            raise ValueError(f"{path}: {name!r} must map to an object")
        api_base = entry.get("api_base")
        if not isinstance(api_base, str) or not api_base.startswith(("http://", "https://")):
            raise ValueError(f"{path}: {name!r} needs an http(s) api_base")
        aliases = entry.get("model_names") or []
        extra_body = entry.get("extra_body") or {}
        if not isinstance(aliases, list) or not all(isinstance(a, str) for a in aliases):
            raise ValueError(f"{path}: {name!r}: model_names must be a list of strings")
        if not isinstance(extra_body, dict):
            raise ValueError(f"{path}: {name!r}: extra_body must be an object")
        endpoints.append(
            Endpoint(
                name=name,
                model_path=str(entry.get("model_path") or name),
                api_base=api_base.rstrip("/"),
                token=entry.get("token") or None,
                context_length=int(entry.get("context_length") or 0),
                aliases=[a for a in aliases if a != name],
                extra_body=extra_body,
                connect_timeout=float(entry.get("connect_timeout") or CONNECT_TIMEOUT),
                timeout=float(entry.get("timeout") or READ_TIMEOUT),
            )
        )
    return endpoints
