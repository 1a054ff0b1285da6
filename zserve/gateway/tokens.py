"""vLLM's token endpoints and the server's version: ``POST /tokenize``,
``POST /detokenize``, ``GET /version``; and each model's ``max_model_len``
for ``/v1/models``.

No tokenizer in the gateway: tokenize and detokenize are requests of their
own kinds (``protocol.KIND_TOKENIZE``, ``KIND_DETOKENIZE``) that the broker
dispatches to a worker serving the model, which answers with its own
tokenizer and chat template, exactly as it tokenizes a generation.

Bodies as ``vllm serve`` takes them: ``{model, prompt, add_special_tokens
(default true), return_token_strs}`` or ``{model, messages,
add_generation_prompt (default true), add_special_tokens (default false),
tools, return_token_strs}`` give ``{count, max_model_len, tokens,
token_strs}``; ``{model, tokens}`` gives ``{prompt}``. ``model`` may be left
out while the brokers serve one model only.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response

import zserve
from zserve.gateway import limits, schema
from zserve.gateway.errors import APIError
from zserve.gateway.limits import read_body
from zserve.gateway.schema import check_fields, dumps
from zserve.gateway.sse import ClientGone, DisconnectGuard

if TYPE_CHECKING:
    from zserve.gateway.app import Gateway, Receive, Scope, Send

_JSON = b"application/json"
TOKENIZE_FIELDS = frozenset({"model", "prompt", "messages", "add_special_tokens",
                             "add_generation_prompt", "return_token_strs", "tools"})  # fmt: skip
DETOKENIZE_FIELDS = frozenset({"model", "tokens"})


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(message, "bad_request", param)


async def _send_json(send: Send, body: bytes, status: int = 200) -> None:
    headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _model(gw: Gateway, body: dict[str, Any]) -> str:
    """The request's model; the only one served when it names none."""
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str) or not model:
            raise _bad("model must be a model name", "model")
        return model
    names = await gw._query("models")
    if len(names) != 1:
        raise _bad("model is required (the brokers serve several models)", "model")
    return str(names[0])


def _flag(body: dict[str, Any], name: str) -> bool | None:
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise _bad(f"{name} must be true or false", name)
    return v


async def tokenize(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /tokenize``."""
    try:
        gw.check_key(scope["headers"])
        limits.check_length(scope["headers"])
        body = await limits.load_json(await read_body(receive))
        check_fields(body, TOKENIZE_FIELDS)
        model = await _model(gw, body)
        options: dict[str, Any] = {}
        for name in ("add_special_tokens", "add_generation_prompt", "return_token_strs"):
            v = _flag(body, name)
            if v is not None:
                options[name] = v
        prompt, messages = body.get("prompt"), body.get("messages")
        if (prompt is None) == (messages is None):
            raise _bad("give prompt or messages", "prompt")
        if messages is not None:  # checked and made plain as chat completions take them
            chat = schema.parse_chat({"model": model, "messages": messages,
                                      "tools": body.get("tools")})  # fmt: skip
            messages = chat.messages
            if chat.params.get("tools"):
                options["tools"] = chat.params["tools"]
        elif not isinstance(prompt, str):
            raise _bad("prompt must be a string", "prompt")
        elif body.get("tools") is not None:
            raise _bad("tools go with messages", "tools")
        async with DisconnectGuard(receive, gw.loop):
            out = await gw.client.tokenize(
                model, prompt, messages=messages, tenant=gw.tenant_of(scope), **options
            )
    except ClientGone:
        return
    except Exception as e:
        await gw.send_fail(send, e)
        return
    out.setdefault("token_strs", None)
    await _send_json(send, dumps(out))


async def detokenize(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /detokenize``."""
    try:
        gw.check_key(scope["headers"])
        limits.check_length(scope["headers"])
        body = await limits.load_json(await read_body(receive))
        check_fields(body, DETOKENIZE_FIELDS)
        model = await _model(gw, body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(type(t) is int and t >= 0 for t in tokens):
            raise _bad("tokens must be a list of token ids", "tokens")
        async with DisconnectGuard(receive, gw.loop):
            text = await gw.client.detokenize(model, tokens, gw.tenant_of(scope)) if tokens else ""
    except ClientGone:
        return
    except Exception as e:
        await gw.send_fail(send, e)
        return
    await _send_json(send, dumps({"prompt": text}))


async def version(request: Request) -> Response:
    """``GET /version``: zserve's (open, as on ``vllm serve``)."""
    return Response(dumps({"version": zserve.__version__}), media_type="application/json")


async def context_lengths(gw: Gateway) -> dict[str, int]:
    """model -> the context of the workers that serve it (the smallest, where
    they differ: a request must fit wherever it lands); {} when the broker
    does not say."""
    try:
        st = await asyncio.wait_for(gw.client.status(), 2.0)
    except Exception:  # noqa: BLE001 - the names still answer without it
        return {}
    out: dict[str, int] = {}
    for w in st.get("workers", []):
        ctx = int(w.get("context_length") or 0)
        for m in w.get("models", []):
            if ctx and (m not in out or ctx < out[m]):
                out[m] = ctx
    return out


def handlers(gw: Gateway) -> dict[str, Any]:
    """The POST handlers of ``gw`` (plain ASGI), by path."""

    async def tok(scope: Scope, receive: Receive, send: Send) -> None:
        await tokenize(gw, scope, receive, send)

    async def detok(scope: Scope, receive: Receive, send: Send) -> None:
        await detokenize(gw, scope, receive, send)

    return {"/tokenize": tok, "/detokenize": detok}
