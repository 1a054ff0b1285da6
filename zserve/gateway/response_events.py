"""The Responses API's shapes: output items, the response object, and the
server-sent events of a streamed response (``Events``), each numbered with
its ``sequence_number``, in the order the OpenAI SDK's
``responses.stream()`` consumes them (see ``responses.py``).
"""

from __future__ import annotations

from json.encoder import encode_basestring  # type: ignore[attr-defined]
from typing import TYPE_CHECKING, Any

from zserve.gateway.errors import APIError
from zserve.gateway.schema import Choice, dumps, new_id
from zserve.protocol import FINISH_LENGTH, Delta

if TYPE_CHECKING:
    from zserve.gateway.responses import Turn


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [_text_part(text)],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    fn = call.get("function") or {}
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call.get("id", ""),
        "name": fn.get("name", ""),
        "arguments": fn.get("arguments", ""),
    }


def output_items(c: Choice, status: str) -> list[dict[str, Any]]:
    """A finished choice as output items: its text (if any, or if there
    is nothing else), then its calls."""
    items = []
    if c.text or not c.tool_calls:
        items.append(message_item(new_id("msg_"), c.text, status))
    for call in c.tool_calls or []:
        items.append(call_item(new_id("fc_"), call))
    return items


def status_of(finish: str | None) -> tuple[str, dict[str, str] | None]:
    if finish == FINISH_LENGTH:
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def response_object(
    rid: str,
    created: int,
    t: Turn,
    status: str,
    output: list[dict[str, Any]],
    usage: dict[str, Any] | None,
    incomplete: dict[str, str] | None = None,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": incomplete,
        "model": t.model,
        "output": output,
        **t.echo,
        "reasoning": {"effort": None, "summary": None},
        "service_tier": "default",
        "truncation": "disabled",
        "usage": usage,
    }


def usage_of(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _s(text: str) -> bytes:
    return encode_basestring(text).encode()


class Events:
    """One response's server-sent events, numbered as they are written.
    Text deltas come from byte templates (the hot path); the rest is
    JSON. Each output item gets its index when it opens; a message closes
    when anything else begins, calls when the response ends."""

    def __init__(self, rid: str, created: int, t: Turn) -> None:
        self.rid, self.created, self.turn = rid, created, t
        self.seq = 0
        self.n = 0  # output items opened
        self.done: dict[int, dict[str, Any]] = {}  # output index -> finished item
        self.message: tuple[int, dict[str, Any]] | None = None  # the open message
        self.texts: list[str] = []  # its text so far
        self.calls: dict[int, tuple[int, dict[str, Any]]] = {}  # call index -> open call
        self.finish: str | None = None
        self.usage: dict[str, int] = {}
        self.final: dict[str, Any] = {}
        self._delta_head = b""

    @property
    def items(self) -> list[dict[str, Any]]:
        """The finished output items, in order."""
        return [self.done[i] for i in sorted(self.done)]

    def event(self, kind: str, body: dict[str, Any]) -> bytes:
        body = {"type": kind, **body, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(body) + b"\n\n"

    def response(self, status: str, usage: Any = None, **kw: Any) -> dict[str, Any]:
        return response_object(self.rid, self.created, self.turn, status, self.items, usage, **kw)

    def start(self) -> bytes:
        r = self.response("in_progress")
        return self.event("response.created", {"response": r}) + self.event(
            "response.in_progress", {"response": r}
        )

    def deltas(self, batch: list[Delta]) -> bytes:
        out = []
        for d in batch:
            if d.text:
                if self.message is None:
                    out.append(self._open_message())
                self.texts.append(d.text)
                out.append(
                    self._delta_head + _s(d.text)
                    + b',"logprobs":[],"sequence_number":%d}\n\n' % self.seq
                )  # fmt: skip
                self.seq += 1
            for f in d.tool_calls or ():
                out.append(self._call_fragment(f))
            if d.finish_reason is not None:
                self.finish = d.finish_reason
                self.usage = d.usage or {}
        return b"".join(out)

    def _open_message(self) -> bytes:
        idx, self.n = self.n, self.n + 1
        item = message_item(new_id("msg_"), "", "in_progress")
        item["content"] = []
        self.message = (idx, item)
        self.texts = []
        kind = "response.output_text.delta"
        self._delta_head = (
            f'event: {kind}\ndata: {{"type":"{kind}","item_id":"{item["id"]}",'
            f'"output_index":{idx},"content_index":0,"delta":'
        ).encode()
        return self.event("response.output_item.added", {"output_index": idx, "item": item}) + (
            self.event(
                "response.content_part.added",
                {
                    "item_id": item["id"],
                    "output_index": idx,
                    "content_index": 0,
                    "part": _text_part(""),
                },
            )  # fmt: skip
        )

    def _close_message(self) -> bytes:
        if self.message is None:
            return b""
        (idx, item), self.message = self.message, None
        text = "".join(self.texts)
        part = _text_part(text)
        item = {**item, "status": "completed", "content": [part]}
        self.done[idx] = item
        ref = {"item_id": item["id"], "output_index": idx, "content_index": 0}
        return (
            self.event("response.output_text.done", {**ref, "text": text, "logprobs": []})
            + self.event("response.content_part.done", {**ref, "part": part})
            + self.event("response.output_item.done", {"output_index": idx, "item": item})
        )

    def _call_fragment(self, f: dict[str, Any]) -> bytes:
        out = b""
        fn = f.get("function") or {}
        index = f.get("index", 0)
        open_call = self.calls.get(index)
        if open_call is None or "id" in f:  # a call begins
            out += self._close_message()
            if open_call is not None:  # a new call under an index in use
                out += self._close_call(*self.calls.pop(index))
            idx, self.n = self.n, self.n + 1
            item = call_item(new_id("fc_"), {"id": f.get("id", ""), "function": {
                "name": fn.get("name", ""), "arguments": ""}}, "in_progress")  # fmt: skip
            open_call = self.calls[index] = (idx, item)
            out += self.event("response.output_item.added", {"output_index": idx, "item": item})
        idx, item = open_call
        args = fn.get("arguments")
        if args:
            item["arguments"] += args
            out += self.event(
                "response.function_call_arguments.delta",
                {"item_id": item["id"], "output_index": idx, "delta": args},
            )
        return out

    def _close_call(self, idx: int, item: dict[str, Any]) -> bytes:
        item = {**item, "status": "completed"}
        self.done[idx] = item
        ref = {"item_id": item["id"], "output_index": idx}
        return self.event(
            "response.function_call_arguments.done",
            {**ref, "name": item["name"], "arguments": item["arguments"]},
        ) + self.event("response.output_item.done", {"output_index": idx, "item": item})

    def end(self) -> bytes:
        """Close every open item and say how the response ended."""
        out = self._close_message()
        for index in sorted(self.calls):
            out += self._close_call(*self.calls[index])
        self.calls.clear()
        if not self.done:  # nothing said: one empty message, as the JSON reply has
            out += self._open_message() + self._close_message()
        status, incomplete = status_of(self.finish)
        if status == "incomplete":
            for item in self.done.values():
                if item["type"] == "message":
                    item["status"] = "incomplete"
        usage = usage_of(int(self.usage.get("prompt_tokens", 0)),
                         int(self.usage.get("completion_tokens", 0)))  # fmt: skip
        self.final = self.response(status, usage, incomplete=incomplete)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return out + self.event(kind, {"response": self.final})

    def failed(self, err: APIError) -> bytes:
        error = {"code": "server_error" if err.status >= 500 else err.code, "message": err.message}
        self.final = self.response("failed", None, error=error)
        return self.event("response.failed", {"response": self.final})
