"""OpenAI request parsing and (non-streaming) response bodies.

Requests are plain dicts checked by hand, and the sampling values themselves
are validated once, by ``SamplingParams`` inside the client. Parsing is cheap
on purpose: it sits on the 1-token latency path.

No silent drops: a request field an endpoint does not implement is refused
with a 400 that names it (``param``), except the documented no-ops in
``NOOP_FIELDS`` and a few fields at their neutral value (``NEUTRAL_VALUES``).
A field sent as ``null`` counts as not sent.
"""

from __future__ import annotations

import base64
import json
import random
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from zserve.gateway.errors import APIError
from zserve.protocol import (
    MAX_EMBED_INPUTS,
    MAX_REQUEST_SIZE,
    ParamError,
    check_structured,
    check_tools,
    token_ids,
)

MAX_N = 128  # choices per request (OpenAI's own limit)
MAX_PROMPTS = 2048  # prompts in one completions request
# Inputs of one embeddings request, in characters (each request body the
# client sends is bounded by MAX_REQUEST_SIZE bytes too)
MAX_INPUT_CHARS = MAX_REQUEST_SIZE // 4

# Sampling fields passed through as they are (extensions included).
_PASSTHROUGH = (
    "temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty",
    "frequency_penalty", "seed", "stop", "ignore_eos", "stop_token_ids",
)  # fmt: skip


# The request fields each endpoint implements (OpenAI's, and the extensions
# it reads); every other field is a 400 naming it, but for the two tables below.
_GENERATE_FIELDS = frozenset({
    "model", "n", "stream", "stream_options", "max_tokens", "max_completion_tokens",
    "user", "resume", "logprobs", *_PASSTHROUGH,
    # structured outputs (response_format, and vLLM's fields for clients of vllm serve)
    "response_format", "structured_outputs",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar",
    "structured_whitespace", "structured_budget",
})  # fmt: skip
CHAT_FIELDS = _GENERATE_FIELDS | {
    "messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
}  # fmt: skip
COMPLETION_FIELDS = _GENERATE_FIELDS | {"prompt", "echo"}
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format"})
STREAM_OPTIONS = frozenset({"include_usage"})
MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id"})

# Documented no-ops: accepted with any value, and ignored (docs/api.md lists them).
NOOP_FIELDS: dict[str, str] = {
    "metadata": "nothing is stored, so there is nothing to tag",
    "store": "nothing is stored",
    "service_tier": "there is one tier",
    "safety_identifier": "no abuse monitoring here",
    "prompt_cache_key": "prefix-aware dispatch (cache_aware) keys on the prompt itself",
    "prompt_cache_retention": "prefix caching is the engine's",
    "user": "embeddings: no session to route by (chat and completions use it)",
    "stream_options.include_obfuscation": "no obfuscation padding is added",
    "messages[].annotations": "citations of an earlier reply; not model input",
    "reasoning": "no served model reasons: accepted and ignored (the Responses API's)",
}
# Fields accepted at the value that asks for what zserve does anyway, and a
# 400 at any other value.
NEUTRAL_VALUES: dict[str, Any] = {
    "logit_bias": {},
    "best_of": 1,
    "suffix": "",
    "modalities": ["text"],
    "min_p": 0,
    "min_tokens": 0,
    "skip_special_tokens": True,
    "include_stop_str_in_output": False,
    "add_generation_prompt": True,
    "continue_final_message": False,
    "echo": False,
}
_WHY_REFUSED = {  # a hint for some refused fields
    "suffix": "fill-in-the-middle (suffix) is not supported",
    "functions": "use tools (functions is OpenAI's deprecated form)",
    "function_call": "use tool_choice (function_call is OpenAI's deprecated form)",
}


def check_fields(
    body: dict[str, Any], known: frozenset[str], prefix: str = "", group: str = ""
) -> None:
    """A 400 naming the first field (sorted) that ``known`` lacks, unless it
    is null, a no-op (``NOOP_FIELDS[group + name]``), or at its neutral value;
    ``prefix`` goes before the name in the error (``messages[2].``)."""
    if known.issuperset(body):
        return
    for k in sorted(set(body) - known):
        v = body[k]
        name = prefix + k
        if v is None or (group or prefix) + k in NOOP_FIELDS:
            continue
        if k in NEUTRAL_VALUES:
            n = NEUTRAL_VALUES[k]
            if v == n and (type(v) is bool) == (type(n) is bool):
                continue
        why = _WHY_REFUSED.get(k) or f"{name} is not supported"
        raise _bad(f"{why}; see docs/api.md for the supported fields", name)


# json.dumps with any keyword builds a new encoder per call; this one is built once.
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_rng = random.Random()  # seeded from os.urandom once


def dumps(obj: Any) -> bytes:
    return _encode(obj).encode()


def new_id(prefix: str) -> str:
    """A unique response id (96 random bits, without a system call per id)."""
    return f"{prefix}{_rng.getrandbits(96):024x}"


@dataclass(slots=True)
class GenRequest:
    """A chat or text completion request, as the gateway runs it."""

    model: str
    # One entry per distinct input: a prompt (completions: text, or token
    # ids) or messages (chat).
    prompts: list[Any] = field(default_factory=list)
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    params: dict[str, Any] = field(default_factory=dict)
    logprobs: int | None = None  # top alternatives per token; None = off
    echo: bool = False
    # What ``echo`` repeats, per prompt: its text (a token-id prompt's is
    # filled in by generation.open_streams, from a worker's detokenize).
    echoed: list[str] = field(default_factory=list)
    # The conversation's key for session-affine dispatch: the ``X-Session-ID``
    # header, else OpenAI's ``user`` field.
    session_id: str | None = None

    @property
    def inputs(self) -> int:
        return 1 if self.messages is not None else len(self.prompts)

    @property
    def choices(self) -> int:
        return self.inputs * self.n


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(message, "bad_request", param)


def load_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _bad("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    return body


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model is required (a string)", "model")
    return model


def _int(body: dict[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise _bad(f"{name} must be an integer in [{lo}, {hi}]", name)
    return v


def _common(body: dict[str, Any], req: GenRequest) -> None:
    req.n = _int(body, "n", 1, 1, MAX_N)
    req.stream = bool(body.get("stream") or False)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("stream_options must be an object", "stream_options")
        check_fields(opts, STREAM_OPTIONS, "stream_options.")
        req.include_usage = bool(opts.get("include_usage") or False)
    params = req.params
    mt = body.get("max_completion_tokens")
    if mt is None:
        mt = body.get("max_tokens")
    if mt is not None:
        params["max_tokens"] = mt
    for k in _PASSTHROUGH:
        v = body.get(k)
        if v is not None:
            params[k] = v
    if req.logprobs is not None:
        params["logprobs"] = req.logprobs
    user = body.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _bad("user must be a string", "user")
        req.session_id = user or None
    resume = body.get("resume")  # zserve extension: false = no continuation elsewhere
    if resume is not None:
        if not isinstance(resume, bool):
            raise _bad("resume must be true or false", "resume")
        params["resume"] = resume
    _structured(body, params)


def _content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise _bad(f"message content parts of type {kind!r} are not supported", "messages")
        return "".join(parts)
    raise _bad("message content must be a string or a list of parts", "messages")


def _message_tool_calls(calls: Any, at: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, checked; ``arguments``
    stay as sent (a JSON string; the worker parses it for the template)."""
    if not isinstance(calls, list):
        raise _bad(f"{at} must be a list", at)
    out = []
    for j, c in enumerate(calls):
        here = f"{at}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            shape = "{id, type: 'function', function: {name, arguments}}"
            raise _bad(f"{here} must be {shape}", here)
        args = fn.get("arguments")
        if args is None:
            args = "{}"
        elif not isinstance(args, (str, dict)):
            here += ".function.arguments"
            raise _bad(f"{here} must be a JSON string", here)
        call: dict[str, Any] = {"type": "function", "function": {"name": fn["name"]}}
        call["function"]["arguments"] = args
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def _tools(body: dict[str, Any], params: dict[str, Any]) -> None:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` into ``params``
    (the worker renders and parses; see zserve/worker/tools.py)."""
    tools = body.get("tools") or None
    choice = body.get("tool_choice")
    try:
        check_tools(tools, choice)
    except ParamError as e:
        raise _bad(str(e), e.param) from None
    if tools is not None:
        params["tools"] = tools
    if choice is not None:
        params["tool_choice"] = choice
    ptc = body.get("parallel_tool_calls")
    if ptc is not None:
        if not isinstance(ptc, bool):
            raise _bad("parallel_tool_calls must be true or false", "parallel_tool_calls")
        params["parallel_tool_calls"] = ptc


# vLLM's structured_outputs kinds (and the guided_* fields before them) as
# SamplingParams.structured types.
_SO_KINDS = {"json": "json", "regex": "regex", "choice": "choice", "grammar": "grammar",
             "json_object": "json_object", "structural_tag": "structural_tag"}  # fmt: skip
_SO_OPTIONS = frozenset({*_SO_KINDS, "disable_any_whitespace"})
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # fmt: skip
_checked_schemas: dict[str, None] = {}  # JSON schemas that passed check_schema (bounded)


def _structured(body: dict[str, Any], params: dict[str, Any]) -> None:
    """Structured outputs into ``params["structured"]``: OpenAI's
    ``response_format``, vLLM's ``structured_outputs`` and older ``guided_*``
    fields (one of them), with zserve's ``structured_whitespace`` (default
    false: compact JSON) and ``structured_budget`` (default true: complete
    within max_tokens). A schema or regex that cannot work is a 400 naming
    the field, before anything is dispatched."""
    found: list[tuple[str, dict[str, Any]]] = []  # (field, spec)
    rf = body.get("response_format")
    if rf is not None:
        kind = rf.get("type") if isinstance(rf, dict) else None
        if kind == "json_object":
            found.append(("response_format", {"type": "json_object"}))
        elif kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), (dict, bool)):
                where = "response_format.json_schema"
                raise _bad(f"{where} must be an object {{name, schema, strict}}", where)
            found.append(("response_format.json_schema.schema",
                          {"type": "json", "value": js.get("schema", {})}))  # fmt: skip
        elif kind != "text":
            where = "response_format" if not isinstance(rf, dict) else "response_format.type"
            raise _bad("response_format.type must be text, json_object or json_schema", where)
    so = body.get("structured_outputs")
    whitespace = None
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("structured_outputs must be an object", "structured_outputs")
        check_fields(so, _SO_OPTIONS, "structured_outputs.")
        kinds = [k for k in _SO_KINDS if so.get(k) not in (None, False)]
        if len(kinds) != 1:
            raise _bad("structured_outputs takes exactly one of "
                       + ", ".join(_SO_KINDS), "structured_outputs")  # fmt: skip
        k = kinds[0]
        found.append((f"structured_outputs.{k}", {"type": _SO_KINDS[k], "value": so[k]}))
        daw = so.get("disable_any_whitespace")
        if daw is not None:
            if not isinstance(daw, bool):
                where = "structured_outputs.disable_any_whitespace"
                raise _bad(f"{where} must be true or false", where)
            whitespace = not daw
    for name, kind in _GUIDED.items():
        if body.get(name) is not None:
            found.append((name, {"type": kind, "value": body[name]}))
    for name in ("structured_whitespace", "structured_budget"):
        v = body.get(name)
        if v is not None and not isinstance(v, bool):
            raise _bad(f"{name} must be true or false", name)
    if not found:
        return
    if len(found) > 1:
        raise _bad(f"{found[0][0]} and {found[1][0]} both ask for structured output; "
                   "send one", found[1][0])  # fmt: skip
    where, spec = found[0]
    ws = body.get("structured_whitespace")
    spec["whitespace"] = bool(ws if ws is not None else whitespace)
    spec["budget"] = body.get("structured_budget") is not False
    try:
        spec = check_structured(spec)
    except ParamError as e:
        raise _bad(f"{where}: {str(e).split(': ', 1)[-1]}", where) from None
    if spec["type"] == "json":
        _check_schema(spec["value"], where)
    elif spec["type"] == "regex":
        try:
            re.compile(spec["value"])
        except re.error as e:
            raise _bad(f"{where} is not a valid regex: {e}", where) from None
    params["structured"] = spec


def _check_schema(schema: Any, where: str) -> None:
    """A 400 unless ``schema`` is a valid JSON Schema (its own $schema's
    draft, else 2020-12)."""
    if isinstance(schema, bool):
        return
    key = json.dumps(schema, sort_keys=True)
    if key in _checked_schemas:
        return
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "/".join(str(p) for p in e.path)
        raise _bad(f"{where} is not a valid JSON schema: {e.message}"
                   + (f" (at {at})" if at else ""), where) from None  # fmt: skip
    if len(_checked_schemas) >= 1024:
        _checked_schemas.clear()
    _checked_schemas[key] = None


def parse_chat(body: dict[str, Any]) -> GenRequest:
    req = GenRequest(_model(body))
    check_fields(body, CHAT_FIELDS)
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad("each message must be an object with a role", "messages")
        check_fields(m, MESSAGE_FIELDS, f"messages[{i}].", "messages[].")
        msg = {"role": m["role"], "content": _content(m.get("content"))}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if m.get("tool_calls") is not None:
            msg["tool_calls"] = _message_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
        tcid = m.get("tool_call_id")
        if tcid is not None:
            if not isinstance(tcid, str):
                raise _bad("tool_call_id must be a string", f"messages[{i}].tool_call_id")
            msg["tool_call_id"] = tcid
        out.append(msg)
    req.messages = out
    _tools(body, req.params)
    lp = body.get("logprobs")
    top = body.get("top_logprobs")
    if top is not None and not lp:
        raise _bad("top_logprobs needs logprobs set to true", "top_logprobs")
    if lp:
        req.logprobs = _int(body, "top_logprobs", 0, 0, 20)
    _common(body, req)
    return req


def parse_completion(body: dict[str, Any]) -> GenRequest:
    req = GenRequest(_model(body))
    check_fields(body, COMPLETION_FIELDS)
    req.prompts = _prompts(body.get("prompt"))
    if len(req.prompts) > MAX_PROMPTS:
        raise _bad(f"prompt has {len(req.prompts)} entries; at most {MAX_PROMPTS}", "prompt")
    if body.get("logprobs") is not None:
        req.logprobs = _int(body, "logprobs", 0, 0, 20)
    req.echo = bool(body.get("echo") or False)
    _common(body, req)
    if req.echo:
        req.echoed = [x if isinstance(x, str) else "" for x in req.prompts]
        if req.logprobs is not None or req.params.get("max_tokens") == 0:
            # the prompt's own logprobs (max_tokens 0: the prompt scored, nothing generated)
            req.params["prompt_logprobs"] = req.logprobs or 0
    elif req.params.get("max_tokens") == 0:
        raise _bad("max_tokens may be 0 only with echo (to score the prompt)", "max_tokens")
    return req


def _prompts(prompt: Any) -> list[Any]:
    """``prompt``: a string, a list of strings, token ids (a list of ints),
    or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(x, str) for x in prompt):
            return list(prompt)
        if all(type(x) is int for x in prompt):
            return [_ids(prompt, "prompt")]
        if all(isinstance(x, list) for x in prompt):
            return [_ids(x, f"prompt[{i}]") for i, x in enumerate(prompt)]
    raise _bad("prompt must be a string, a list of strings, a list of token ids or a list "
               "of such lists", "prompt")  # fmt: skip


def _ids(ids: list[Any], where: str) -> list[int]:
    try:
        return token_ids(ids, where)
    except ValueError as e:
        raise _bad(str(e), where) from None


def parse_embedding(body: dict[str, Any]) -> tuple[str, list[str], str]:
    model = _model(body)
    check_fields(body, EMBEDDING_FIELDS)
    inp = body.get("input")
    if isinstance(inp, str):
        texts = [inp]
    elif isinstance(inp, list) and inp and all(isinstance(x, str) for x in inp):
        texts = list(inp)
    else:
        raise _bad("input must be a string or a non-empty list of strings", "input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise _bad(f"input has {len(texts)} entries; at most {MAX_EMBED_INPUTS}", "input")
    if sum(map(len, texts)) > MAX_INPUT_CHARS:
        raise _bad(f"input is longer than {MAX_INPUT_CHARS} characters in all", "input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise _bad("encoding_format must be 'float' or 'base64'", "encoding_format")
    return model, texts, fmt


# ----------------------------------------------------------------- responses


@dataclass(slots=True)
class Choice:
    """One finished (or finishing) choice."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: list[dict[str, Any]] | None = None  # merged fragments (merge_tool_calls)
    prompt_logprobs: list[dict[str, Any]] | None = None  # echo: the prompt's, first None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def total_usage(req: GenRequest, choices: list[Choice]) -> dict[str, int]:
    """Prompt tokens once per distinct input, completion tokens of every choice."""
    n = req.n
    prompt = sum(c.prompt_tokens for c in choices if c.index % n == 0)
    return usage(prompt, sum(c.completion_tokens for c in choices))


def chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    def one(e: dict[str, Any]) -> dict[str, Any]:
        tok = str(e.get("token", ""))
        return {"token": tok, "logprob": e.get("logprob"), "bytes": list(tok.encode())}

    content = []
    for e in entries:
        item = one(e)
        item["top_logprobs"] = [one(t) for t in e.get("top_logprobs") or []]
        content.append(item)
    return {"content": content}


def completion_logprobs(entries: list[dict[str, Any]], offset: int = 0) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        tok = str(e.get("token", ""))
        tokens.append(tok)
        lps.append(e.get("logprob"))
        alts = e.get("top_logprobs")
        tops.append(None if alts is None else {str(t.get("token", "")): t.get("logprob")
                                               for t in alts})  # fmt: skip
        offsets.append(offset)
        offset += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_response(
    rid: str, created: int, req: GenRequest, choices: list[Choice]
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": req.model,
        "choices": [
            {
                "index": c.index,
                "message": chat_message(c),
                "logprobs": chat_logprobs(c.logprobs) if c.logprobs is not None else None,
                "finish_reason": c.finish_reason,
            }
            for c in choices
        ],
        "usage": total_usage(req, choices),
    }


def chat_message(c: Choice) -> dict[str, Any]:
    """The assistant message: its text, and its tool calls if any (the text
    is null when the turn is only calls)."""
    if not c.tool_calls:
        return {"role": "assistant", "content": c.text}
    calls = [
        {
            "id": t.get("id", ""),
            "type": "function",
            "function": {
                "name": (t.get("function") or {}).get("name", ""),
                "arguments": (t.get("function") or {}).get("arguments", ""),
            },
        }
        for t in c.tool_calls
    ]
    return {"role": "assistant", "content": c.text or None, "tool_calls": calls}


def completion_response(
    rid: str, created: int, req: GenRequest, choices: list[Choice]
) -> dict[str, Any]:
    out = []
    for c in choices:
        prefix = req.echoed[c.index // req.n] if req.echo else ""
        lp = None
        if req.echo and req.logprobs is not None:  # the prompt's tokens, then the reply's
            lp = completion_logprobs((c.prompt_logprobs or []) + (c.logprobs or []))
        elif c.logprobs is not None:
            lp = completion_logprobs(c.logprobs, len(prefix))
        out.append(
            {
                "index": c.index,
                "text": prefix + c.text,
                "logprobs": lp,
                "finish_reason": c.finish_reason,
            }
        )
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": req.model,
        "choices": out,
        "usage": total_usage(req, choices),
    }


def embedding_response(
    model: str, vectors: list[list[float]], prompt_tokens: int, fmt: str
) -> dict[str, Any]:
    data = []
    for i, v in enumerate(vectors):
        emb: Any = v
        if fmt == "base64":
            emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
        data.append({"object": "embedding", "embedding": emb, "index": i})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def models_response(
    models: list[str], created: int, lengths: dict[str, int] | None = None
) -> dict[str, Any]:
    """``lengths``: each model's context (``max_model_len``; null if unknown)."""
    lengths = lengths or {}
    return {
        "object": "list",
        "data": [model_card(m, created, lengths.get(m)) for m in models],
    }


def model_card(model: str, created: int, max_model_len: int | None = None) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "zserve",
            "root": model, "parent": None, "max_model_len": max_model_len}  # fmt: skip
