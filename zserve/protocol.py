"""The zserve wire protocol: every frame, command code and default timing.

This module is the single source of truth; ``docs/protocol.md`` is its prose.

Two sub-protocols share one broker:

* **ZSC** (client <-> broker frontend).  The client is a DEALER, the broker a
  ROUTER, so the broker sees the client's routing id as frame 0.
* **ZSW** (worker <-> broker backend).  The worker is a DEALER, the broker a
  ROUTER, so the broker sees the worker's routing id as frame 0.

The first frame of every message (after the routing id a ROUTER adds) is the
version tag, the second a one-byte command.  Routing headers (request ids,
model names, client ids) are plain frames the broker reads without decoding
msgpack; request bodies and token payloads are msgpack and pass through the
broker untouched.

Token payloads are a msgpack array of *delta records*::

    [request_id: bin, text: str, token_ids: [int] | nil, finish_reason: str | nil,
     extra: map | nil]

``extra`` carries what is rare: ``usage`` ({prompt_tokens, completion_tokens}),
``error`` ({code, message}), ``logprobs`` (list), ``embeddings`` (list of
vectors), ``result`` (a service query's answer).  Every request gets zero or
more partial records and exactly one final record (``finish_reason`` set;
``"error"`` with ``extra.error`` on failure).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack

# --------------------------------------------------------------------------
# Version tags (frame 0 after routing id)
CLIENT = b"ZSC1"
WORKER = b"ZSW1"
# Broker to broker: usage reports for limits held across the set (broker/peers.py).
PEER = b"ZSB1"  # [ZSB1, broker_id, report]

# --------------------------------------------------------------------------
# Command codes (frame 1), one byte each.
# client -> broker
C_REQUEST = b"\x01"  # [ZSC1, REQUEST, request_id, model, body, heartbeat_ms?, routing?, tenant?]
# routing (optional; only after heartbeat_ms): the keys cache_aware dispatch
# reads, binary so that the broker never decodes msgpack (see encode_routing).
# tenant (optional; only after routing, which may then be empty): the tenant a
# gateway names on behalf of the API key it checked (UTF-8, at most
# MAX_TENANT_NAME bytes). A broker with tenants honours it only from a client
# whose CURVE key its tenants file lists as a trusted gateway; from anyone
# else it is ignored, and the tenant is the one the client's own key names.
MAX_TENANT_NAME = 64
# A request over its tenant's limits ends at once with a RATE_LIMITED error
# record whose error map also holds ``retry_after`` (seconds, float), and
# ``limit`` (which: max_inflight, requests_per_minute, tokens_per_minute),
# ``limit_value`` and ``remaining`` (what was left of it).
RATE_LIMITED = "rate_limited"
C_CANCEL = b"\x02"  # [ZSC1, CANCEL, request_id]
C_HEARTBEAT = b"\x03"  # [ZSC1, HEARTBEAT, heartbeat_ms?, quiet_request_ids?]
C_DISCONNECT = b"\x04"  # [ZSC1, DISCONNECT]
C_QUERY = b"\x05"  # [ZSC1, QUERY, request_id, service, args...]  (args: store services)
# broker -> client
C_TOKENS = b"\x06"  # [ZSC1, TOKENS, payload]
C_GOODBYE = b"\x07"  # [ZSC1, GOODBYE]
# A broker that stops on purpose (SIGTERM, SIGINT) sends GOODBYE to every
# client it holds requests for, and DISCONNECT to every worker, before it
# closes: it answers nothing more. A client takes that broker for gone at
# once (no liveness wait): every stream it sent there goes again through
# another live broker from what it received (a continuation after its ids,
# or the request as sent if nothing came), or, with none live, ends with
# ``broker_unreachable``. New requests go elsewhere until the broker answers
# a probe again.
# (HEARTBEAT is also sent broker -> client while the client has requests in flight:
# every broker interval, and in answer to each client HEARTBEAT)
# A client HEARTBEAT may list (msgpack array of bin) the ids of its requests
# in flight that have been quiet for a while; the broker answers each one it
# does not hold (it restarted, or never got it) with a ``broker_unreachable``
# final record, so such a stream ends instead of waiting out its timeout
# (a resumable stream continues instead: resent from the ids it received).
# A client silent past its expiry has its requests cancelled on the workers
# and each ended with a ``client_expired`` final record (CLIENT_EXPIRED),
# never ``cancelled``: it did not ask for it.
CLIENT_EXPIRED = "client_expired"

# worker -> broker
W_READY = b"\x01"  # [ZSW1, READY, info]
W_HEARTBEAT = b"\x02"  # [ZSW1, HEARTBEAT, state]   (broker -> worker: [ZSW1, HEARTBEAT])
# state: {queue_length: requests the worker runs, from every broker,
#         peak_queue_length: the most it has run at once since it started,
#         draining: it is draining (W_DRAIN; absent: false),
#         handed_over: streams it handed over at a drain deadline so far}
W_TOKENS = b"\x03"  # [ZSW1, TOKENS, client_id, header, payload]
W_DISCONNECT = b"\x04"  # [ZSW1, DISCONNECT]      (both ways)
W_REFUSE = b"\x07"  # [ZSW1, REFUSE, client_id, request_id]
# A worker on several brokers refuses a REQUEST that would take it past its
# capacity, before starting it; the broker dispatches it elsewhere (or queues
# it, ahead of newer requests, not as a retry) and sends that worker nothing
# more until its next HEARTBEAT.
# broker -> worker
W_REQUEST = b"\x05"  # [ZSW1, REQUEST, client_id, request_id, model, body]
W_CANCEL = b"\x06"  # [ZSW1, CANCEL, client_id, request_id]
# both ways
W_DRAIN = b"\x08"  # [ZSW1, DRAIN]
# Worker -> broker: the worker is draining (it was told to stop): dispatch
# nothing more to it; what it runs goes on. It REFUSEs any REQUEST that
# crosses this on the wire, ends each stream still running at its drain
# deadline with a HANDOVER error record (or REFUSEs it where nothing was sent
# yet), sends a last HEARTBEAT and DISCONNECT, and exits. Its HEARTBEAT state
# says ``draining`` too (a broker that missed DRAIN learns it there).
# Broker -> worker: drain (an operator asked, QUERY ``drain``).
# A stream a draining worker hands over at its deadline ends with a
# ``worker_lost`` error record whose error map holds ``handover: true``: the
# client continues it elsewhere from what it received, as after a worker's
# death, but it is not a failure (no resume is counted or spent).
HANDOVER = "handover"
# Default seconds a draining worker lets its streams run before handing
# them over (``zserve worker --drain-timeout``), and a draining gateway
# lets its open responses finish (``zserve gateway --drain-timeout``).
DRAIN_TIMEOUT = 30.0

# Service names for C_QUERY.
SERVICE_MODELS = b"models"
SERVICE_STATUS = b"status"
# The response store the gateways share through every broker (broker/store.py),
# a bounded map of opaque values: put [key, value] -> true (false: it cannot
# fit), get [key] -> the value or nil, delete [key] -> whether it was there.
# A store QUERY with an empty request id gets no answer: a write that needs
# none (what the gateways send for each stored response).
SERVICE_STORE_PUT = b"store.put"
SERVICE_STORE_GET = b"store.get"
SERVICE_STORE_DELETE = b"store.delete"
STORE_SERVICES = (SERVICE_STORE_PUT, SERVICE_STORE_GET, SERVICE_STORE_DELETE)
MAX_STORE_KEY = 256  # bytes
# drain [worker]: tell a worker (its worker_id, or its routing id at this
# broker, in hex) to drain; -> {"draining": [worker_id, ...]}; an unknown
# worker is a ``bad_request``.
SERVICE_DRAIN = b"drain"
SERVICES = (SERVICE_MODELS, SERVICE_STATUS, *STORE_SERVICES, SERVICE_DRAIN)

# Request kinds (body["kind"]).
KIND_GENERATE = "generate"
KIND_EMBED = "embed"
# A prompt (or messages, through the chat template) as the model's token ids:
# the final record's result is {tokens, count, max_model_len, token_strs?}.
KIND_TOKENIZE = "tokenize"
# Token ids as text: the final record's result is {prompt}.
KIND_DETOKENIZE = "detokenize"
# What a tokenize request may ask besides its prompt or messages.
TOKENIZE_OPTIONS = frozenset(
    {"add_special_tokens", "add_generation_prompt", "tools", "return_token_strs"}
)

# Finish reasons.
FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"
# The turn ended (as ``stop``) with tool calls (``Delta.tool_calls``).
FINISH_TOOL_CALLS = "tool_calls"

# --------------------------------------------------------------------------
# Default timings (float seconds, time.monotonic()) and limits.
HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_LIVENESS = 3
HEARTBEAT_EXPIRY = HEARTBEAT_INTERVAL * HEARTBEAT_LIVENESS
# A client advertises its own heartbeat interval (the optional last frame of
# REQUEST and HEARTBEAT); the broker expires it after
# max(broker interval, client interval) x broker liveness, the client's
# interval capped at this.
MAX_CLIENT_HEARTBEAT_INTERVAL = 60.0
RECONNECT_INITIAL = 1.0
RECONNECT_MAX = 32.0
QUEUE_TIMEOUT = 30.0
MAX_QUEUE = 1024
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
# A worker splits its replies so that no TOKENS payload passes MAX_PAYLOAD
# (records are sealed at RECORD_BUDGET and a message split between records),
# well inside any broker's MAX_MESSAGE_SIZE.
MAX_PAYLOAD = 1024 * 1024
RECORD_BUDGET = 256 * 1024
# What a client may send: a REQUEST body, and the inputs of one embed request.
MAX_REQUEST_SIZE = 8 * 1024 * 1024
MAX_EMBED_INPUTS = 2048
# A REQUEST's request id and model name, in bytes at most; the broker answers
# longer ones with ``bad_request``. Each travels in the request's TOKENS
# headers and records, which must stay far inside MAX_MESSAGE_SIZE.
MAX_REQUEST_ID = 256
MAX_MODEL_NAME = 256
# Quiet request ids listed on one client HEARTBEAT, at most.
MAX_HEARTBEAT_IDS = 4096
MAX_RETRIES = 2
# Sampling limits (SamplingParams.validate). Stop lists are bounded so that
# what a worker does for them per request stays small (OpenAI takes 4 stop
# strings; TGI's default is 4 too).
MAX_STOP_STRINGS = 32
MAX_STOP_LENGTH = 256  # characters in one stop string
MAX_STOP_TOKEN_IDS = 1024
# repetition_penalty: 1 is off; past these the penalised logits overflow (a
# value like 1e-40 turns every probability into NaN).
REPETITION_PENALTY_RANGE = (0.01, 100.0)
# seed: a signed 64-bit integer, as vLLM's OpenAI server takes it.
SEED_RANGE = (-(1 << 63), (1 << 63) - 1)
# max_tokens and top_k at most, and token ids (stop_token_ids) below it + 1:
# a signed 32-bit integer, what every engine's tokenizer and sampler takes.
INT32_MAX = (1 << 31) - 1
FRONTEND_HWM = 10_000

DEFAULT_FRONTEND = "tcp://127.0.0.1:5555"
DEFAULT_BACKEND = "tcp://127.0.0.1:5556"

# An empty TOKENS header (nothing started or finished), pre-encoded.
EMPTY_HEADER = b"\x92\x90\x90"

_packer = msgpack.Packer(use_bin_type=True)
# Exact types only (no tuples, no subclasses): about a third cheaper on token
# payloads, which are plain lists, str, bytes and ints; anything else falls
# back to ``_packer`` (a failed pack leaves the packer's buffer empty).
_strict_packer = msgpack.Packer(use_bin_type=True, strict_types=True)


def pack(obj: Any) -> bytes:
    return _packer.pack(obj)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


# --------------------------------------------------------------------------
# Typed messages.


@dataclass(slots=True)
class WorkerInfo:
    """READY body: what a worker serves."""

    models: list[str]
    capacity: int = 1
    context_length: int = 0
    engine: str = "null"
    speed: float = 1.0
    pid: int = 0
    # The worker's own heartbeat interval (seconds): the broker expires it
    # after max(broker interval, this) x liveness, as it does for clients.
    heartbeat_interval: float = HEARTBEAT_INTERVAL
    # This worker process's instance id (random, the same on every broker
    # and every reconnection): one worker seen through several brokers is
    # one worker. "" from a worker that predates it.
    worker_id: str = ""

    def encode(self) -> bytes:
        return pack(
            {
                "models": self.models,
                "capacity": self.capacity,
                "context_length": self.context_length,
                "engine": self.engine,
                "speed": self.speed,
                "pid": self.pid,
                "heartbeat_ms": max(1, round(self.heartbeat_interval * 1000)),
                "worker_id": self.worker_id,
            }
        )

    @classmethod
    def decode(cls, data: bytes) -> WorkerInfo:
        d = unpack(data)
        if not isinstance(d, dict):
            raise ValueError("READY body is not a map")
        models = d.get("models")
        if not isinstance(models, list) or not models or not all(
            isinstance(m, str) and m for m in models
        ):
            raise ValueError("READY models must be a non-empty list of names")
        capacity = d.get("capacity", 1)
        speed = d.get("speed", 1.0)
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError("READY capacity must be a positive int")
        if not isinstance(speed, (int, float)) or speed <= 0:
            raise ValueError("READY speed must be positive")
        hb_ms = d.get("heartbeat_ms", round(HEARTBEAT_INTERVAL * 1000))
        if isinstance(hb_ms, bool) or not isinstance(hb_ms, int) or hb_ms < 1:
            raise ValueError("READY heartbeat_ms must be a positive int")
        return cls(
            models=models,
            capacity=capacity,
            context_length=int(d.get("context_length") or 0),
            engine=str(d.get("engine", "?")),
            speed=float(speed),
            pid=int(d.get("pid") or 0),
            heartbeat_interval=min(hb_ms / 1000, MAX_CLIENT_HEARTBEAT_INTERVAL),
            worker_id=str(d.get("worker_id") or "")[:64],
        )


def new_client_id() -> bytes:
    """A client's routing id (ZMQ_ROUTING_ID of each of its DEALERs): 16
    random bytes, the first never 0 (ZeroMQ's own ids start with 0). A
    client that reconnects after a TCP reset is the same peer to its broker."""
    return bytes((0x5A,)) + secrets.token_bytes(15)


def new_worker_id() -> str:
    """A worker instance id for READY: 16 hex digits, random."""
    return secrets.token_hex(8)


@dataclass(slots=True)
class SamplingParams:
    """Generation parameters carried in a REQUEST body."""

    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top alternatives; None = off
    # The prompt's own logprobs, with this many top alternatives (None = off);
    # they come on the request's first record (Delta.prompt_logprobs). With
    # them, max_tokens may be 0: the prompt is scored and nothing generated.
    prompt_logprobs: int | None = None
    # Seconds the whole request may take on the worker (None: no limit); past
    # it the worker stops the engine and ends the request with ``timeout``.
    deadline: float | None = None
    # Tool calling (OpenAI's shapes; the worker's zserve/worker/tools.py acts
    # on them): function tools [{type: "function", function: {name,
    # description?, parameters?, strict?}}], tool_choice "none" | "auto"
    # (None: auto) | "required" | {type: "function", function: {name}}, and
    # whether a turn may hold several calls.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    # Structured outputs (zserve/worker/grammar.py constrains decoding to
    # it): {type: "json" | "json_object" | "regex" | "choice" | "grammar" |
    # "structural_tag", value: JSON schema | regex | [choices] | EBNF |
    # structural tag, whitespace: free whitespace in JSON (default False:
    # compact), budget: steer to a complete value within max_tokens
    # (default True)}; see ``check_structured``.
    structured: dict[str, Any] | None = None

    _FIELDS = (
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "ignore_eos",
        "logprobs",
        "prompt_logprobs",
        "deadline",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "structured",
    )

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._FIELDS}

    def encode(self) -> bytes:
        """The ``params`` map of a REQUEST body."""
        return pack(self.to_dict())

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SamplingParams:
        """Validate and build; raises ValueError with a clear message."""
        p = cls()
        for k in cls._FIELDS:
            v = d.get(k)
            if v is not None:
                setattr(p, k, v)
        p.validate()
        return p

    def validate(self) -> None:
        mt = self.max_tokens
        least = 0 if self.prompt_logprobs is not None else 1  # 0: score the prompt only
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < least):
            raise ValueError(
                "max_tokens must be a positive integer (0 only with prompt_logprobs)"
            )
        if mt is not None and mt > INT32_MAX:
            raise ValueError(f"max_tokens must be at most {INT32_MAX}")
        self.temperature = _number(self.temperature, "temperature", 0.0, 2.0)  # as OpenAI
        self.top_p = _number(self.top_p, "top_p", 0.0, 1.0)
        if self.top_p == 0.0:
            raise ValueError("top_p must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise ValueError("top_k must be an integer")
        if self.top_k < 0:
            self.top_k = 0  # -1 (vLLM/OpenAI style) means disabled
        elif self.top_k > INT32_MAX:
            raise ValueError(f"top_k must be at most {INT32_MAX}")
        self.repetition_penalty = _number(
            self.repetition_penalty, "repetition_penalty", *REPETITION_PENALTY_RANGE
        )
        self.presence_penalty = _number(self.presence_penalty, "presence_penalty", -2.0, 2.0)
        self.frequency_penalty = _number(self.frequency_penalty, "frequency_penalty", -2.0, 2.0)
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ValueError("seed must be a signed 64-bit integer")
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise ValueError("stop must be a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings")
        if any(len(s) > MAX_STOP_LENGTH for s in stop):
            raise ValueError(f"each stop string has at most {MAX_STOP_LENGTH} characters")
        self.stop = [s for s in stop if s] if stop else []
        ids = self.stop_token_ids
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise ValueError("stop_token_ids must be a list of integers")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")
        if not all(0 <= t <= INT32_MAX for t in ids):
            raise ValueError(f"stop_token_ids must be token ids in [0, {INT32_MAX}]")
        self.ignore_eos = bool(self.ignore_eos)
        if self.deadline is not None:
            self.deadline = _number(self.deadline, "deadline", 0.0, 86400.0 * 365)
            if self.deadline == 0.0:
                raise ValueError("deadline must be > 0 seconds")
        if self.logprobs is not None:
            if isinstance(self.logprobs, bool):
                self.logprobs = 1 if self.logprobs else None
            elif not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20:
                raise ValueError("logprobs must be an integer in [0, 20]")
        plp = self.prompt_logprobs
        if plp is not None and (isinstance(plp, bool) or not isinstance(plp, int)
                                or not 0 <= plp <= 20):  # fmt: skip
            raise ValueError("prompt_logprobs must be an integer in [0, 20]")
        if self.tools is not None or self.tool_choice is not None:
            check_tools(self.tools, self.tool_choice)
        if not isinstance(self.parallel_tool_calls, bool):
            raise ValueError("parallel_tool_calls must be true or false")
        if self.structured is not None:
            self.structured = check_structured(self.structured)


class ParamError(ValueError):
    """A bad request parameter, with the parameter's name (``tools[0].function``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_tools(tools: Any, tool_choice: Any) -> None:
    """The shape of ``tools`` and ``tool_choice`` (``ParamError`` naming the
    field): function tools with unique names, a choice that names one."""
    if tools is not None:
        if not isinstance(tools, list):
            raise ParamError("tools must be a list of tools", "tools")
        names: set[str] = set()
        for i, t in enumerate(tools):
            at = f"tools[{i}]"
            if not isinstance(t, dict) or t.get("type") != "function":
                raise ParamError(f"{at} must be {{type: 'function', function: {{...}}}}", at)
            fn = t.get("function")
            if not isinstance(fn, dict):
                raise ParamError(f"{at}.function must be an object", f"{at}.function")
            name = fn.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
                raise ParamError(
                    f"{at}.function.name must be 1-64 letters, digits, '_' or '-'",
                    f"{at}.function.name",
                )
            if name in names:
                raise ParamError(f"tool {name!r} is given twice", f"{at}.function.name")
            names.add(name)
            params = fn.get("parameters")
            if params is not None and not isinstance(params, dict):
                raise ParamError(
                    f"{at}.function.parameters must be a JSON schema object",
                    f"{at}.function.parameters",
                )
            desc = fn.get("description")
            if desc is not None and not isinstance(desc, str):
                raise ParamError(
                    f"{at}.function.description must be a string", f"{at}.function.description"
                )
    if tool_choice is None or tool_choice == "none":
        return
    if tool_choice in ("auto", "required") or isinstance(tool_choice, dict):
        if not tools:
            raise ParamError("tool_choice needs tools", "tool_choice")
        if isinstance(tool_choice, str):
            return
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ParamError(
                "tool_choice must be 'none', 'auto', 'required' or "
                "{type: 'function', function: {name}}",
                "tool_choice",
            )
        if not any(t["function"]["name"] == name for t in tools):
            raise ParamError(f"tool_choice names {name!r}, which is not in tools", "tool_choice")
        return
    raise ParamError(
        "tool_choice must be 'none', 'auto', 'required' or {type: 'function', function: {name}}",
        "tool_choice",
    )


_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # as OpenAI's

STRUCTURED_TYPES = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
MAX_CHOICES = 4096  # alternatives of a ``choice``


def check_structured(spec: Any) -> dict[str, Any]:
    """The shape of ``structured`` (``ParamError`` naming ``structured``), as
    a canonical map {type, value, whitespace, budget}. Whether a schema,
    regex or grammar compiles is the worker's check (zserve/worker/grammar.py)."""
    if not isinstance(spec, dict):
        raise ParamError("structured must be a map {type, value, ...}", "structured")
    unknown = set(spec) - {"type", "value", "whitespace", "budget"}
    if unknown:
        raise ParamError(f"structured: unknown key(s) {', '.join(sorted(unknown))}", "structured")
    kind = spec.get("type")
    if kind not in STRUCTURED_TYPES:
        raise ParamError(
            f"structured.type must be one of {', '.join(STRUCTURED_TYPES)}", "structured"
        )
    value = spec.get("value")
    if kind == "json_object":
        value = None
    elif kind in ("json", "structural_tag"):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                msg = f"structured.value: the {kind} is not valid JSON"
                raise ParamError(msg, "structured") from None
        if not isinstance(value, dict) and not (kind == "json" and isinstance(value, bool)):
            raise ParamError(f"structured.value: the {kind} must be a JSON object", "structured")
    elif kind in ("regex", "grammar"):
        if not isinstance(value, str) or not value:
            msg = f"structured.value: the {kind} must be a non-empty string"
            raise ParamError(msg, "structured")
    elif not (  # choice
        isinstance(value, list)
        and 0 < len(value) <= MAX_CHOICES
        and all(isinstance(c, str) and c for c in value)
    ):
        raise ParamError(
            f"structured.value: choice must be 1 to {MAX_CHOICES} non-empty strings", "structured"
        )
    out = {"type": kind, "value": value}
    for flag, default in (("whitespace", False), ("budget", True)):
        v = spec.get(flag, default)
        if not isinstance(v, bool):
            raise ParamError(f"structured.{flag} must be true or false", "structured")
        out[flag] = v
    return out


def choice_seed(seed: int, index: int) -> int:
    """The seed of choice ``index`` of a request for ``n`` choices: ``seed +
    index`` (vLLM's rule), wrapped into ``SEED_RANGE``. Each choice differs,
    and the same seed gives the same choices again."""
    lo, hi = SEED_RANGE
    return (seed + index - lo) % (hi - lo + 1) + lo


def _number(v: Any, name: str, lo: float, hi: float) -> float:
    """``v`` as a float in [lo, hi] (bools refused), or ValueError."""
    if type(v) is not float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{name} must be a number")
        v = float(v)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}]")
    return v


@dataclass(slots=True)
class Request:
    """A decoded REQUEST body, as the worker sees it."""

    kind: str = KIND_GENERATE
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    texts: list[str] | None = None  # embed
    # The prompt as token ids (generate: the worker does not tokenize; the
    # ids to turn into text (detokenize)
    prompt_ids: list[int] | None = None
    options: dict[str, Any] | None = None  # tokenize: TOKENIZE_OPTIONS
    params: SamplingParams = field(default_factory=SamplingParams)
    # Resumption: the token ids the caller already got from an earlier
    # attempt (they count against max_tokens), and how many characters of
    # their text it got (the rest was held back, e.g. by a stop string).
    continue_ids: list[int] | None = None
    continue_chars: int = 0

    def encode(self) -> bytes:
        if self.kind == KIND_EMBED:
            return pack({"kind": self.kind, "texts": self.texts})
        if self.kind == KIND_DETOKENIZE:
            return pack({"kind": self.kind, "prompt_ids": self.prompt_ids})
        if self.kind == KIND_TOKENIZE:
            body = {"kind": self.kind, "options": self.options or {}}
            if self.messages is not None:
                body["messages"] = self.messages
            else:
                body["prompt"] = self.prompt
            return pack(body)
        return encode_generate(
            self.prompt if self.prompt_ids is None else self.prompt_ids,
            self.messages,
            self.params.encode(),
            self.continue_ids,
            self.continue_chars,
        )

    @classmethod
    def decode(cls, data: bytes) -> Request:
        d = unpack(data)
        if not isinstance(d, dict):
            raise ValueError("request body must be a map")
        kind = d.get("kind", KIND_GENERATE)
        if kind == KIND_EMBED:
            texts = d.get("texts")
            if not isinstance(texts, list) or not texts or not all(
                isinstance(t, str) for t in texts
            ):
                raise ValueError("texts must be a non-empty list of strings")
            return cls(kind=kind, texts=texts)
        if kind == KIND_DETOKENIZE:
            return cls(kind=kind, prompt_ids=token_ids(d.get("prompt_ids"), "prompt_ids"))
        if kind not in (KIND_GENERATE, KIND_TOKENIZE):
            raise ValueError(f"unknown request kind {kind!r}")
        prompt = d.get("prompt")
        messages = d.get("messages")
        ids_in = d.get("prompt_ids")
        prompt_ids = token_ids(ids_in, "prompt_ids") if ids_in is not None else None
        if prompt is None and messages is None and prompt_ids is None:
            raise ValueError("one of prompt, prompt_ids or messages is required")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError("prompt must be a string")
        if messages is not None:
            if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages
            ):
                raise ValueError("messages must be a non-empty list of {role, content} maps")
        if kind == KIND_TOKENIZE:
            opts = d.get("options") or {}
            if not isinstance(opts, dict) or not TOKENIZE_OPTIONS.issuperset(opts):
                raise ValueError(f"tokenize options are {', '.join(sorted(TOKENIZE_OPTIONS))}")
            return cls(kind=kind, prompt=prompt, messages=messages, options=opts)
        params = d.get("params") or {}
        if not isinstance(params, dict):
            raise ValueError("params must be a map")
        ids = d.get("continue_ids")
        chars = d.get("continue_chars", 0)
        if ids is not None and (
            not isinstance(ids, list)
            or not all(type(t) is int and t >= 0 for t in ids)
        ):
            raise ValueError("continue_ids must be a list of token ids")
        if type(chars) is not int or chars < 0:
            raise ValueError("continue_chars must be a non-negative integer")
        return cls(
            kind=kind,
            prompt=prompt,
            messages=messages,
            prompt_ids=prompt_ids,
            params=SamplingParams.from_dict(params),
            continue_ids=ids or None,
            continue_chars=chars if ids else 0,
        )


# Pre-encoded pieces of a generate REQUEST body.
_KIND_GENERATE = pack("kind") + pack(KIND_GENERATE)
_KEY_PROMPT = pack("prompt")
_KEY_PROMPT_IDS = pack("prompt_ids")
_KEY_MESSAGES = pack("messages")
_KEY_PARAMS = pack("params")
_KEY_CONTINUE_IDS = pack("continue_ids")
_KEY_CONTINUE_CHARS = pack("continue_chars")


def token_ids(v: Any, name: str) -> list[int]:
    """``v`` as a non-empty list of token ids, or ValueError naming ``name``."""
    if (
        not isinstance(v, list)
        or not v
        or not all(type(t) is int and 0 <= t <= INT32_MAX for t in v)
    ):
        raise ValueError(f"{name} must be a non-empty list of token ids in [0, {INT32_MAX}]")
    return v


def encode_generate(
    prompt: str | list[int] | None,
    messages: list[dict[str, Any]] | None,
    params: bytes,
    continue_ids: list[int] | None = None,
    continue_chars: int = 0,
) -> bytes:
    """A generate REQUEST body ``{kind, prompt? | prompt_ids?, messages?,
    params, continue_ids?, continue_chars?}`` (a ``prompt`` given as a list
    of token ids goes as ``prompt_ids``) around already encoded ``params``
    (``SamplingParams.encode``): a client that sends the same parameters again
    validates and encodes them once. ``continue_ids``: resume after these
    generated ids (see docs/protocol.md, resumption)."""
    n = 2
    out = _KIND_GENERATE
    if prompt is not None:
        n += 1
        out += (_KEY_PROMPT if isinstance(prompt, str) else _KEY_PROMPT_IDS) + pack(prompt)
    if messages is not None:
        n += 1
        out += _KEY_MESSAGES + pack(messages)
    out += _KEY_PARAMS + params
    if continue_ids:
        n += 2
        out += _KEY_CONTINUE_IDS + pack(continue_ids)
        out += _KEY_CONTINUE_CHARS + pack(continue_chars)
    return bytes((0x80 | n,)) + out  # a fixmap of n entries


@dataclass(slots=True)
class Delta:
    """One token delta: what engines yield, what travels, what clients get."""

    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    logprobs: list[Any] | None = None
    error: dict[str, str] | None = None  # {code, message}
    embeddings: list[list[float]] | None = None
    result: Any = None
    # Tool-call fragments, as OpenAI streams them: [{index, id?, type?,
    # function: {name?, arguments?}}]; a call's arguments are the
    # concatenation of its fragments (see ``merge_tool_calls``).
    tool_calls: list[dict[str, Any]] | None = None
    # The prompt's logprobs (SamplingParams.prompt_logprobs), on a request's
    # first record: one entry per prompt token, as ``logprobs`` entries
    # ({token, logprob, top_logprobs}); the first token's logprob is None.
    prompt_logprobs: list[Any] | None = None

    def record(self, request_id: bytes) -> list[Any]:
        extra: dict[str, Any] | None = None
        if (
            self.usage is not None
            or self.logprobs is not None
            or self.error is not None
            or self.embeddings is not None
            or self.result is not None
            or self.tool_calls is not None
            or self.prompt_logprobs is not None
        ):
            extra = {}
            if self.usage is not None:
                extra["usage"] = self.usage
            if self.logprobs is not None:
                extra["logprobs"] = self.logprobs
            if self.error is not None:
                extra["error"] = self.error
            if self.embeddings is not None:
                extra["embeddings"] = self.embeddings
            if self.result is not None:
                extra["result"] = self.result
            if self.tool_calls is not None:
                extra["tool_calls"] = self.tool_calls
            if self.prompt_logprobs is not None:
                extra["prompt_logprobs"] = self.prompt_logprobs
        return [request_id, self.text, self.token_ids, self.finish_reason, extra]

    @classmethod
    def from_record(cls, rec: list[Any]) -> tuple[bytes, Delta]:
        rid, text, token_ids, finish, extra = rec
        if extra is None:
            return rid, cls(text, token_ids, finish)
        return rid, cls(
            text,
            token_ids,
            finish,
            extra.get("usage"),
            extra.get("logprobs"),
            extra.get("error"),
            extra.get("embeddings"),
            extra.get("result"),
            extra.get("tool_calls"),
            extra.get("prompt_logprobs"),
        )


def merge_tool_calls(into: list[dict[str, Any]], more: list[dict[str, Any]]) -> None:
    """Append tool-call fragments ``more`` to ``into``, folding a fragment
    into the last one when both are for the same call (its arguments
    concatenated): what the fragments say is unchanged, only regrouped."""
    for f in more:
        last = into[-1] if into else None
        fn_f = f.get("function") or {}
        if (
            last is not None
            and last.get("index") == f.get("index")
            and "id" not in f
            and "name" not in fn_f
        ):
            fn = last.setdefault("function", {})
            args = fn_f.get("arguments")
            if args:
                fn["arguments"] = fn.get("arguments", "") + args
        else:
            into.append({**f, "function": dict(f.get("function") or {})})


def error_record(
    request_id: bytes, code: str, message: str, details: dict[str, Any] | None = None
) -> list[Any]:
    """``details``: more for the error map (``rate_limited``: ``retry_after``
    seconds, ``limit`` name, ``limit_value``, ``remaining``)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        err.update(details)
    return [request_id, "", None, FINISH_ERROR, {"error": err}]


def encode_heartbeat_ms(interval: float) -> bytes:
    """A heartbeat interval as the optional REQUEST/HEARTBEAT frame: ASCII milliseconds."""
    return b"%d" % max(1, round(interval * 1000))


def decode_heartbeat_ms(frame: bytes) -> float:
    """The interval in seconds, capped at ``MAX_CLIENT_HEARTBEAT_INTERVAL``."""
    if not frame.isdigit() or len(frame) > 9:
        raise ValueError("heartbeat interval must be ASCII decimal milliseconds")
    return min(int(frame) / 1000, MAX_CLIENT_HEARTBEAT_INTERVAL)


# --------------------------------------------------------------------------
# Routing keys (the optional last frame of REQUEST), read by the broker's
# ``cache_aware`` dispatch without decoding the body:
#
#     flags: 1 byte (bit 0: a session key follows; other bits must be 0)
#     session: 8 bytes, if flag bit 0
#     prefix chain: k x 8 bytes, k <= MAX_ROUTE_BLOCKS
#
# The prefix chain hashes successive ROUTE_BLOCK-byte blocks of the prompt's
# canonical form, each hash covering every block before it, so one hash names
# a whole prefix. An empty routing frame means "no keys".
ROUTE_BLOCK = 256  # bytes of canonical prompt per prefix hash
MAX_ROUTE_BLOCKS = 128  # hashes per request, at most (the first 32 KiB)
ROUTE_HASH = 8  # bytes per hash
ROUTE_SESSION = 0x01


def _h8(data: bytes, prev: bytes = b"") -> bytes:
    return hashlib.blake2b(prev + data, digest_size=ROUTE_HASH).digest()


def canonical_prompt(
    prompt: str | list[int] | None, messages: list[dict[str, Any]] | None
) -> bytes:
    """What the prefix chain hashes: the prompt's UTF-8 (token ids: 4 bytes
    each, little-endian), or each message as ``role \\x1f content \\x1e``
    (non-text content as msgpack), so that a conversation's next turn starts
    with its previous turn's bytes."""
    if isinstance(prompt, list):
        return struct.pack(f"<{len(prompt)}I", *prompt)
    if messages is None:
        return (prompt or "").encode("utf-8", "surrogatepass")
    parts = []
    for m in messages:
        c = m.get("content")
        cb = c.encode("utf-8", "surrogatepass") if isinstance(c, str) else pack(c)
        parts.append(str(m.get("role", "")).encode() + b"\x1f" + cb + b"\x1e")
    return b"".join(parts)


def prefix_chain(data: bytes) -> list[bytes]:
    """One hash per whole ROUTE_BLOCK of ``data`` (at most MAX_ROUTE_BLOCKS),
    each over the previous hash and its block."""
    out: list[bytes] = []
    h = b""
    n = min(len(data) // ROUTE_BLOCK, MAX_ROUTE_BLOCKS)
    for i in range(n):
        h = _h8(data[i * ROUTE_BLOCK : (i + 1) * ROUTE_BLOCK], h)
        out.append(h)
    return out


def session_key(session_id: str) -> bytes:
    return _h8(session_id.encode("utf-8", "surrogatepass"))


def encode_routing(session_id: str | None, chain: list[bytes]) -> bytes:
    """The routing frame; b"" when there is nothing to route by."""
    if session_id is None and not chain:
        return b""
    if session_id is None:
        return b"\x00" + b"".join(chain[:MAX_ROUTE_BLOCKS])
    return b"\x01" + session_key(session_id) + b"".join(chain[:MAX_ROUTE_BLOCKS])


def decode_routing(frame: bytes) -> tuple[bytes | None, list[bytes]]:
    """(session key or None, prefix chain); ValueError if malformed."""
    if not frame:
        return None, []
    flags = frame[0]
    if flags & ~ROUTE_SESSION:
        raise ValueError("routing frame: unknown flags")
    start = 1 + ROUTE_HASH if flags else 1
    n, rest = divmod(len(frame) - start, ROUTE_HASH)
    if rest or n < 0 or n > MAX_ROUTE_BLOCKS:
        raise ValueError("routing frame: bad length")
    session = frame[1:start] if flags else None
    return session, [frame[i : i + ROUTE_HASH] for i in range(start, len(frame), ROUTE_HASH)]


def encode_tokens(records: list[list[Any]]) -> bytes:
    try:
        return _strict_packer.pack(records)
    except TypeError:  # a tuple, a str subclass...: the general packer
        return _packer.pack(records)


def decode_tokens(payload: bytes) -> list[list[Any]]:
    recs = unpack(payload)
    if not isinstance(recs, list):
        raise ValueError("token payload must be an array")
    for r in recs:
        if not isinstance(r, list) or len(r) != 5 or not isinstance(r[0], bytes):
            raise ValueError("malformed delta record")
    return recs


def encode_header(started: list[bytes], finished: list[bytes]) -> bytes:
    if not started and not finished:
        return EMPTY_HEADER
    return pack([started, finished])


def decode_header(data: bytes) -> tuple[list[bytes], list[bytes]]:
    if data == EMPTY_HEADER:
        return [], []
    h = unpack(data)
    if (
        not isinstance(h, list)
        or len(h) != 2
        or not isinstance(h[0], list)
        or not isinstance(h[1], list)
    ):
        raise ValueError("malformed TOKENS header")
    return h[0], h[1]


def encode_request_ids(rids: list[bytes]) -> bytes:
    """The quiet request ids a client HEARTBEAT lists (its optional last frame)."""
    return _packer.pack(rids[:MAX_HEARTBEAT_IDS])


def decode_request_ids(frame: bytes) -> list[bytes]:
    ids = unpack(frame)
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_HEARTBEAT_IDS
        or not all(isinstance(r, bytes) and r for r in ids)
    ):
        raise ValueError("HEARTBEAT request ids must be an array of non-empty bin")
    return ids
