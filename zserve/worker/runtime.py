"""The worker runtime (the seed's BaseModelWorker), shared by every engine.

Socket role: the worker's DEALER connects to the broker's backend ROUTER.
It says READY with what it serves, heartbeats with its queue length, runs
each REQUEST as a task over the engine, and streams deltas back through the
outbox. When the broker goes silent for interval x liveness it closes the
socket, aborts what it was running (the broker has failed those requests),
backs off (1 s doubling to 32 s) and reconnects with a fresh READY, so a
restarted broker repopulates itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import zmq

from zserve import protocol as p
from zserve._loopsock import LoopSocket
from zserve.errors import BadRequest, ModelNotFound, WorkerLost, ZServeError
from zserve.protocol import Delta, Request, SamplingParams, WorkerInfo
from zserve.security import ClientCurve
from zserve.worker.engine import Engine, GenerateRequest
from zserve.worker.outbox import Message, Outbox, embeddings_per_record, encode_message
from zserve.worker.stops import StopMatcher

log = logging.getLogger(__name__)

_CANCEL_REASON = "cancelled by the client"
_no_deadline = contextlib.nullcontext()


@dataclass
class WorkerConfig:
    broker: str = p.DEFAULT_BACKEND
    capacity: int = 1
    speed: float = 1.0
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS
    reconnect_initial: float = p.RECONNECT_INITIAL
    reconnect_max: float = p.RECONNECT_MAX
    # CURVE (both or neither): this worker's .key_secret file and the broker's .key file
    curve_secret: str | None = None
    curve_server: str | None = None


class Worker:
    def __init__(self, engine: Engine, config: WorkerConfig) -> None:
        self.engine = engine
        self.cfg = config
        self.curve = ClientCurve.load(config.curve_secret, config.curve_server)
        self.ctx = zmq.Context.instance()
        self.sock: LoopSocket | None = None
        self.outbox = Outbox()
        # (client id, request id) -> the task running it
        self.active: dict[tuple[bytes, bytes], asyncio.Task[None]] = {}
        self._seq = 0
        self._last_recv = 0.0  # monotonic time of the last broker message
        self._heard = False  # the broker has spoken in this session
        self._stopping = asyncio.Event()
        self.sessions = 0  # connections made (READY sent)

    # ------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        await self.engine.start()
        delay = self.cfg.reconnect_initial
        try:
            while not self._stopping.is_set():
                heard = await self._session()
                if self._stopping.is_set() or getattr(self.engine, "dead", False):
                    break
                if heard:
                    delay = self.cfg.reconnect_initial
                log.warning("broker lost: reconnecting in %.1f s", delay)
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, self.cfg.reconnect_max)
        finally:
            await self.engine.close()

    def stop(self) -> None:
        self._stopping.set()

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            models=list(self.engine.models),
            capacity=self.cfg.capacity,
            context_length=self.engine.context_length,
            engine=self.engine.name,
            speed=self.cfg.speed,
            pid=os.getpid(),
            heartbeat_interval=self.cfg.heartbeat_interval,
        )

    async def _session(self) -> bool:
        """One connection to the broker; returns whether the broker ever spoke."""
        raw = self.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        watch = self.curve.apply(raw) if self.curve is not None else None
        raw.connect(self.cfg.broker)
        self.sessions += 1
        self._last_recv = time.monotonic()
        self._heard = False
        ended = asyncio.get_running_loop().create_future()

        def on_message(frames: list[bytes]) -> None:
            self._heard = True
            self._last_recv = time.monotonic()
            if not self._handle(frames) and not ended.done():
                ended.set_result(None)  # the broker told us to reconnect

        sock = self.sock = LoopSocket(raw, on_message)
        sock.send([p.WORKER, p.W_READY, self._info().encode()])
        log.info("READY sent to %s: models=%s", self.cfg.broker, self.engine.models)

        def send(msg: Message) -> Any:
            fut = None
            for client, header, payload in encode_message(msg):
                # [ZSW1, TOKENS, client_id, header, payload]
                fut = sock.send([p.WORKER, p.W_TOKENS, client, header, payload])
            return fut

        self.outbox.attach(send)
        ticker = asyncio.create_task(self._heartbeats(sock))
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({ended, ticker, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (ticker, stopping):
                t.cancel()
            if self._stopping.is_set():
                # DISCONNECT first: the broker dispatches nothing more to us
                # (and retries what had not started) while we drain.
                sock.send([p.WORKER, p.W_DISCONNECT])
                try:
                    await asyncio.wait_for(self._drain(), 2.0)
                except TimeoutError:
                    pass
            # Stop reading before anything else is awaited: a REQUEST read
            # now would run on into the next session, unknown to its broker.
            self.outbox.attach(None)
            sock.close()
            self.sock = None
            if watch is not None:
                if not self._heard and not self._stopping.is_set():
                    log.warning("%s", watch.explain(self.cfg.broker))  # a refused key, say
                watch.close()
            await self._abort_all()
            # Every task of this session has ended: none of its records may
            # reach the next session.
            self.outbox.drop_all()
        return self._heard

    async def _drain(self) -> None:
        """On shutdown: cancel running requests and send their final frames."""
        for task in list(self.active.values()):
            task.cancel(_CANCEL_REASON)
        if self.active:
            await asyncio.gather(*self.active.values(), return_exceptions=True)
        while not self.outbox.empty:
            await asyncio.sleep(0.001)

    async def _abort_all(self) -> None:
        tasks = list(self.active.values())
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.active.clear()

    async def _heartbeats(self, sock: LoopSocket) -> None:
        """Send HEARTBEAT every interval; return when the broker is silent too long."""
        expiry = self.cfg.heartbeat_interval * self.cfg.heartbeat_liveness
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            if time.monotonic() - self._last_recv > expiry:
                return
            sock.send_now([p.WORKER, p.W_HEARTBEAT, p.pack({"queue_length": len(self.active)})])
            if getattr(self.engine, "dead", False):
                log.error("engine is dead: leaving")
                self._stopping.set()

    # ------------------------------------------------------------- messages

    def _handle(self, frames: list[bytes]) -> bool:
        if len(frames) < 2 or frames[0] != p.WORKER:
            log.warning("malformed message from broker ignored")
            return True
        cmd = frames[1]
        if cmd == p.W_REQUEST and len(frames) == 6:
            self._handle_request(frames[2], frames[3], frames[4], frames[5])
        elif cmd == p.W_CANCEL and len(frames) == 4:
            task = self.active.get((frames[2], frames[3]))
            log.debug("CANCEL %r: %s", frames[3], "running" if task else "not running")
            if task is not None:
                task.cancel(_CANCEL_REASON)
        elif cmd == p.W_HEARTBEAT:
            pass
        elif cmd == p.W_DISCONNECT:
            log.warning("broker asked us to reconnect")
            return False
        else:
            log.warning("unknown or malformed command %r from broker ignored", cmd)
        return True

    def _handle_request(self, client: bytes, rid: bytes, model_b: bytes, body: bytes) -> None:
        key = (client, rid)
        if key in self.active:
            return  # duplicate delivery
        try:
            model = model_b.decode()
            req = Request.decode(body)
            if model not in self.engine.models:
                raise ModelNotFound(f"this worker does not serve {model!r}")
        except ZServeError as e:
            self._final_error(client, rid, e)
            return
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            self._final_error(client, rid, BadRequest(str(e)))
            return
        self._seq += 1
        task = asyncio.create_task(self._serve(client, rid, model, req, f"{self._seq}"))
        self.active[key] = task
        task.add_done_callback(lambda t: self._never_started(client, rid, t))

    def _never_started(self, client: bytes, rid: bytes, task: asyncio.Task[None]) -> None:
        """A task cancelled before its first step never runs ``_serve``'s
        cleanup (REQUEST and CANCEL in one batch): end the request here."""
        if self.active.get((client, rid)) is task:
            del self.active[(client, rid)]
            if self.sock is not None:
                self.outbox.put(client, rid, Delta(finish_reason=p.FINISH_CANCELLED), True)

    def _final_error(self, client: bytes, rid: bytes, e: ZServeError) -> None:
        self.outbox.put(client, rid, Delta(finish_reason=p.FINISH_ERROR, error=e.to_dict()), False)

    async def _continuation(
        self, model: str, req: Request, stops: StopMatcher
    ) -> SamplingParams | None:
        """The parameters for the rest of a resumed request (``max_tokens``
        less what was delivered; None when nothing is left), with ``stops``
        holding back what the earlier attempt held back."""
        if not self.engine.resumable:
            raise WorkerLost(f"engine {self.engine.name!r} cannot continue a stream")
        cont = req.continue_ids or []
        params = req.params
        if params.max_tokens is not None:
            left = params.max_tokens - len(cont)
            if left <= 0:
                return None
            params = dataclasses.replace(params, max_tokens=left)
        if stops.stops:
            # Text of the delivered ids past what the caller got: a stop
            # string's possible beginning, held back as it was before.
            stops.held = (await self.engine.decode(model, cont))[req.continue_chars :]
        return params

    async def _serve(self, client: bytes, rid: bytes, model: str, req: Request, eid: str) -> None:
        put = self.outbox.put
        active = self.active
        first = True
        finished = False  # our final frame is out
        engine_done = False  # the engine itself ended the request
        guard: asyncio.Timeout | None = None  # the request's deadline
        try:
            if req.kind == p.KIND_EMBED:
                vecs, n = await self.engine.embed(model, req.texts or [])
                # Large results travel as several records (see Outbox.put_chunk),
                # so that no message passes the broker's size limit.
                per = embeddings_per_record(vecs)
                chunks = [vecs[i : i + per] for i in range(0, len(vecs), per)] or [[]]
                for chunk in chunks[:-1]:
                    self.outbox.put_chunk(client, rid, Delta(embeddings=chunk), first)
                    first = False
                put(
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
            params = req.params
            stops = StopMatcher(params.stop)
            cont = req.continue_ids or []
            resumed = len(cont)  # tokens an earlier attempt delivered
            if resumed:
                params = await self._continuation(model, req, stops)
                if params is None:  # nothing left to generate
                    put(client, rid, Delta(finish_reason=p.FINISH_LENGTH, usage={
                        "prompt_tokens": 0, "completion_tokens": resumed}), first)  # fmt: skip
                    finished = engine_done = True
                    return
            limit = params.max_tokens
            # No stop strings and no limit short of it: a partial delta only
            # needs counting and queueing (the fast path below).
            cap = limit if limit is not None else 1 << 62
            plain = not stops.stops
            count = 0  # completion tokens, counted here
            prompt_tokens = 0  # from whichever delta carries usage first
            # The engine's own completion count where it reports one (it knows
            # better, e.g. text chunks from a remote server): how far it is from
            # ours, carried forward over what arrives after the report.
            correction = 0
            # The request's own deadline, if it has one: past it the engine
            # is stopped (abort, below) and the caller gets ``timeout``.
            if params.deadline:
                guard = asyncio.timeout(params.deadline)
            async with guard or _no_deadline:
                gen = self.engine.generate(
                    GenerateRequest(eid, model, req.prompt, req.messages, params, cont)
                )
                try:
                    async for d in gen:
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
                            done = count + correction + resumed
                            d.usage = {"prompt_tokens": prompt_tokens, "completion_tokens": done}
                            put(client, rid, d, first, len(active) == 1)
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
                    done = count + correction + resumed
                    put(
                        client,
                        rid,
                        Delta(
                            text=stops.flush(),
                            finish_reason=p.FINISH_LENGTH,
                            usage={"prompt_tokens": prompt_tokens, "completion_tokens": done},
                        ),
                        first,
                    )
                    finished = True
        except TimeoutError as e:
            if guard is None or not guard.expired():  # the engine's own, not our deadline
                log.exception("engine failed on request %s", eid)
                err = {"code": "engine_error", "message": f"{type(e).__name__}: {e}"}
            else:
                err = {"code": "timeout", "message": "the request's deadline passed"}
            if not finished:
                put(client, rid, Delta(finish_reason=p.FINISH_ERROR, error=err), first)
            finished = True
        except asyncio.CancelledError:
            # (a CANCEL can land while ``gen.aclose()`` runs after the final)
            if not finished and self.sock is not None:
                put(client, rid, Delta(finish_reason=p.FINISH_CANCELLED), first)
            finished = True
            raise
        except ZServeError as e:
            if not finished:
                put(client, rid, Delta(finish_reason=p.FINISH_ERROR, error=e.to_dict()), first)
            finished = True
        except Exception as e:  # an engine failure must not kill the worker
            log.exception("engine failed on request %s", eid)
            if not finished:
                err = {"code": "engine_error", "message": f"{type(e).__name__}: {e}"}
                put(client, rid, Delta(finish_reason=p.FINISH_ERROR, error=err), first)
            finished = True
        finally:
            self.active.pop((client, rid), None)
            if req.kind != p.KIND_EMBED and not engine_done:
                try:
                    await self.engine.abort(eid)
                except Exception:
                    log.exception("engine abort failed for %s", eid)


