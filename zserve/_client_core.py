"""What the sync and async clients share: framing, decoding, results.

No I/O here: ``Client`` and ``AsyncClient`` own their sockets and call these.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from zserve import protocol as p
from zserve.errors import BadRequest, ZServeError, from_code
from zserve.protocol import Delta, Request, SamplingParams


@dataclass(slots=True)
class Completion:
    """A whole generation, as ``generate`` returns it."""

    text: str
    token_ids: list[int] | None
    finish_reason: str
    usage: dict[str, int]
    logprobs: list[Any] | None = None


@dataclass(slots=True)
class StreamState:
    """Per-request receive state: records buffered until the caller reads them."""

    records: deque[list[Any]] = field(default_factory=deque)
    done: bool = False  # final record received
    waiter: Any = None  # async: a future the reader resolves


class ClientCore:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.streams: dict[bytes, StreamState] = {}

    def next_id(self) -> bytes:
        return b"%x" % next(self._ids)

    # ------------------------------------------------------------ outgoing

    def request_frames(
        self,
        model: str,
        prompt: str | None,
        messages: list[dict[str, Any]] | None,
        params: dict[str, Any],
    ) -> tuple[bytes, list[bytes]]:
        if prompt is None and messages is None:
            raise BadRequest("give a prompt or messages")
        try:
            sp = SamplingParams.from_dict(params)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        body = Request(prompt=prompt, messages=messages, params=sp).encode()
        return self._open(model, body)

    def embed_frames(self, model: str, texts: list[str]) -> tuple[bytes, list[bytes]]:
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadRequest("texts must be a non-empty list of strings")
        return self._open(model, Request(kind=p.KIND_EMBED, texts=list(texts)).encode())

    def _open(self, model: str, body: bytes) -> tuple[bytes, list[bytes]]:
        rid = self.next_id()
        self.streams[rid] = StreamState()
        # [ZSC1, REQUEST, request_id, model, body]
        return rid, [p.CLIENT, p.C_REQUEST, rid, model.encode(), body]

    def query_frames(self, service: bytes) -> tuple[bytes, list[bytes]]:
        rid = self.next_id()
        self.streams[rid] = StreamState()
        # [ZSC1, QUERY, request_id, service]
        return rid, [p.CLIENT, p.C_QUERY, rid, service]

    @staticmethod
    def cancel_frames(rid: bytes) -> list[bytes]:
        return [p.CLIENT, p.C_CANCEL, rid]

    HEARTBEAT = [p.CLIENT, p.C_HEARTBEAT]

    # ------------------------------------------------------------ incoming

    def on_message(self, frames: list[bytes]) -> list[StreamState]:
        """Route a broker message; return the streams that got records."""
        if len(frames) < 2 or frames[0] != p.CLIENT:
            return []
        if frames[1] != p.C_TOKENS or len(frames) != 3:
            return []  # HEARTBEAT, or something this version does not know
        touched = []
        streams = self.streams
        for rec in p.decode_tokens(frames[2]):
            st = streams.get(rec[0])
            if st is None:
                continue  # a request we cancelled or gave up on
            st.records.append(rec)
            if rec[3] is not None:
                st.done = True
                del streams[rec[0]]
            touched.append(st)
        return touched

    def forget(self, rid: bytes) -> bool:
        """Drop a request's state; True if it was still running."""
        st = self.streams.pop(rid, None)
        return st is not None and not st.done

    def fail_all(self, err: ZServeError) -> list[StreamState]:
        """End every open stream with ``err`` (broker lost, client closed)."""
        out = []
        for rid, st in list(self.streams.items()):
            st.records.append(p.error_record(rid, err.code, err.message))
            st.done = True
            out.append(st)
        self.streams.clear()
        return out


def to_delta(rec: list[Any]) -> Delta:
    """A record as the caller sees it; an error record raises its exception."""
    _, d = Delta.from_record(rec)
    if d.finish_reason == p.FINISH_ERROR:
        err = d.error or {}
        raise from_code(str(err.get("code", "error")), str(err.get("message", "")))
    if d.finish_reason == p.FINISH_CANCELLED:
        raise from_code("cancelled", "request cancelled")
    return d


class Accumulator:
    """Folds deltas into a ``Completion``."""

    __slots__ = ("parts", "token_ids", "logprobs", "finish_reason", "usage")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.token_ids: list[int] | None = None
        self.logprobs: list[Any] | None = None
        self.finish_reason: str | None = None
        self.usage: dict[str, int] = {}

    def add(self, d: Delta) -> None:
        if d.text:
            self.parts.append(d.text)
        if d.token_ids is not None:
            if self.token_ids is None:
                self.token_ids = []
            self.token_ids.extend(d.token_ids)
        if d.logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(d.logprobs)
        if d.finish_reason is not None:
            self.finish_reason = d.finish_reason
            self.usage = dict(d.usage or {})

    def result(self) -> Completion:
        return Completion(
            "".join(self.parts),
            self.token_ids,
            self.finish_reason or p.FINISH_STOP,
            self.usage,
            self.logprobs,
        )


def sampling_params(
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    stop: str | list[str] | None,
    seed: int | None,
    ignore_eos: bool | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    params: dict[str, Any] = dict(extra)
    for k, v in (
        ("max_tokens", max_tokens),
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("stop", stop),
        ("seed", seed),
        ("ignore_eos", ignore_eos),
    ):
        if v is not None:
            params[k] = v
    unknown = set(params) - set(SamplingParams._FIELDS)
    if unknown:
        raise BadRequest(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    return params
