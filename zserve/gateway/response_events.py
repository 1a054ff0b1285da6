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


def response_json(
    rid: str,
    created: int,
    t: Turn,
    status: str,
    output: bytes,
    usage: dict[str, Any] | None,
    incomplete: dict[str, str] | None = None,
    error: dict[str, str] | None = None,
) -> bytes:
    """The response object, as JSON: ``output`` is its items' JSON already,
    the request's echoed fields are encoded once (``Turn.echo_json``)."""
    if t.echo_json is None:
        t.echo_json = dumps({"model": t.model, **t.echo})[1:-1]
    return b"".join((
        b'{"id":"', rid.encode(), b'","object":"response","created_at":%d,"status":"' % created,
        status.encode(), b'","background":false,"error":', _json(error),
        b',"incomplete_details":', _json(incomplete), b',"output":', output, b",", t.echo_json,
        b',"reasoning":{"effort":null,"summary":null},"service_tier":"default",'
        b'"truncation":"disabled","usage":', _usage_json(usage), b"}",
    ))  # fmt: skip


def _json(v: Any) -> bytes:
    return b"null" if v is None else dumps(v)


def _usage_json(u: dict[str, Any] | None) -> bytes:
    if u is None:
        return b"null"
    return (b'{"input_tokens":%d,"input_tokens_details":{"cached_tokens":%d},"output_tokens":%d,'
            b'"output_tokens_details":{"reasoning_tokens":0},"total_tokens":%d}' % (
                u["input_tokens"], u["input_tokens_details"]["cached_tokens"],
                u["output_tokens"], u["total_tokens"]))  # fmt: skip


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


def _part(text_json: bytes) -> bytes:
    """An output_text content part around its text's JSON."""
    return b'{"type":"output_text","text":' + text_json + b',"annotations":[],"logprobs":[]}'


class Events:
    """One response's server-sent events, numbered as they are written.
    Text deltas come from byte templates (the hot path); the rest is
    JSON. Each output item gets its index when it opens; a message closes
    when anything else begins, calls when the response ends."""

    def __init__(self, rid: str, created: int, t: Turn) -> None:
        self.rid, self.created, self.turn = rid, created, t
        self.seq = 0
        self.n = 0  # output items opened
        # output index -> the finished item, and its JSON
        self.done: dict[int, tuple[dict[str, Any], bytes]] = {}
        self.message: tuple[int, str] | None = None  # the open message: index, id
        self.texts: list[str] = []  # its text so far
        self.calls: dict[int, tuple[int, dict[str, Any]]] = {}  # call index -> open call
        self.finish: str | None = None
        self.usage: dict[str, int] = {}
        self.final_json = b""  # the final response, as its event carries it
        self._delta_head = b""

    @property
    def items(self) -> list[dict[str, Any]]:
        """The finished output items, in order."""
        return [self.done[i][0] for i in sorted(self.done)]

    def _output(self) -> bytes:
        return b"[" + b",".join(self.done[i][1] for i in sorted(self.done)) + b"]"

    def event(self, kind: str, body: dict[str, Any]) -> bytes:
        body = {"type": kind, **body, "sequence_number": self.seq}
        self.seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumps(body) + b"\n\n"

    def _raw(self, kind: bytes, fields: bytes) -> bytes:
        """An event from its fields' JSON (``"k":v,...``), numbered."""
        seq, self.seq = self.seq, self.seq + 1
        return (b"event: " + kind + b'\ndata: {"type":"' + kind + b'",' + fields
                + b',"sequence_number":%d}\n\n' % seq)  # fmt: skip

    def response(self, status: str, usage: Any = None, **kw: Any) -> bytes:
        return response_json(self.rid, self.created, self.turn, status, self._output(), usage, **kw)

    def start(self) -> bytes:
        r = b'"response":' + self.response("in_progress")
        return self._raw(b"response.created", r) + self._raw(b"response.in_progress", r)

    def deltas(self, batch: list[Delta]) -> bytes:
        """The events of deltas read together: their text in one delta event
        (as chat completions make one chunk of them), calls as they come."""
        out: list[bytes] = []
        text: list[str] = []  # text not yet written
        for d in batch:
            if d.text:
                if self.message is None:
                    out.append(self._open_message())
                text.append(d.text)
            if d.tool_calls:
                if text:
                    out.append(self._text_delta("".join(text)))
                    text = []
                for f in d.tool_calls:
                    out.append(self._call_fragment(f))
            if d.finish_reason is not None:
                self.finish = d.finish_reason
                self.usage = d.usage or {}
        if text:
            out.append(self._text_delta(text[0] if len(text) == 1 else "".join(text)))
        return b"".join(out)

    def _text_delta(self, text: str) -> bytes:
        self.texts.append(text)
        seq, self.seq = self.seq, self.seq + 1
        return self._delta_head + _s(text) + b',"logprobs":[],"sequence_number":%d}\n\n' % seq

    def _open_message(self) -> bytes:
        idx, self.n = self.n, self.n + 1
        item_id = new_id("msg_")
        self.message = (idx, item_id)
        self.texts = []
        ref = b'"item_id":"%s","output_index":%d,"content_index":0' % (item_id.encode(), idx)
        self._delta_head = (
            b'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            + ref
            + b',"delta":'
        )
        item = b'{"id":"%s","type":"message","status":"in_progress","role":"assistant",' % (
            item_id.encode()
        )
        return self._raw(
            b"response.output_item.added", b'"output_index":%d,"item":' % idx + item
            + b'"content":[]}'
        ) + self._raw(b"response.content_part.added", ref + b',"part":' + _part(b'""'))  # fmt: skip

    def _close_message(self) -> bytes:
        if self.message is None:
            return b""
        (idx, item_id), self.message = self.message, None
        text = "".join(self.texts)
        status = "incomplete" if self.finish == FINISH_LENGTH else "completed"
        item = message_item(item_id, text, status)
        tj = _s(text)
        part = _part(tj)
        item_json = (
            b'{"id":"%s","type":"message","status":"%s","role":"assistant","content":['
            % (item_id.encode(), status.encode())
            + part
            + b"]}"
        )
        self.done[idx] = (item, item_json)
        ref = b'"item_id":"%s","output_index":%d,"content_index":0' % (item_id.encode(), idx)
        return (
            self._raw(b"response.output_text.done", ref + b',"text":' + tj + b',"logprobs":[]')
            + self._raw(b"response.content_part.done", ref + b',"part":' + part)
            + self._raw(b"response.output_item.done",
                        b'"output_index":%d,"item":' % idx + item_json)
        )  # fmt: skip

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
        self.done[idx] = (item, dumps(item))
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
        usage = usage_of(int(self.usage.get("prompt_tokens", 0)),
                         int(self.usage.get("completion_tokens", 0)))  # fmt: skip
        self.final_json = self.response(status, usage, incomplete=incomplete)
        kind = b"response.completed" if status == "completed" else b"response.incomplete"
        return out + self._raw(kind, b'"response":' + self.final_json)

    def failed(self, err: APIError) -> bytes:
        error = {"code": "server_error" if err.status >= 500 else err.code, "message": err.message}
        self.final_json = self.response("failed", None, error=error)
        return self._raw(b"response.failed", b'"response":' + self.final_json)
