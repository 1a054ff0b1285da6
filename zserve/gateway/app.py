"""The OpenAI-compatible HTTP gateway: one ASGI app, one ``AsyncClient``,
one hop to the broker.

Endpoints: ``GET /v1/models[/{model}]``, ``POST /v1/chat/completions``,
``POST /v1/completions``, ``POST /v1/embeddings``, ``GET /health``,
``GET /ready``, ``GET /metrics``, and the chat page at ``GET /``
(``page.py``). With API keys set, ``/v1/*`` and ``/metrics`` want
``Authorization: Bearer <key>`` (a Prometheus scrape config sends one with
``authorization: {credentials: ...}``); the page, ``/health`` and ``/ready``
stay open, but tell a caller without a key only the status: no models, no
workers. Those three share one broker ``status`` answer for up to
``STATUS_TTL`` seconds, so a flood of probes costs one broker query a
second at most.

What one request may cost (body, JSON, streams) is ``limits.py``; slow and
numerous HTTP clients are held off by the server (``server.py``).

Bare Starlette, not FastAPI, by measurement: 1-token non-streaming chat
completions, sequential on one keep-alive httpx connection, null engine,
broker + worker + gateway + load generator on one 2-core machine, the same
handlers mounted both ways and measured in alternating rounds of 500, 2,000
requests each, two runs: p50 1.85 / 1.88 ms on Starlette against 2.02 /
1.99 ms on FastAPI 0.136 with a pydantic request model (FastAPI's usual
shape), about 0.15 ms (8 %) more. Requests are parsed by hand
(``schema.py``) and SSE chunks built from byte templates (``sse.py``) for
the same reason. The standard json module costs about 10 us a request here
(profiled), under 1 % of that latency, so orjson is not worth a dependency.
uvicorn picks uvloop and httptools when installed
(``uvicorn[standard]``).

The POST endpoints (the ones on the token path) go further: they are plain
ASGI handlers that ``GatewayApp`` calls before Starlette's middleware and
router, read the body from ``receive`` and answer with two ``send`` calls.
That skips five wrapping layers, a ``Request`` and a ``Response`` per
request: in a py-spy profile of 1-token requests they held about 15 % of
the gateway's busy time. The same handlers are also mounted as Starlette
routes, so other methods still get 405 and a root path still routes. The
GET endpoints stay on Starlette.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zserve import protocol as p
from zserve.client import AsyncClient
from zserve.gateway import limits, page, schema
from zserve.gateway.errors import APIError, to_api_error
from zserve.gateway.generation import close_all, complete, first_batches, open_streams, stream_body
from zserve.gateway.limits import ServerLimits, read_body
from zserve.gateway.metrics import CONTENT_TYPE, Metrics, Tracker
from zserve.gateway.responses import handler as responses_handler
from zserve.gateway.responses import routes as responses_routes
from zserve.gateway.schema import dumps
from zserve.gateway.sse import HEADERS as SSE_HEADERS
from zserve.gateway.sse import ChunkEncoder, ClientGone, DisconnectGuard
from zserve.gateway.store import SharedStore
from zserve.gateway.tenants import GatewayTenants
from zserve.gateway.tokens import context_lengths, version
from zserve.gateway.tokens import handlers as token_handlers

log = logging.getLogger(__name__)

JSON = "application/json"
STATUS_TIMEOUT = 2.0  # seconds for /health, /v1/models and /metrics broker queries
STATUS_TTL = 1.0  # seconds one broker status answer (or failure) serves /health, /ready, /metrics

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = JSON.encode()
_END = {"type": "http.response.body", "body": b"", "more_body": False}


def error_response(err: APIError) -> Response:
    return Response(err.body(), status_code=err.status, media_type=JSON)


SESSION_HEADER = b"x-session-id"


def session_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The ``X-Session-ID`` header's value (ASGI headers: lower-case names), if any."""
    for name, value in headers:
        if name == SESSION_HEADER and value:
            return value.decode("latin-1")
    return None


async def send_json(
    send: Send, body: bytes, status: int = 200, more: list[tuple[bytes, bytes]] | None = None
) -> None:
    """``more``: more headers (a 429's Retry-After and x-ratelimit-*)."""
    headers = [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))]
    if more:
        headers += more
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Raw:
    """A plain ASGI handler as a Starlette route endpoint (a bound method
    would be wrapped as a Request -> Response function)."""

    __slots__ = ("handler",)

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.handler(scope, receive, send)


class GatewayApp(Starlette):
    """Starlette, with the POST endpoints taken before its middleware and router."""

    def __init__(self, fast: dict[str, Handler], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fast = fast  # path -> handler, for POST

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # type: ignore[override]
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self.fast.get(scope["path"])
            if handler is not None:
                await handler(scope, receive, send)
                return
        await super().__call__(scope, receive, send)  # type: ignore[arg-type]


class Gateway:
    """What the endpoints share: the broker client, the keys, the metrics."""

    def __init__(
        self,
        broker: str,
        api_keys: Sequence[str] | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
        heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
        curve_secret: str | None = None,
        curve_server: str | None = None,
        tenants: str | None = None,
    ) -> None:
        self.broker = broker
        self.curve = (curve_secret, curve_server)  # key files, for the AsyncClient
        self.heartbeat = (heartbeat_interval, heartbeat_liveness)
        self._own_keys = [k.encode() for k in api_keys or [] if k]  # --api-key
        # The tenants file (tenants.py): its API keys are accepted keys too;
        # SIGHUP reads it again (``reload_tenants``).
        self.tenants = GatewayTenants(tenants) if tenants else None
        self.api_keys = self._keys()
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.metrics = Metrics()
        # Stored responses (/v1/responses), held by the brokers.
        self.store = SharedStore(lambda: self.client)
        self.metrics.resumes = lambda: self._client.resumes if self._client is not None else 0
        self.metrics.handovers = lambda: self._client.handovers if self._client is not None else 0
        # Stopping (SIGTERM: server.DrainingServer): /ready fails, /health stays.
        self.draining = False
        self.metrics.draining = lambda: self.draining
        self.created = int(time.time())
        self._client: AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        # The last broker status answer (or APIError) and when it came; the
        # query in flight, shared by every caller meanwhile.
        self.clock = time.monotonic
        self._status: tuple[float, Any] | None = None
        self._status_query: asyncio.Task[Any] | None = None

    def _keys(self) -> list[bytes]:
        tenant_keys = self.tenants.api_keys if self.tenants is not None else []
        return self._own_keys + [k.encode() for k in tenant_keys]

    def tenant_of(self, scope: Scope) -> str | None:
        """With --tenants: the tenant of the API key the request shows, for the broker."""
        return self.tenants.tenant_of(scope["headers"]) if self.tenants is not None else None

    def reload_tenants(self) -> None:
        """SIGHUP: the tenants file again (its API keys and who they name);
        a file that does not load keeps the old one."""
        if self.tenants is not None and self.tenants.reload():
            self.api_keys = self._keys()

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise APIError("the gateway is not started", "broker_unreachable")
        return self._client

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.loop = asyncio.get_running_loop()
        self._client = AsyncClient(
            self.broker,
            timeout=self.timeout,
            connect_timeout=self.connect_timeout,
            heartbeat_interval=self.heartbeat[0],
            heartbeat_liveness=self.heartbeat[1],
            curve_secret=self.curve[0],
            curve_server=self.curve[1],
        )
        self._client.watch_moves(self.metrics.moved)
        hup = self.tenants is not None and _on_sighup(self.loop, self.reload_tenants)
        # The start-up heap (modules, routes, schemas) is frozen out of the
        # collector: its full passes would walk it all between two tokens.
        gc.collect()
        gc.freeze()
        log.info("gateway up, broker %s", self.broker)
        try:
            yield
        finally:
            if hup:
                self.loop.remove_signal_handler(signal.SIGHUP)
            await self._client.aclose()

    def _error(self, e: BaseException) -> APIError:
        err = to_api_error(e)
        if err.status == 500:
            log.error("request failed: %s", err.message)
        return err

    def fail(self, e: BaseException) -> Response:
        err = self._error(e)
        self.metrics.error(err.code, err.status)
        return error_response(err)

    async def send_fail(self, send: Send, e: BaseException) -> None:
        err = self._error(e)
        self.metrics.error(err.code, err.status)
        await send_json(send, err.body(), err.status, err.headers)

    def has_key(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """Whether the caller may see everything: no keys are set, or
        ``headers`` (the ASGI scope's, lower-case names) carry one."""
        if not self.api_keys:
            return True
        auth = b""
        for name, value in headers:
            if name == b"authorization":
                auth = value
                break
        scheme, _, key = auth.partition(b" ")
        if scheme.lower() == b"bearer" and key:
            k = key.strip()
            return any(hmac.compare_digest(k, good) for good in self.api_keys)
        return False

    def check_key(self, headers: list[tuple[bytes, bytes]]) -> None:
        if not self.has_key(headers):
            raise APIError("invalid or missing API key", "invalid_api_key")

    async def _query(self, what: str) -> Any:
        c = self.client
        call = c.models() if what == "models" else c.status()
        try:
            return await asyncio.wait_for(call, STATUS_TIMEOUT)
        except TimeoutError:
            msg = f"no answer from the broker at {self.broker}"
            raise APIError(msg, "broker_unreachable") from None

    async def broker_status(self) -> dict[str, Any]:
        """The broker's ``status``, at most ``STATUS_TTL`` seconds old: one
        query answers every caller until then (a failure too)."""
        cached = self._status
        if cached is not None and self.clock() - cached[0] < STATUS_TTL:
            result = cached[1]
        else:
            query = self._status_query
            if query is None:
                query = self._status_query = asyncio.ensure_future(self._query_status())
            result = await asyncio.shield(query)
        if isinstance(result, APIError):
            raise APIError(result.message, result.code, result.param)
        return result  # type: ignore[no-any-return]

    async def _query_status(self) -> Any:
        try:
            result: Any = await self._query("status")
        except Exception as e:  # noqa: BLE001 - kept, raised to each caller
            result = self._error(e)
        finally:
            self._status_query = None
        self._status = (self.clock(), result)
        return result

    # ---------------------------------------------------------- endpoints

    async def models(self, request: Request) -> Response:
        try:
            self.check_key(request.scope["headers"])
            names = await self._query("models")
        except Exception as e:
            return self.fail(e)
        body = schema.models_response(sorted(names), self.created, await context_lengths(self))
        return Response(dumps(body), media_type=JSON)

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            self.check_key(request.scope["headers"])
            if name not in await self._query("models"):
                raise APIError(f"the model {name!r} does not exist", "model_not_found", "model")
        except Exception as e:
            return self.fail(e)
        card = schema.model_card(name, self.created, (await context_lengths(self)).get(name))
        return Response(dumps(card), media_type=JSON)

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, True)

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._generate(scope, receive, send, False)

    async def _generate(self, scope: Scope, receive: Receive, send: Send, chat: bool) -> None:
        try:
            headers = scope["headers"]
            self.check_key(headers)
            limits.check_length(headers)
            body = await limits.load_json(await read_body(receive))
            req = schema.parse_chat(body) if chat else schema.parse_completion(body)
            limits.check_streams(req.inputs, req.n)
            limits.check_numbers(req.params)
            sid = session_header(headers)
            if sid is not None:
                req.session_id = sid
            streams = await open_streams(self.client, req, self.tenant_of(scope))
        except ClientGone:
            return
        except Exception as e:
            await self.send_fail(send, e)
            return
        tracker = Tracker(self.metrics, req.model, "chat" if chat else "completions", len(streams))
        started = False  # the response has begun: errors go in the body from here on
        try:
            async with DisconnectGuard(receive, self.loop):
                if not req.stream:
                    choices = await complete(streams, req, tracker)
                    rid = schema.new_id("chatcmpl-" if chat else "cmpl-")
                    build = schema.chat_response if chat else schema.completion_response
                    out = build(rid, int(time.time()), req, choices)
                    u = out["usage"]
                    tracker.done(u["prompt_tokens"], u["completion_tokens"])
                    started = True
                    await send_json(send, dumps(out))
                    return
                firsts = await first_batches(streams, tracker)
                rid = schema.new_id("chatcmpl-" if chat else "cmpl-")
                enc = ChunkEncoder(
                    chat, rid, int(time.time()), req.model, req.include_usage,
                    req.echoed if req.echo else None, req.n,
                    req.echo and req.logprobs is not None,
                )  # fmt: skip
                chunks = stream_body(streams, firsts, req, enc, tracker)
                started = True
                try:
                    await send(
                        {"type": "http.response.start", "status": 200, "headers": SSE_HEADERS}
                    )
                    async for chunk in chunks:
                        if chunk:  # deltas with nothing to show make no chunk
                            await send(
                                {"type": "http.response.body", "body": chunk, "more_body": True}
                            )
                finally:
                    await chunks.aclose()  # type: ignore[attr-defined]
                await send(_END)
        except ClientGone:
            tracker.failed("client_gone", 499)
        except Exception as e:
            if started:
                raise
            err = self._error(e)
            tracker.failed(err.code, err.status)
            await send_json(send, err.body(), err.status, err.headers)
        finally:
            if req.stream:
                await close_all(streams)  # the body may never have started
            tracker.failed("client_gone", 499)  # a no-op once done or failed

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            self.check_key(scope["headers"])
            limits.check_length(scope["headers"])
            body = await limits.load_json(await read_body(receive))
            model, texts, fmt = schema.parse_embedding(body)
        except ClientGone:
            return
        except Exception as e:
            await self.send_fail(send, e)
            return
        tracker = Tracker(self.metrics, model, "embeddings", 1)
        try:
            async with DisconnectGuard(receive, self.loop):
                vectors, prompt_tokens = await self._embed(model, texts, self.tenant_of(scope))
        except ClientGone:
            tracker.failed("client_gone", 499)
            return
        except Exception as e:
            err = self._error(e)
            tracker.failed(err.code, err.status)
            await send_json(send, err.body(), err.status, err.headers)
            return
        except BaseException:
            tracker.failed("client_gone", 499)  # cancelled: the server is stopping
            raise
        tracker.done(prompt_tokens, 0)
        out = schema.embedding_response(model, vectors, prompt_tokens, fmt)
        await send_json(send, dumps(out))

    async def _embed(
        self, model: str, texts: list[str], tenant: str | None = None
    ) -> tuple[list[list[float]], int]:
        r = await self.client.embed_with_usage(model, texts, tenant)
        return r.embeddings, int(r.usage.get("prompt_tokens", 0))

    async def health(self, request: Request) -> Response:
        """200 while the broker answers (503 ``broker_unreachable`` when it
        does not), with how many workers serve and which models (to a
        caller with a key, where keys are set)."""
        try:
            st = await self.broker_status()
        except Exception as e:
            err = self._error(e)
            self.metrics.error(err.code, err.status)
            if not self.has_key(request.scope["headers"]):
                err = APIError("the broker does not answer", err.code)
            return error_response(err)
        body: dict[str, Any] = {"status": "ok", "broker": "reachable"}
        if self.has_key(request.scope["headers"]):
            body["workers"] = len(st["workers"])
            body["models"] = sorted(st["models"])
        return Response(dumps(body), media_type=JSON)

    async def ready(self, request: Request) -> Response:
        """For load balancers and readiness probes: 503 until at least one
        worker serves through a reachable broker, then 200; 503 again from
        the moment the gateway is told to stop (it drains)."""
        keyed = self.has_key(request.scope["headers"])
        if self.draining:
            body = {"ready": False, "reason": "the gateway is stopping (draining)"}
            return Response(dumps(body), status_code=503, media_type=JSON)
        try:
            st = await self.broker_status()
        except Exception as e:
            why = self._error(e).message if keyed else "the broker does not answer"
            body = {"ready": False, "reason": why}
            if keyed:
                body["workers"] = 0
            return Response(dumps(body), status_code=503, media_type=JSON)
        n = len(st["workers"])
        body = {"ready": n > 0}
        if keyed:
            body["workers"] = n
            body["models"] = sorted(st["models"])
        if not n:
            body["reason"] = "no worker serves yet"
        return Response(dumps(body), status_code=200 if n else 503, media_type=JSON)

    async def prometheus(self, request: Request) -> Response:
        """The metrics; with keys set, only for a caller with one (they name
        models, workers and their capacity)."""
        if not self.has_key(request.scope["headers"]):
            return self.fail(APIError("invalid or missing API key", "invalid_api_key"))
        try:
            status = await self.broker_status()
        except Exception as e:
            log.debug("broker status for /metrics failed: %s", e)
            status = None
        return Response(self.metrics.render(status), media_type=CONTENT_TYPE)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    msg = str(getattr(exc, "detail", "")) or "error"
    err = APIError(msg, "not_found" if status == 404 else "bad_request")
    return Response(err.body(), status_code=status, media_type=JSON)


def create_app(
    broker: str = p.DEFAULT_FRONTEND,
    api_keys: Sequence[str] | None = None,
    timeout: float = 60.0,
    connect_timeout: float = 5.0,
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
    curve_secret: str | None = None,
    curve_server: str | None = None,
    tenants: str | None = None,
) -> Starlette:
    """The ASGI app. The gateway's heartbeat interval need not match the
    broker's: it is advertised, and the broker waits on the slower of the two.
    ``tenants``: the tenants file (its API keys name tenants)."""
    gw = Gateway(
        broker, api_keys, timeout, connect_timeout, heartbeat_interval, heartbeat_liveness,
        curve_secret, curve_server, tenants,
    )  # fmt: skip
    fast: dict[str, Handler] = {
        "/v1/chat/completions": gw.chat,
        "/v1/completions": gw.completions,
        "/v1/embeddings": gw.embeddings,
        "/v1/responses": responses_handler(gw),
        **token_handlers(gw),
    }
    routes = [
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model:path}", gw.model, methods=["GET"]),
        *(Route(path, _Raw(handler), methods=["POST"]) for path, handler in fast.items()),
        *responses_routes(gw),
        Route("/version", version, methods=["GET"]),
        Route("/health", gw.health, methods=["GET"]),
        Route("/ready", gw.ready, methods=["GET"]),
        *page.routes(),
        Route("/metrics", gw.prometheus, methods=["GET"]),
    ]
    app = GatewayApp(
        fast, routes=routes, lifespan=gw.lifespan, exception_handlers={HTTPException: _http_error}
    )
    app.state.gateway = gw
    return app


def _on_sighup(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> bool:
    """Call ``fn`` on SIGHUP; False where the loop cannot take signals (an
    app run outside the main thread, as in-process tests do)."""
    try:
        loop.add_signal_handler(signal.SIGHUP, fn)
    except (NotImplementedError, RuntimeError, ValueError):
        return False
    return True


def serve(
    broker: str = p.DEFAULT_FRONTEND,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_keys: Sequence[str] | None = None,
    timeout: float = 60.0,
    connect_timeout: float = 5.0,
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
    log_level: str = "info",
    curve_secret: str | None = None,
    curve_server: str | None = None,
    server_limits: ServerLimits | None = None,
    tenants: str | None = None,
    drain_delay: float = 0.0,
    drain_timeout: float = p.DRAIN_TIMEOUT,
) -> None:
    """Run the gateway on uvicorn until SIGINT/SIGTERM; ``server_limits``:
    how long clients may take to send a request, and how many may connect.
    A signal drains it (``server.DrainingServer``): ``/ready`` fails at once,
    new connections are taken for ``drain_delay`` more seconds, then the
    open responses have ``drain_timeout`` seconds to finish."""
    import uvicorn

    from zserve.gateway import server

    app = create_app(
        broker, api_keys, timeout, connect_timeout, heartbeat_interval, heartbeat_liveness,
        curve_secret, curve_server, tenants,
    )  # fmt: skip
    gw: Gateway = app.state.gateway
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=server.protocol(server_limits or ServerLimits(), lambda: gw.draining),
        ws="none",
        timeout_keep_alive=limits.KEEP_ALIVE_TIMEOUT,
        log_config=None,  # the CLI configures logging
        log_level=log_level,
        access_log=log_level == "debug",
        lifespan="on",
        timeout_graceful_shutdown=drain_timeout,
    )

    def on_drain() -> None:
        gw.draining = True

    server.DrainingServer(config, on_drain, drain_delay).run()
