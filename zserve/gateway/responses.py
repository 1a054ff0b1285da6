"""OpenAI's Responses API: ``POST /v1/responses`` (streamed or not),
``GET`` and ``DELETE /v1/responses/{id}``.

A second front on the chat path, not a second copy of it: a Responses
request is rewritten into a chat completions body (``input`` items become
messages, ``instructions`` a system message first, ``tools`` and
``text.format`` their chat twins) and runs through ``schema.parse_chat``
and ``generation`` like any chat request: the same sampling checks, tool
calls and structured outputs in the worker, cancel on disconnect and exact
resumption. Only the shapes differ: output items (``message``,
``function_call``) instead of choices, and a stream of typed events, each
with its ``sequence_number``, that the OpenAI SDK's ``responses.stream()``
consumes::

    response.created, response.in_progress,
    per message:  response.output_item.added, response.content_part.added,
                  response.output_text.delta ..., response.output_text.done,
                  response.content_part.done, response.output_item.done
    per call:     response.output_item.added,
                  response.function_call_arguments.delta ...,
                  response.function_call_arguments.done, response.output_item.done
    response.completed | response.incomplete (max_output_tokens reached)
    | response.failed (an error after the stream began)

``store`` (default true) keeps the response, and the conversation up to it,
in the brokers' bounded store (``store.py``): any gateway on those brokers
can then ``GET`` it, ``DELETE`` it or continue it (``previous_response_id``:
its conversation, without its ``instructions``, comes before the new
``input``). An id that is not there (never stored, deleted, evicted) is a
404 that says so, never an empty context.

No silent drops, as on the other endpoints: a field this endpoint does not
implement is a 400 naming it, but for the documented no-ops
(``schema.NOOP_FIELDS``: ``reasoning`` here, since no served model reasons)
and neutral values (``truncation: "disabled"``, ``background: false``, ...).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zserve.gateway import limits, schema
from zserve.gateway.errors import APIError, to_api_error
from zserve.gateway.generation import close_all, complete, first_batches, open_streams
from zserve.gateway.limits import read_body
from zserve.gateway.metrics import Tracker
from zserve.gateway.response_events import (
    Events,
    output_items,
    response_json,
    status_of,
    usage_of,
)
from zserve.gateway.schema import GenRequest, check_fields, dumps, new_id
from zserve.gateway.sse import HEADERS as SSE_HEADERS
from zserve.gateway.sse import ClientGone, DisconnectGuard
from zserve.protocol import Delta

if TYPE_CHECKING:
    from zserve.gateway.app import Gateway, Receive, Scope, Send

_JSON = b"application/json"

log = logging.getLogger(__name__)

# Sampling extensions taken as on chat completions (vLLM's Responses takes them too).
_EXTENSIONS = ("top_k", "repetition_penalty", "presence_penalty", "frequency_penalty",
               "seed", "stop", "ignore_eos", "stop_token_ids", "resume")  # fmt: skip
RESPONSE_FIELDS = frozenset({
    "model", "input", "instructions", "max_output_tokens", "temperature", "top_p",
    "tools", "tool_choice", "parallel_tool_calls", "text", "store", "previous_response_id",
    "stream", "stream_options", "metadata", "user", *_EXTENSIONS,
})  # fmt: skip
# Neutral values of Responses-only fields: what zserve does anyway.
_NEUTRAL = {"truncation": "disabled", "background": False, "include": [], "top_logprobs": 0}
_ITEM_FIELDS = {
    "message": frozenset({"type", "role", "content", "id", "status"}),
    "function_call": frozenset({"type", "call_id", "name", "arguments", "id", "status"}),
    "function_call_output": frozenset({"type", "call_id", "output", "id", "status"}),
}
_TOOL_FIELDS = frozenset({"type", "name", "description", "parameters", "strict"})
_FORMAT_FIELDS = {
    "text": frozenset({"type"}),
    "json_object": frozenset({"type"}),
    "json_schema": frozenset({"type", "name", "schema", "strict", "description"}),
}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = ("input_text", "output_text", "text")
MAX_METADATA = 16  # pairs (OpenAI's limit), keys of 64 and values of 512 characters


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(message, "bad_request", param)


def not_found(rid: str, param: str | None = None) -> APIError:
    return APIError(
        f"no stored response {rid!r}: it was never stored (store: false), was deleted, "
        "or was evicted from the brokers' bounded store (zserve broker --store-max-count, "
        "--store-max-bytes)",
        "not_found",
        param,
    )


# ------------------------------------------------------------------ requests


class Turn:
    """One Responses request: the chat body it runs as, and what its
    response echoes back."""

    __slots__ = ("model", "chat", "messages", "context", "instructions", "previous", "store",
                 "stream", "echo", "echo_json", "req")  # fmt: skip

    def __init__(self, body: dict[str, Any]) -> None:
        self.model: str = body["model"]
        self.chat: dict[str, Any] = {}  # the chat completions body (messages last)
        self.messages: list[dict[str, Any]] = []  # this turn's input, as chat messages
        # the conversation up to this turn's input, without instructions
        self.context: list[dict[str, Any]] = []
        self.instructions: str | None = None
        self.previous: str | None = None  # previous_response_id
        self.store = True
        self.stream = False
        self.echo: dict[str, Any] = {}  # request fields the response object repeats
        self.echo_json: bytes | None = None  # them as JSON fields, once encoded
        self.req: GenRequest | None = None


def parse(body: dict[str, Any]) -> Turn:
    """A Responses request, checked; its ``chat`` body still lacks the
    earlier conversation (``previous_response_id``) and the messages."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (a string)", "model")
    known = RESPONSE_FIELDS | {
        k for k, v in _NEUTRAL.items() if k in body and v == body[k] and type(v) is type(body[k])
    }
    check_fields(body, known)
    t = Turn(body)
    chat = t.chat
    chat["model"] = model
    inp = body.get("input")
    if inp is None:
        raise _bad("input is required (a string or a list of input items)", "input")
    t.messages = input_messages(inp)
    ins = body.get("instructions")
    if ins is not None and not isinstance(ins, str):
        raise _bad("instructions must be a string", "instructions")
    t.instructions = ins or None
    prev = body.get("previous_response_id")
    if prev is not None and (not isinstance(prev, str) or not prev):
        raise _bad("previous_response_id must be a response id", "previous_response_id")
    t.previous = prev
    for name in ("store", "stream"):
        v = body.get(name)
        if v is not None and not isinstance(v, bool):
            raise _bad(f"{name} must be true or false", name)
    t.store = body.get("store") is not False
    t.stream = bool(body.get("stream"))
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options must be an object", "stream_options")
        check_fields(opts, frozenset(), "stream_options.")
    mt = body.get("max_output_tokens")
    if mt is not None:
        chat["max_tokens"] = mt
    for k in ("temperature", "top_p", "user", "parallel_tool_calls", *_EXTENSIONS):
        if body.get(k) is not None:
            chat[k] = body[k]
    tools = body.get("tools")
    if tools is not None:
        chat["tools"] = chat_tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        chat["tool_choice"] = chat_tool_choice(choice)
    text = body.get("text")
    fmt: dict[str, Any] = {"type": "text"}
    if text is not None:
        if not isinstance(text, dict):
            raise _bad("text must be an object {format}", "text")
        check_fields(text, frozenset({"format"}), "text.")
        if text.get("format") is not None:
            fmt = text["format"]
            chat["response_format"] = response_format(fmt)
    t.echo = {
        "instructions": t.instructions,
        "max_output_tokens": mt,
        "metadata": _metadata(body.get("metadata")),
        "parallel_tool_calls": body.get("parallel_tool_calls") is not False,
        "previous_response_id": prev,
        "store": t.store,
        "temperature": body.get("temperature", 1.0),
        "text": {"format": fmt},
        "tool_choice": choice if choice is not None else ("auto" if tools else "none"),
        "tools": tools or [],
        "top_p": body.get("top_p", 1.0),
        "user": body.get("user"),
    }
    return t


def prepare(t: Turn, earlier: list[dict[str, Any]]) -> GenRequest:
    """The chat request of ``t``, after the ``earlier`` conversation (a
    stored response's), with errors named by the Responses fields."""
    msgs = [{"role": "system", "content": t.instructions}] if t.instructions else []
    t.context = earlier + t.messages
    t.chat["messages"] = msgs + t.context
    with renamed():
        t.req = schema.parse_chat(t.chat)
    t.req.stream = t.stream
    return t.req


class renamed:
    """``with renamed():`` an error about a chat field names the Responses
    field it came from."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: Any, e: Any, tb: Any) -> None:
        if e is None or not isinstance(e, Exception):
            return
        err = to_api_error(e)
        param = _responses_param(err.param)
        msg = err.message
        if err.param == "max_tokens" or msg.startswith("max_tokens"):
            msg = msg.replace("max_tokens", "max_output_tokens")
            param = "max_output_tokens"
        if param == err.param and msg == err.message:
            if err is e:
                return
            raise err from None
        raise APIError(msg, err.code, param) from None


def _responses_param(param: str | None) -> str | None:
    if param is None:
        return None
    m = re.fullmatch(r"tools\[(\d+)\]\.function(\..*)?", param)
    if m:
        return f"tools[{m.group(1)}]{m.group(2) or ''}"
    if param.startswith("response_format"):
        return "text.format"
    if param.startswith("messages"):
        return "input"
    return param


def input_messages(inp: Any) -> list[dict[str, Any]]:
    """``input`` (a string, or message, function_call and
    function_call_output items) as chat messages; consecutive calls join
    one assistant message, as chat templates expect them."""
    if isinstance(inp, str):
        return [{"role": "user", "content": inp}]
    if not isinstance(inp, list) or not inp:
        raise _bad("input must be a string or a non-empty list of input items", "input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(inp):
        at = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{at} must be an object", at)
        kind = item.get("type", "message")
        fields = _ITEM_FIELDS.get(kind) if isinstance(kind, str) else None
        if fields is None:
            raise _bad(f"input items of type {kind!r} are not supported "
                       "(message, function_call, function_call_output)", f"{at}.type")  # fmt: skip
        check_fields(item, fields, f"{at}.", "input[].")
        if kind == "message":
            role = _ROLES.get(item.get("role"))  # type: ignore[arg-type]
            if role is None:
                raise _bad(f"{at}.role must be user, assistant, system or developer", f"{at}.role")
            out.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if not isinstance(item.get(name), str):
                    raise _bad(f"{at}.{name} must be a string", f"{at}.{name}")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        else:
            if not isinstance(item.get("call_id"), str):
                raise _bad(f"{at}.call_id must be a string", f"{at}.call_id")
            content = _text(item.get("output"), f"{at}.output")
            out.append({"role": "tool", "tool_call_id": item["call_id"], "content": content})
    return out


def _text(content: Any, at: str) -> str:
    """A message's content (a string, or text parts) as one string."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"{at} must be a string or a list of text parts", at)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS or not isinstance(part.get("text"), str):  # type: ignore[union-attr]
            shown = kind if kind is not None else type(part).__name__
            raise _bad(f"content parts of type {shown!r} are not supported (input_text, "
                       "output_text)", f"{at}[{j}]")  # fmt: skip
        parts.append(part["text"])  # type: ignore[index]
    return "".join(parts)


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    """Responses function tools ({type, name, description, parameters,
    strict}) as chat tools ({type, function: {...}})."""
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise _bad(f"tools of type {kind!r} are not supported (function)", f"{at}.type")
        check_fields(tool, _TOOL_FIELDS, f"{at}.")
        fn = {k: tool[k] for k in ("name", "description", "parameters", "strict")
              if tool.get(k) is not None}  # fmt: skip
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        check_fields(choice, frozenset({"type", "name"}), "tool_choice.")
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise _bad("tool_choice must be none, auto, required or {type: function, name}",
               "tool_choice")  # fmt: skip


def response_format(fmt: Any) -> dict[str, Any]:
    """``text.format`` as a chat ``response_format``."""
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    fields = _FORMAT_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise _bad("text.format.type must be text, json_object or json_schema",
                   "text.format.type")  # fmt: skip
    check_fields(fmt, fields, "text.format.")
    if kind != "json_schema":
        return {"type": kind}
    js = {k: fmt[k] for k in ("name", "schema", "strict") if fmt.get(k) is not None}
    if not isinstance(js.get("schema"), (dict, bool)):
        raise _bad("text.format.schema must be a JSON schema (an object)", "text.format.schema")
    return {"type": "json_schema", "json_schema": js}


def _metadata(md: Any) -> dict[str, str]:
    if md is None:
        return {}
    if (
        not isinstance(md, dict)
        or len(md) > MAX_METADATA
        or not all(isinstance(k, str) and len(k) <= 64 for k in md)
        or not all(isinstance(v, str) and len(v) <= 512 for v in md.values())
    ):
        raise _bad(f"metadata must map at most {MAX_METADATA} keys (64 characters) to strings "
                   "(512 characters)", "metadata")  # fmt: skip
    return dict(md)


def context_after(messages: list[dict[str, Any]], output: list[dict[str, Any]]) -> list[Any]:
    """The conversation a continuation starts from: ``messages`` (without
    instructions) and the response's own output as chat messages."""
    out = list(messages)
    reply: dict[str, Any] | None = None
    for item in output:
        if item["type"] == "message":
            reply = {"role": "assistant", "content": "".join(p["text"] for p in item["content"])}
            out.append(reply)
        elif item["type"] == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}  # fmt: skip
            if reply is None:
                reply = {"role": "assistant", "content": ""}
                out.append(reply)
            reply.setdefault("tool_calls", []).append(call)
    return out


def stored_blob(response: bytes, context: list[Any]) -> bytes:
    """What the store keeps: the response (its JSON, as sent) and the
    conversation a continuation starts from."""
    return b'{"response":' + response + b',"context":' + dumps(context) + b"}"


# ------------------------------------------------------------------ handlers


async def send_json(
    send: Send, body: bytes, status: int = 200, more: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body)), *(more or ())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def session_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-session-id" and value:
            return value.decode("latin-1")
    return None


async def create(gw: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    """``POST /v1/responses``."""
    streams: list[Any] = []
    try:
        headers = scope["headers"]
        gw.check_key(headers)
        limits.check_length(headers)
        body = await limits.load_json(await read_body(receive))
        t = parse(body)
        earlier: list[Any] = []
        if t.previous is not None:
            raw = await gw.store.get(t.previous)
            if raw is None:
                raise not_found(t.previous, "previous_response_id")
            earlier = json.loads(raw)["context"]
        req = prepare(t, earlier)
        limits.check_numbers(req.params)
        sid = session_header(headers)
        if sid is not None:
            req.session_id = sid
        with renamed():
            streams = await open_streams(gw.client, req, gw.tenant_of(scope))
    except ClientGone:
        return
    except Exception as e:
        await gw.send_fail(send, e)
        return
    tracker = Tracker(gw.metrics, req.model, "responses", 1)
    rid = new_id("resp_")
    created = int(time.time())
    started = False
    try:
        async with DisconnectGuard(receive, gw.loop):
            if not t.stream:
                with renamed():
                    (c,) = await complete(streams, req, tracker)
                status, incomplete = status_of(c.finish_reason)
                usage = usage_of(c.prompt_tokens, c.completion_tokens)
                out = output_items(c, status)
                reply = response_json(rid, created, t, status, dumps(out), usage, incomplete)
                tracker.done(c.prompt_tokens, c.completion_tokens)
                if t.store:
                    gw.store.put(rid, stored_blob(reply, context_after(t.context, out)))
                started = True
                await send_json(send, reply)
                return
            with renamed():
                firsts = await first_batches(streams, tracker)
            ev = Events(rid, created, t)
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            await _stream(gw, t, streams[0], firsts[0], ev, tracker, send)
    except ClientGone:
        tracker.failed("client_gone", 499)
    except Exception as e:
        if started:
            raise
        err = gw._error(e)
        tracker.failed(err.code, err.status)
        await send_json(send, err.body(), err.status, err.headers)
    finally:
        await close_all(streams)
        tracker.failed("client_gone", 499)  # a no-op once done or failed


async def _stream(
    gw: Gateway,
    t: Turn,
    stream: Any,
    first: list[Delta],
    ev: Events,
    tracker: Tracker,
    send: Send,
) -> None:
    body = {"type": "http.response.body", "body": b"", "more_body": True}
    out = ev.start() + ev.deltas(first)
    try:
        while ev.finish is None:
            await send({**body, "body": out})
            batch = await stream.next_batch()
            if not batch:
                break
            tracker.batch(0)
            out = ev.deltas(batch)
        out += ev.end()
        u = ev.usage
        tracker.done(int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0)))
    except ClientGone:
        raise
    except Exception as e:
        err = to_api_error(e)
        tracker.failed(err.code, err.status)
        out += ev.failed(err)
    if t.store:
        gw.store.put(ev.rid, stored_blob(ev.final_json, context_after(t.context, ev.items)))
    await send({**body, "body": out})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def stored(gw: Gateway, request: Request) -> Response:
    """``GET`` (the response) and ``DELETE /v1/responses/{response_id}``."""
    rid = request.path_params["response_id"]
    try:
        gw.check_key(request.scope["headers"])
        for k in request.query_params:
            raise _bad(f"query parameter {k} is not supported", k)
        if request.method == "DELETE":
            if not await gw.store.delete(rid):
                raise not_found(rid)
            body = {"id": rid, "object": "response.deleted", "deleted": True}
            return Response(dumps(body), media_type="application/json")
        raw = await gw.store.get(rid)
        if raw is None:
            raise not_found(rid)
    except Exception as e:
        return gw.fail(e)
    out = json.loads(raw)["response"]
    return Response(dumps(out), media_type="application/json")


def handler(gw: Gateway) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The ``POST /v1/responses`` handler of ``gw`` (plain ASGI)."""

    async def post(scope: Scope, receive: Receive, send: Send) -> None:
        await create(gw, scope, receive, send)

    return post


def routes(gw: Gateway) -> list[Route]:
    """The GET and DELETE routes of ``gw``."""

    async def one(request: Request) -> Response:
        return await stored(gw, request)

    return [Route("/v1/responses/{response_id}", one, methods=["GET", "DELETE"])]
