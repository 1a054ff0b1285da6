"""Tool calling in the worker: which tools the chat template offers, the
constraint that makes ``required`` and named calls valid, and the engine's
text turned into OpenAI tool-call fragments (``Delta.tool_calls``).

Per request (``plan``), by ``tool_choice``:

* ``"none"``: the tools are not offered (the template never sees them) and
  the text is the reply, as without tools.
* ``"auto"`` (the default when tools are given): the template offers the
  tools and the model's own tool-call format is parsed out of its text by
  the worker's parser (``--tool-call-parser NAME``: one of vLLM's tool
  parsers, ``vllm.tool_parsers``, by the names ``vllm serve`` uses). A
  worker without one refuses ``auto``, as ``vllm serve`` does. Where the
  parser asks for it, as hermes does (its ``<tool_call>`` tags are special
  tokens in Qwen2.5 and Hermes), the engine's text keeps special tokens
  (``Converter.skip_special_tokens``).
* ``"required"`` and a named function: the template offers the tools and
  decoding is constrained (``SamplingParams.structured``, zserve/worker/
  grammar.py) to JSON that is the call itself, so they work with any model
  and any parser or none. ``required`` writes an array of ``{"name",
  "parameters"}`` objects, as vLLM's ``get_json_schema_from_tools`` does
  (at most one without ``parallel_tool_calls``); a named function writes
  its arguments object alone.

The converters are fed the text as it comes and emit fragments as OpenAI
streams them: a call's first fragment has its ``index``, ``id``, ``type``
and ``function.name`` (with ``arguments: ""``), later ones more of
``function.arguments``. What they emit is a function of the text so far,
so a resumed request (``continue_ids``) primes a fresh converter with the
text already delivered and goes on from there; the content that priming
gives is what the earlier attempt's stop strings saw (the worker restores
what they held back from it, not from the raw text). The turn's finish reason
becomes ``tool_calls`` when it stopped with a call made.

vLLM (and torch) are imported only for a parser, in the worker: 8-9 s once.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol

from zserve import protocol as p
from zserve.errors import BadRequest
from zserve.protocol import Delta, SamplingParams


def call_id() -> str:
    """A tool call's id, as OpenAI writes them (``call_`` and 24 characters)."""
    return "call_" + secrets.token_hex(12)


# ------------------------------------------------------------------ parsers


def parser_class(name: str) -> Any:
    """vLLM's tool parser class called ``name`` (``ValueError`` if none is);
    imports vLLM."""
    from vllm.tool_parsers import ToolParserManager

    try:
        return ToolParserManager.get_tool_parser(name)
    except KeyError:
        names = ", ".join(sorted(ToolParserManager.list_registered()))
        raise ValueError(f"no tool-call parser {name!r}; vLLM has: {names}") from None


class _NoTokenizer:
    """What a parser gets from an engine without a tokenizer (null): parsers
    that only read text (hermes, pythonic) do not look at it."""

    def get_vocab(self) -> dict[str, int]:
        return {}


# ------------------------------------------------------------------ the plan


def function_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the tool's ``parameters`` schema (an empty object if none)."""
    return {
        t["function"]["name"]: t["function"].get("parameters")
        or {"type": "object", "properties": {}}
        for t in tools
    }


def required_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of a ``required`` turn: one or more (one unless
    ``parallel``) ``{"name": N, "parameters": P}``, P the tool's schema."""
    one_of = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": params},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for name, params in function_tools(tools).items()
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    if not parallel:
        schema["maxItems"] = 1
    return schema


@dataclasses.dataclass(slots=True)
class ToolPlan:
    """What a request with tools does: the tools its template offers, its
    parameters (constrained for required/named), and how its text becomes
    calls (``mode``: auto, required or named; ``name``: the named tool)."""

    offer: list[dict[str, Any]]
    params: SamplingParams
    mode: str
    name: str = ""
    parser: Any = None  # auto: the parser class

    def converter(self, tokenizer: Any) -> Converter:
        if self.mode == "required":
            return JSONCalls(named=None)
        if self.mode == "named":
            return JSONCalls(named=self.name)
        try:
            return ParserCalls(self.parser, tokenizer or _NoTokenizer(), self.offer)
        except ValueError as e:  # vLLM's request model refused the tools
            raise BadRequest(f"tools: {e}") from None

    async def wrap(self, gen: AsyncIterator[Delta], conv: Converter) -> AsyncIterator[Delta]:
        """The engine's deltas with their text turned into content and tool
        calls by ``conv`` (``converter``; on a resumption, already fed the
        text an earlier attempt delivered)."""
        try:
            async for d in gen:
                text, calls = conv.feed(d.text, d.token_ids or [])
                if d.finish_reason is not None:
                    more_text, more_calls = conv.end()
                    text += more_text
                    if more_calls:
                        calls = (calls or []) + more_calls
                    if conv.called and d.finish_reason == p.FINISH_STOP:
                        d.finish_reason = p.FINISH_TOOL_CALLS
                d.text = text
                d.tool_calls = calls or None
                yield d
        finally:
            await gen.aclose()  # type: ignore[attr-defined]


def plan(params: SamplingParams, parser: Any) -> ToolPlan | None:
    """The plan for a request's tools (None: no tools, or ``tool_choice``
    ``"none"``); ``parser``: the worker's parser class, or None.
    ``BadRequest`` for what cannot be served."""
    tools = params.tools
    choice = params.tool_choice or "auto"
    if not tools or choice == "none":
        return None
    if choice == "auto":
        if parser is None:
            raise BadRequest(
                "tool_choice 'auto' needs a worker started with --tool-call-parser "
                "(tool_choice 'required' or a named function work on any worker)"
            )
        return ToolPlan(tools, params, "auto", parser=parser)
    if getattr(params, "structured", None) is not None:
        raise BadRequest("tool_choice 'required' or a named function cannot be combined "
                         "with response_format or another output constraint")  # fmt: skip
    if choice == "required":
        schema = required_schema(tools, params.parallel_tool_calls)
        mode, name = "required", ""
    else:
        name = choice["function"]["name"]
        schema = function_tools(tools)[name]
        mode = "named"
    try:
        spec = {"type": "json", "value": schema, "whitespace": False, "budget": True}
        params = dataclasses.replace(params, structured=spec)
    except TypeError:  # a protocol without SamplingParams.structured
        raise BadRequest("this worker cannot constrain decoding (tool_choice "
                         f"{mode!r} needs it)") from None  # fmt: skip
    return ToolPlan(tools, params, mode, name)


# ------------------------------------------------------------------ converters


class Converter(Protocol):
    called: bool  # a call was emitted
    # False: the engine's text must keep special tokens, because the format
    # read has tags that are special tokens in some models (hermes'
    # ``<tool_call>`` in Qwen2.5 and Hermes); the token that ends the
    # request is still never text.
    skip_special_tokens: bool

    def feed(self, text: str, ids: list[int]) -> tuple[str, list[dict[str, Any]] | None]:
        """More text (and its token ids): (content to send, call fragments)."""
        ...

    def end(self) -> tuple[str, list[dict[str, Any]] | None]:
        """The generation ended: whatever is left to send."""
        ...


def header(index: int, name: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id(),
        "type": "function",
        "function": {"name": name, "arguments": ""},
    }


def fragment(index: int, arguments: str) -> dict[str, Any]:
    return {"index": index, "function": {"arguments": arguments}}


@dataclasses.dataclass(slots=True)
class _Call:
    name: str | None = None
    args_start: int = -1  # where its arguments begin in the text (-1: not yet)
    args_end: int = -1  # where they end (-1: not yet)
    sent: int = 0  # characters of arguments emitted
    announced: bool = False  # its header is out


class JSONCalls:
    """Calls out of the constrained JSON: ``named``: the text is the named
    tool's arguments; else (``required``) an array of ``{"name",
    "parameters"}`` objects, read by an incremental scanner (strings,
    escapes and nesting), so that each call's arguments are the exact text
    of its ``parameters`` value, streamed as it is written."""

    skip_special_tokens = True

    def __init__(self, named: str | None) -> None:
        self.named = named
        self.text = ""
        self.called = False
        self.calls: list[_Call] = []
        if named is not None:
            self.calls.append(_Call(named, 0))
        # scanner state (required)
        self.pos = 0  # next character of ``text`` to scan
        self.depth = 0  # open containers
        self.in_str = False
        self.esc = False
        self.str_start = -1  # where the string being read began
        self.key: str | None = None  # the call object's key being read or valued
        self.expect = "key"  # in a call object: key | colon | value | next

    def feed(self, text: str, ids: list[int]) -> tuple[str, list[dict[str, Any]] | None]:
        if not text:
            return "", None
        self.text += text
        if self.named is not None:
            call = self.calls[0]
            if call.sent == 0 and not self.text.strip():
                return "", None
            if call.sent == 0:
                call.args_start = len(self.text) - len(self.text.lstrip())
        else:
            self._scan()
        return "", self._emit()

    def end(self) -> tuple[str, list[dict[str, Any]] | None]:
        if self.named is not None:
            # the arguments end with the text; whitespace after them is not theirs
            call = self.calls[0]
            call.args_end = len(self.text.rstrip())
        return "", self._emit()

    def _emit(self) -> list[dict[str, Any]] | None:
        out = []
        for i, c in enumerate(self.calls):
            if not c.announced:
                if c.name is None:
                    break  # calls go out in order
                out.append(header(i, c.name))
                c.announced = self.called = True
            if c.args_start < 0:
                continue
            end = c.args_end if c.args_end >= 0 else len(self.text)
            if self.named is not None and c.args_end < 0:
                end = len(self.text.rstrip())  # trailing whitespace may yet be followed
            new = self.text[c.args_start + c.sent : end]
            if new:
                out.append(fragment(i, new))
                c.sent += len(new)
        return out or None

    def _scan(self) -> None:
        """Scan ``text`` from ``pos``: calls open (``{`` in the array),
        names end, arguments begin and end (at depth 2, the call object)."""
        t = self.text
        i = self.pos
        n = len(t)
        while i < n:
            ch = t[i]
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
                    if self.depth == 2:
                        self._string_at_call(self.str_start, i + 1)
                i += 1
                continue
            if ch == '"':
                self.in_str = True
                self.str_start = i
                if self.depth == 2:
                    self._value_starts(i)
            elif ch in "[{":
                if self.depth == 1 and ch == "{":
                    self.calls.append(_Call())
                    self.key, self.expect = None, "key"
                elif self.depth == 2:
                    self._value_starts(i)
                self.depth += 1
            elif ch in "]}":
                self.depth -= 1
                if self.depth == 2:
                    self._value_ends(i + 1)  # a container value closed
                elif self.depth == 1:
                    self._value_ends(i)  # the call object closed after a scalar
            elif self.depth == 2:
                if ch == ":":
                    self.expect = "value"
                elif ch == ",":
                    self._value_ends(i)
                    self.expect = "key"
                elif not ch.isspace():
                    self._value_starts(i)  # a number, true, false, null
            i += 1
        self.pos = i

    def _value_starts(self, i: int) -> None:
        if self.expect != "value":
            return
        self.expect = "in"
        if self.key == "parameters":
            self.calls[-1].args_start = i

    def _value_ends(self, i: int) -> None:
        if self.expect == "in" and self.key == "parameters":
            call = self.calls[-1]
            if call.args_end < 0:
                call.args_end = i
        if self.expect == "in":
            self.expect = "next"

    def _string_at_call(self, start: int, end: int) -> None:
        """A string at depth 2 ended: a key, or the value of one."""
        try:
            s = json.loads(self.text[start:end])
        except ValueError:
            s = None
        if self.expect == "key":
            self.key, self.expect = s, "colon"
        elif self.expect == "in":
            if self.key == "name" and isinstance(s, str):
                self.calls[-1].name = s
            self._value_ends(end)


class ParserCalls:
    """Calls out of the model's own format, by a vLLM tool parser's
    streaming interface (one parser instance per request: it keeps state).
    The parser adjusts the request as ``vllm serve`` lets it; of that, only
    ``skip_special_tokens`` is taken (hermes and others turn it off, their
    tags being special tokens in some models)."""

    def __init__(self, parser_cls: Any, tokenizer: Any, tools: list[dict[str, Any]]) -> None:
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        request = ChatCompletionRequest(
            model="zserve", messages=[], tools=tools, tool_choice="auto"
        )
        self.parser = parser_cls(tokenizer, tools=request.tools)
        self.request = self.parser.adjust_request(request)
        self.skip_special_tokens = bool(self.request.skip_special_tokens)
        self.text = ""
        self.ids: list[int] = []
        self.called = False
        self.ids_of: dict[int, str] = {}  # call index -> our id

    def feed(self, text: str, ids: list[int]) -> tuple[str, list[dict[str, Any]] | None]:
        if not text and not ids:
            return "", None
        prev_text, prev_ids = self.text, self.ids
        self.text += text
        self.ids = prev_ids + list(ids)
        msg = self.parser.extract_tool_calls_streaming(
            prev_text, self.text, text, prev_ids, self.ids, ids, self.request
        )
        if msg is None:
            return "", None
        return msg.content or "", self._calls(msg.tool_calls) or None

    def end(self) -> tuple[str, list[dict[str, Any]] | None]:
        rest = ""
        if self.called:
            rest = self.parser.get_remaining_unstreamed_args()
        if not rest:
            return "", None
        return "", [fragment(len(self.ids_of) - 1, rest)]

    def _calls(self, deltas: list[Any]) -> list[dict[str, Any]]:
        out = []
        for tc in deltas:
            fn = tc.function
            name = getattr(fn, "name", None)
            args = getattr(fn, "arguments", None)
            if name and tc.index not in self.ids_of:
                h = header(tc.index, name)
                self.ids_of[tc.index] = h["id"]
                if args:
                    h["function"]["arguments"] = args
                out.append(h)
                self.called = True
            elif args:
                out.append(fragment(tc.index, args))
        return out


def template_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates expect it: an assistant's earlier tool
    calls with their ``arguments`` as a dict, not OpenAI's JSON string (as
    vLLM does; a string that is not a JSON object stays as it is)."""
    calls = m.get("tool_calls")
    if not isinstance(calls, list):
        return m
    return {**m, "tool_calls": [_dict_arguments(c) for c in calls]}


def _dict_arguments(call: Any) -> Any:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments"), str):
        return call
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        return call
    if not isinstance(args, dict):
        return call
    return {**call, "function": {**fn, "arguments": args}}
