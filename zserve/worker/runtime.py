"""The worker runtime (the seed's BaseModelWorker), shared by every engine.

A worker serves one or more brokers: it holds one ``BrokerSession`` per
broker (socket, READY, heartbeats, reconnects: ``zserve/worker/session.py``)
and owns what they share: the engine, its capacity and the count of
requests it runs. Each REQUEST runs as a task over the engine and streams
deltas back through its session's outbox.

Capacity is the worker's own, across brokers: a REQUEST that would take the
worker past it is refused before it starts (REFUSE), and its broker sends it
elsewhere. Every broker hears the real queue length in each HEARTBEAT, so
dispatch stays balanced; while one broker has more than the worker took
(it was refused), the others keep to an equal share of the capacity, so
that no broker's requests wait behind another's for long.

Told to stop (SIGTERM, SIGINT, or DRAIN from a broker: ``zserve drain``), a
worker drains (``drain``): it tells every broker (DRAIN: they dispatch
nothing more to it), refuses what crosses that on the wire, lets what runs
finish within ``drain_timeout``, then hands every stream still running over
(a HANDOVER final: its client continues it elsewhere from the ids it got;
one that has sent nothing yet is REFUSEd, and its broker sends it on
unseen), says a last HEARTBEAT and DISCONNECT, and stops. Asked again, it
hands over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from zserve import protocol as p
from zserve.errors import BadRequest, ContextOverflow, ModelNotFound, WorkerLost, ZServeError
from zserve.protocol import Delta, Request, SamplingParams, WorkerInfo
from zserve.security import ClientCurve
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.outbox import embeddings_per_record
from zserve.worker.session import BrokerSession
from zserve.worker.stops import StopMatcher
from zserve.worker.tools import Converter, ToolPlan
from zserve.worker.tools import parser_class as tool_parser_class
from zserve.worker.tools import plan as tool_plan

log = logging.getLogger(__name__)

_no_deadline = contextlib.nullcontext()
# A stream's end at its worker's drain deadline (the HANDOVER final's message).
HANDOVER_REASON = "the worker is stopping: this stream goes on elsewhere"


def broker_list(broker: str | list[str]) -> list[str]:
    """Broker backends from one address, a comma-separated list, or a list of
    them (blanks dropped, each once, in order)."""
    items = [broker] if isinstance(broker, str) else list(broker)
    out: list[str] = []
    for item in items:
        for a in item.split(","):
            a = a.strip()
            if a and a not in out:
                out.append(a)
    if not out:
        raise ValueError("no broker address given")
    return out


@dataclass
class WorkerConfig:
    # One broker backend, a comma-separated list, or a list: one session each.
    broker: str | list[str] = p.DEFAULT_BACKEND
    capacity: int = 1
    speed: float = 1.0
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS
    reconnect_initial: float = p.RECONNECT_INITIAL
    reconnect_max: float = p.RECONNECT_MAX
    # CURVE (both or neither): this worker's .key_secret file and the broker's .key file
    curve_secret: str | None = None
    curve_server: str | None = None
    # This worker's instance id in READY (default: a random one)
    worker_id: str = field(default_factory=p.new_worker_id)
    # vLLM's tool parser for tool_choice "auto" (``hermes``, ...; None: auto
    # is refused). See zserve/worker/tools.py.
    tool_call_parser: str | None = None
    # Told to stop, how long running streams may go on before they are
    # handed over to other workers (``drain``).
    drain_timeout: float = p.DRAIN_TIMEOUT

    @property
    def brokers(self) -> list[str]:
        return broker_list(self.broker)


class Worker:
    def __init__(self, engine: Engine, config: WorkerConfig) -> None:
        self.engine = engine
        self.cfg = config
        self.curve = ClientCurve.load(config.curve_secret, config.curve_server)
        self.ctx = zmq.Context.instance()
        self.brokers = [BrokerSession(self, b) for b in config.brokers]
        self.stopping = asyncio.Event()
        self.queue_length = 0  # requests running, from every broker
        self.peak_queue_length = 0  # the most ever run at once
        self.refused = 0  # REQUESTs refused for want of room
        self._contended_until = 0.0  # a session was refused; see ``_has_room``
        self._seq = 0
        # Draining (``drain``): no new requests; at the deadline (or when
        # asked again: ``_drain_now``) what runs is handed over.
        self.draining = False
        self.handed_over = 0  # streams handed over at a drain deadline
        self._drain_task: asyncio.Task[None] | None = None
        self._drain_now = asyncio.Event()
        self._idle = asyncio.Event()  # draining, and nothing runs
        # the tool parser's class (imports vLLM: the first request should not wait)
        name = config.tool_call_parser
        self.tool_parser = tool_parser_class(name) if name else None

    @property
    def sessions(self) -> int:
        """Connections made to brokers (READY sent), all sessions together."""
        return sum(s.connections for s in self.brokers)

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        await self.engine.start()
        # What start-up made (the engine's modules, its model) lives as long
        # as the process: frozen out of the collector, whose full passes would
        # otherwise walk all of it and stall the loop mid-stream (vllm serve
        # freezes its start-up heap the same way).
        gc.collect()
        gc.freeze()
        try:
            await asyncio.gather(*(s.run() for s in self.brokers))
        finally:
            if self._drain_task is not None:
                self._drain_task.cancel()  # (every broker gone meanwhile)
            await self.engine.close()

    def stop(self) -> None:
        """Stop now: what runs ends ``cancelled`` (``drain`` is the planned stop)."""
        self.stopping.set()

    def drain(self) -> None:
        """The planned stop (SIGTERM, SIGINT, a broker's DRAIN): take nothing
        new, let what runs finish within ``drain_timeout``, hand the rest
        over, then stop. Called again: hand over now."""
        if self.stopping.is_set():
            return
        if self._drain_task is not None:
            self._drain_now.set()
            return
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        self.draining = True
        for s in self.brokers:
            s.send_drain()
        timeout = self.cfg.drain_timeout
        log.info("draining: %d running, %g s to finish them", self.queue_length, timeout)
        if self.queue_length == 0:
            self._idle.set()
        idle = asyncio.ensure_future(self._idle.wait())
        now = asyncio.ensure_future(self._drain_now.wait())
        await asyncio.wait({idle, now}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        idle.cancel()
        now.cancel()
        tasks = []
        for s in self.brokers:
            for key, task in list(s.active.items()):
                s.handing_over.add(key)
                task.cancel(HANDOVER_REASON)
                tasks.append(task)
        if tasks:
            log.info("drain deadline: handing %d streams over", len(tasks))
            await asyncio.gather(*tasks, return_exceptions=True)
        # Every final and REFUSE out before DISCONNECT: a broker that read
        # DISCONNECT first would end those streams ``worker_lost`` itself.
        for _ in range(2000):
            if all(s.outbox.empty for s in self.brokers):
                break
            await asyncio.sleep(0.001)
        for s in self.brokers:
            s.send_state()  # the last tally (handed_over)
        log.info("drained (%d handed over): stopping", self.handed_over)
        self.stop()

    def _hand_over(
        self, s: BrokerSession, client: bytes, rid: bytes, first: bool,
        used: dict[str, int] | None = None,
    ) -> None:  # fmt: skip
        """At the drain deadline: a stream that has sent something ends with
        a HANDOVER final (its client continues it elsewhere; ``used``: what
        it used here); one that has sent nothing is REFUSEd (its broker
        dispatches it elsewhere, unseen, not as a retry)."""
        s.handing_over.discard((client, rid))
        self.handed_over += 1
        if first:
            s.send_refuse(client, rid)
            s.release((client, rid))
            return
        err = {"code": "worker_lost", "message": HANDOVER_REASON, p.HANDOVER: True}
        s.put_final(client, rid, Delta(finish_reason=p.FINISH_ERROR, error=err, usage=used), first)

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            models=list(self.engine.models),
            capacity=self.cfg.capacity,
            context_length=self.engine.context_length,
            engine=self.engine.name,
            speed=self.cfg.speed,
            pid=os.getpid(),
            heartbeat_interval=self.cfg.heartbeat_interval,
            worker_id=self.cfg.worker_id,
        )

    def state(self) -> bytes:
        """A HEARTBEAT's state frame."""
        state = {"queue_length": self.queue_length, "peak_queue_length": self.peak_queue_length}
        if self.draining:
            state["draining"] = True
            state["handed_over"] = self.handed_over
        return p.pack(state)

    # ------------------------------------------------------------- capacity

    def _has_room(self, s: BrokerSession, now: float) -> bool:
        """Whether a REQUEST of session ``s`` may start now.

        Never past the capacity. While other brokers have more for us than
        we took (we refused them lately), ``s`` keeps to an equal share, so
        the slots that free up go to them rather than all back to whichever
        broker refills fastest."""
        if self.queue_length >= self.cfg.capacity:
            return False
        if self._contended_until > now and len(s.running) >= self._share():
            return not any(t is not s and t.wanting_until > now for t in self.brokers)
        return True

    def slot_freed(self) -> None:
        """A request gave its slot back. A broker we refused that holds less
        than its share hears at once that there is room (it counts us full
        until then); its request gets the slot, as ``_has_room`` refuses the
        others theirs while they hold their share."""
        self.queue_length -= 1
        if self.draining and self.queue_length == 0:
            self._idle.set()
        if self._contended_until > 0.0:
            now = time.monotonic()
            if self._contended_until <= now:
                self._contended_until = 0.0
                return
            share = self._share()
            for t in self.brokers:
                if t.wanting_until > now and len(t.running) < share:
                    t.send_state()

    def _share(self) -> int:
        """An equal share of the capacity among the brokers (at least 1)."""
        return max(1, self.cfg.capacity // len(self.brokers))

    # ------------------------------------------------------------- requests

    def admit(
        self, s: BrokerSession, client: bytes, rid: bytes, model_b: bytes, body: bytes
    ) -> None:
        """A REQUEST from session ``s``: run it, refuse it (no room), or end
        it with an error (not one we can serve)."""
        key = (client, rid)
        if key in s.active:
            return  # duplicate delivery
        if self.draining:  # it crossed our DRAIN on the wire: back to the broker
            s.send_refuse(client, rid)
            return
        try:
            model = model_b.decode()
            req = Request.decode(body)
            if model not in self.engine.models:
                raise ModelNotFound(f"this worker does not serve {model!r}")
        except ZServeError as e:
            self._final_error(s, client, rid, e)
            return
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            self._final_error(s, client, rid, BadRequest(str(e)))
            return
        now = time.monotonic()
        if not self._has_room(s, now):
            self.refused += 1
            s.refuse(client, rid, now)
            self._contended_until = max(self._contended_until, s.wanting_until)
            log.debug("REQUEST %r refused: %d running", rid, self.queue_length)
            return
        if s.wanting_until and len(s.running) + 1 >= self._share():
            s.wanting_until = 0.0  # it has its share now
        self._seq += 1
        task = asyncio.create_task(self._serve(s, client, rid, model, req, f"{self._seq}"))
        s.active[key] = task
        s.running.add(key)
        self.queue_length += 1
        if self.queue_length > self.peak_queue_length:
            self.peak_queue_length = self.queue_length
        task.add_done_callback(lambda t: self._never_started(s, client, rid, t))

    def _never_started(
        self, s: BrokerSession, client: bytes, rid: bytes, task: asyncio.Task[None]
    ) -> None:
        """A task cancelled before its first step never runs ``_serve``'s
        cleanup (REQUEST and CANCEL in one batch): end the request here."""
        if s.active.get((client, rid)) is task:
            del s.active[(client, rid)]
            if (client, rid) in s.handing_over:
                self._hand_over(s, client, rid, True)
            elif s.sock is not None:
                s.put_final(client, rid, Delta(finish_reason=p.FINISH_CANCELLED), True)
            s.release((client, rid))

    async def _tokenize(self, model: str, req: Request) -> dict[str, Any]:
        """A tokenize or detokenize request's result."""
        e = self.engine
        if req.kind == p.KIND_DETOKENIZE:
            return {"prompt": await e.detokenize(model, req.prompt_ids or [])}
        o = req.options or {}
        tools = o.get("tools")
        if tools is not None:
            try:
                p.check_tools(tools, None)
            except ValueError as err:
                raise BadRequest(str(err)) from None
        special = o.get("add_special_tokens")
        ids = await e.tokenize(
            GenerateRequest("tokenize", model, req.prompt, req.messages, tools=tools),
            None if special is None else bool(special),
            o.get("add_generation_prompt") is not False,
        )
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": e.context_length}
        if o.get("return_token_strs"):
            tok = e.tokenizer(model)
            out["token_strs"] = None if tok is None else list(tok.convert_ids_to_tokens(ids))
        return out

    def _final_error(self, s: BrokerSession, client: bytes, rid: bytes, e: ZServeError) -> None:
        delta = Delta(finish_reason=p.FINISH_ERROR, error=e.to_dict())
        s.outbox.put(client, rid, delta, False)

    async def _continuation(
        self, model: str, req: Request, params: SamplingParams, stops: StopMatcher, tools: bool
    ) -> SamplingParams | None:
        """The parameters for the rest of a resumed request (``max_tokens``
        less what was delivered; None when nothing is left), with ``stops``
        holding back what the earlier attempt held back. With ``tools`` the
        stop strings saw content, not the engine's text: ``_serve`` restores
        it from the tool-call converter."""
        if not self.engine.resumable:
            raise WorkerLost(f"engine {self.engine.name!r} cannot continue a stream")
        cont = req.continue_ids or []
        if params.max_tokens is not None:
            left = params.max_tokens - len(cont)
            if left <= 0:
                return None
            params = dataclasses.replace(params, max_tokens=left)
        raw = bool(stops.stops) and not self.engine.replays_held_text and not tools
        if raw or tools:  # the delivered ids are decoded: here, or for the converter
            self._check_decodable(cont)
        if raw:
            # Text of the delivered ids past what the caller got: a stop
            # string's possible beginning, held back as it was before, with
            # the decoding that produced the stream (its prompt context).
            greq = GenerateRequest(
                "", model, req.prompt, req.messages, params, cont, prompt_ids=req.prompt_ids
            )
            held = await self.engine.continued_text(greq)
            stops.hold(held[req.continue_chars :])
        return params

    async def _exhausted(
        self,
        model: str,
        req: Request,
        params: SamplingParams,
        stops: StopMatcher,
        tools: ToolPlan | None,
    ) -> Delta:
        """The final of a resumed request whose earlier attempt delivered
        every token ``max_tokens`` allows but not its final: what the
        uninterrupted run's final carried. That is the text the caller never
        got (held back by a stop string, ``continue_chars`` on) and, with
        tools, what the tool-call converter gives at the end; ``length``."""
        cont = req.continue_ids or []
        greq = GenerateRequest("", model, req.prompt, req.messages, params, cont,
                               prompt_ids=req.prompt_ids)  # fmt: skip
        self._check_decodable(cont)
        last = Delta(finish_reason=p.FINISH_LENGTH)
        if tools is None:
            if stops.stops:  # else the caller got all the text there was
                said = await self.engine.continued_text(greq)
                last.text = said[req.continue_chars :]
            return last
        # delivered already, calls included; the stop strings hold what they held
        conv = await self._primed(greq, tools, stops, req.continue_chars)
        more, calls = conv.end()
        if stops.stops:
            more, hit = stops.feed(more)
            if hit:
                last.finish_reason = p.FINISH_STOP
            else:
                more += stops.flush()
        last.text = more
        last.tool_calls = calls or None
        return last

    async def _with_tools(
        self, greq: GenerateRequest, tools: ToolPlan, stops: StopMatcher, chars: int
    ) -> AsyncIterator[Delta]:
        """``greq``'s generation with its text turned into content and tool
        calls by a converter ``_primed`` with what an earlier attempt
        delivered: the engine sends none of that text again (no
        ``continue_chars``)."""
        greq.continue_chars = None
        conv = await self._primed(greq, tools, stops, chars)
        return tools.wrap(self.engine.generate(greq), conv)

    async def _primed(
        self, greq: GenerateRequest, tools: ToolPlan, stops: StopMatcher, chars: int
    ) -> Converter:
        """``tools``' converter for ``greq`` (whose template gets the tools,
        special tokens kept where the parser reads them). A resumption feeds
        it the text the earlier attempt delivered, as that attempt's stream
        decoded it; ``stops`` then hold the content past ``chars`` that the
        earlier attempt's stop strings held back."""
        conv = tools.converter(self.engine.tokenizer(greq.model))
        greq.tools = tools.offer
        greq.skip_special_tokens = conv.skip_special_tokens
        if greq.continue_ids:
            said = await self.engine.continued_text(greq)
            content, _ = conv.feed(said, greq.continue_ids)
            if stops.stops:
                stops.hold(content[chars:])
        return conv

    def _check_decodable(self, cont: list[int]) -> None:
        """``ContextOverflow`` for delivered ids this worker's context cannot
        hold, before a decode that grows with them."""
        ctx = self.engine.context_length
        if ctx and len(cont) >= ctx:
            raise ContextOverflow(
                f"{len(cont)} tokens to continue after: this worker's context is {ctx} tokens"
            )

    async def _serve(
        self, s: BrokerSession, client: bytes, rid: bytes, model: str, req: Request, eid: str
    ) -> None:
        put = s.outbox.put  # partial records
        fin = s.put_final  # the final record: it frees the slot
        active = s.active
        first = True
        finished = False  # our final frame is out
        engine_done = False  # the engine itself ended the request
        guard: asyncio.Timeout | None = None  # the request's deadline
        # What a generate request has used so far, for the usage of any
        # final (a cancelled or failed one too: tenants settle with it).
        count = 0  # completion tokens, counted here
        prompt_tokens = 0  # from whichever delta carries usage first
        # The engine's own completion count where it reports one (it knows
        # better, e.g. text chunks from a remote server): how far it is from
        # ours, carried forward over what arrives after the report.
        correction = 0
        resumed = 0  # tokens an earlier attempt delivered
        try:
            if req.kind == p.KIND_EMBED:
                vecs, n = await self.engine.embed(model, req.texts or [])
                # Large results travel as several records (see Outbox.put_chunk),
                # so that no message passes the broker's size limit.
                per = embeddings_per_record(vecs)
                chunks = [vecs[i : i + per] for i in range(0, len(vecs), per)] or [[]]
                for chunk in chunks[:-1]:
                    s.outbox.put_chunk(client, rid, Delta(embeddings=chunk), first)
                    first = False
                fin(
                    client,
                    rid,
                    Delta(
                        finish_reason=p.FINISH_STOP,
                        embeddings=chunks[-1],
                        usage={"prompt_tokens": n, "completion_tokens": 0},
                    ),
                    first,
                )
                finished = True
                return
            if req.kind != p.KIND_GENERATE:  # tokenize, detokenize
                result = await self._tokenize(model, req)
                n = len(result.get("tokens") or req.prompt_ids or ())
                fin(client, rid, Delta(finish_reason=p.FINISH_STOP, result=result, usage={
                    "prompt_tokens": n, "completion_tokens": 0}), first)  # fmt: skip
                finished = engine_done = True
                return
            params = req.params
            if params.prompt_logprobs is not None and not self.engine.prompt_logprobs:
                raise BadRequest(f"engine {self.engine.name!r} does not score prompts "
                                 "(prompt_logprobs, max_tokens 0)")  # fmt: skip
            stops = StopMatcher(params.stop)
            tools: ToolPlan | None = None
            if params.tools:
                if not self.engine.takes_tools:
                    raise BadRequest(f"engine {self.engine.name!r} does not take tools")
                tools = tool_plan(params, self.tool_parser)
                if tools is not None:
                    params = tools.params
            cont = req.continue_ids or []
            resumed = len(cont)
            if resumed:
                left = await self._continuation(model, req, params, stops, tools is not None)
                if left is None:  # nothing left to generate: only the ending
                    last = await self._exhausted(model, req, params, stops, tools)
                    last.usage = {"prompt_tokens": 0, "completion_tokens": resumed}
                    fin(client, rid, last, first)
                    finished = engine_done = True
                    return
                params = left
                if params.prompt_logprobs is not None:  # the first attempt sent them
                    params = dataclasses.replace(params, prompt_logprobs=None)
            if params.structured is not None and not self.engine.takes_structured:
                raise BadRequest(
                    f"engine {self.engine.name!r} cannot constrain decoding: structured "
                    "outputs (response_format, guided_*, tool_choice required or named) "
                    "need the hf or vllm engine"
                )
            limit = params.max_tokens
            # No stop strings and no limit short of it: a partial delta only
            # needs counting and queueing (the fast path below).
            cap = limit if limit is not None else 1 << 62
            plain = not stops.stops
            cached_tokens = 0  # prompt tokens the engine's prefix cache held, if it says
            # The request's own deadline, if it has one: past it the engine
            # is stopped (abort, below) and the caller gets ``timeout``.
            if params.deadline:
                guard = asyncio.timeout(params.deadline)
            async with guard or _no_deadline:
                greq = GenerateRequest(
                    eid, model, req.prompt, req.messages, params, cont,
                    continue_chars=req.continue_chars, prompt_ids=req.prompt_ids,
                )  # fmt: skip
                if tools is None:
                    gen = self.engine.generate(greq)
                else:  # the text becomes content and tool calls
                    gen = await self._with_tools(greq, tools, stops, req.continue_chars)
                try:
                    async for d in gen:
                        if d.prompt_logprobs is not None:
                            first = _put_prompt_logprobs(s, client, rid, d, first)
                        ids = d.token_ids
                        count += len(ids) if ids is not None else (1 if d.text else 0)
                        finish = d.finish_reason
                        if finish is None and plain and count < cap and d.usage is None:
                            if ids or d.text or d.logprobs:
                                # alone in flight: no other request can join this step
                                put(client, rid, d, first, len(active) == 1)
                                first = False
                            continue
                        engine_done = finish is not None
                        usage = d.usage
                        if usage is not None:
                            prompt_tokens = usage.get("prompt_tokens", prompt_tokens)
                            cached_tokens = usage.get("cached_tokens", cached_tokens)
                            n = usage.get("completion_tokens")
                            if n is not None:
                                correction = n - count
                        if count >= cap and finish is None:
                            finish = d.finish_reason = p.FINISH_LENGTH
                        if not plain:
                            d.text, hit = stops.feed(d.text)
                            if hit:
                                finish = d.finish_reason = p.FINISH_STOP
                            elif finish is not None:
                                d.text += stops.flush()
                        if finish is not None:
                            d.usage = _used(prompt_tokens, count + correction + resumed)
                            if cached_tokens:
                                d.usage["cached_tokens"] = cached_tokens
                            fin(client, rid, d, first, len(active) == 1)
                            finished = True
                            break
                        if d.text or ids or d.logprobs:
                            # logprobs alone (a token still inside a character) must
                            # travel too; usage travels on the final record only
                            put(client, rid, d, first, len(active) == 1)
                            first = False
                finally:
                    await gen.aclose()
                if not finished:
                    # The engine ended without a finish reason: treat as length.
                    used = _used(prompt_tokens, count + correction + resumed)
                    last = Delta(text=stops.flush(), finish_reason=p.FINISH_LENGTH, usage=used)
                    fin(client, rid, last, first)
                    finished = True
        except asyncio.CancelledError:
            # (a CANCEL can land while ``gen.aclose()`` runs after the final)
            if not finished and s.sock is not None:
                used = _used(prompt_tokens, count + correction + resumed)
                if (client, rid) in s.handing_over:  # a drain's deadline
                    self._hand_over(s, client, rid, first, used)
                else:
                    fin(client, rid, Delta(finish_reason=p.FINISH_CANCELLED, usage=used), first)
            finished = True
            raise
        except Exception as e:  # an engine failure must not kill the worker
            err = _error_of(e, guard, eid)
            if not finished:
                used = _used(prompt_tokens, count + correction + resumed)
                fin(client, rid, Delta(finish_reason=p.FINISH_ERROR, error=err, usage=used), first)
            finished = True
        finally:
            active.pop((client, rid), None)
            s.release((client, rid))
            if req.kind != p.KIND_EMBED and not engine_done:
                try:
                    await self.engine.abort(eid)
                except Exception:
                    log.exception("engine abort failed for %s", eid)


def _used(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The usage a final carries (one that ends a request early too:
    cancelled, failed, handed over, for its tenant's settlement)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


def _error_of(e: Exception, guard: asyncio.Timeout | None, eid: str) -> dict[str, Any]:
    """The error a failed request's final carries: a ZServeError's own, the
    request's deadline passed (``guard`` expired), or an engine failure
    (logged; a TimeoutError of the engine's own is one)."""
    if isinstance(e, ZServeError):
        return e.to_dict()
    if isinstance(e, TimeoutError) and guard is not None and guard.expired():
        return {"code": "timeout", "message": "the request's deadline passed"}
    log.exception("engine failed on request %s", eid)
    return {"code": "engine_error", "message": f"{type(e).__name__}: {e}"}


def _put_prompt_logprobs(
    s: BrokerSession, client: bytes, rid: bytes, d: Delta, first: bool
) -> bool:
    """Send ``d``'s prompt logprobs ahead of it, as records of their own
    that are never merged: a long prompt's, with alternatives, would pass
    the message size limit in one. Returns ``first`` after them (False)."""
    lps, d.prompt_logprobs = d.prompt_logprobs or [], None
    top = max((len(e.get("top_logprobs") or ()) for e in lps if e), default=0)
    per = max(1, p.RECORD_BUDGET // (64 + 48 * (top + 1)))  # entries within a record's budget
    for i in range(0, len(lps), per):
        s.outbox.put_chunk(client, rid, Delta(prompt_logprobs=lps[i : i + per]), first)
        first = False
    return first

