"""The ``zserve`` command. It parses arguments, configures logging and calls
library code; nothing else lives here.

Error codes map to exit statuses in one place (``_EXIT``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Annotated, Any

import typer

from zserve import protocol as p
from zserve.gateway.limits import BODY_TIMEOUT, HEADER_TIMEOUT, MAX_CONNECTIONS, ServerLimits

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="zserve: LLM serving through one low-latency ZeroMQ broker.",
)

# Exit status per error code (the CLI's one mapping of codes).
_EXIT = {
    "bad_request": 2,
    "context_overflow": 2,
    "model_not_found": 3,
    "overloaded": 4,
    "worker_lost": 5,
    "timeout": 6,
    "cancelled": 7,
    "broker_unreachable": 8,
    "engine_error": 9,
}

LogLevel = Annotated[str, typer.Option("--log-level", help="debug|info|warning|error")]
# CURVE on a connecting peer (worker, client, gateway): both or neither.
CurveSecret = Annotated[
    str | None,
    typer.Option("--curve-secret", help="CURVE: this peer's .key_secret file (see zserve keys)"),
]
CurveServer = Annotated[
    str | None, typer.Option("--curve-server", help="CURVE: the broker's public .key file")
]


# Broker address options: repeatable, each a comma-separated list.
Backends = Annotated[
    list[str] | None,
    typer.Option(
        "--broker",
        help=f"broker backend; repeatable, or a comma list (default {p.DEFAULT_BACKEND})",
    ),
]
Frontends = Annotated[
    list[str] | None,
    typer.Option(
        "--broker",
        help=f"broker frontend; repeatable, or a comma list (default {p.DEFAULT_FRONTEND})",
    ),
]
# One broker frontend (generate, chat, gateway).
Frontend = Annotated[str, typer.Option("--broker", help="broker frontend")]
# The gateway's API keys from a file (gateway, run).
ApiKeysFile = Annotated[
    str | None,
    typer.Option(help="a file of accepted API keys, one a line (# comments); adds to --api-keys"),
]


def _addresses(values: list[str] | None, default: str) -> list[str]:
    """Every address given (``--broker a --broker b,c``), each once, in order."""
    out: list[str] = []
    for v in values or [default]:
        for a in v.split(","):
            a = a.strip()
            if a and a not in out:
                out.append(a)
    if not out:
        raise typer.BadParameter("--broker is empty")
    return out


@contextlib.contextmanager
def _exit_on_bad_input(status: int = 2) -> Iterator[None]:
    """A bad key file, allow directory, engine setting or model (``ValueError``,
    ``OSError``): its message on stderr, then exit ``status``."""
    try:
        yield
    except (ValueError, OSError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(status) from None


def _logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _run_async(coro: Any) -> Any:
    """asyncio.run on uvloop where installed (a faster loop, same semantics)."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Terminate(BaseException):
    """SIGTERM as an exception; a BaseException, so that no ``except
    Exception`` on the way (a log handler, the broker's message loop) can
    swallow it."""


def _term_within(ctx: Any, seconds: float) -> None:
    """``ctx.term()``, given up on after ``seconds`` (a daemon thread: the
    process may exit with it still waiting)."""
    import threading

    t = threading.Thread(target=ctx.term, daemon=True, name="zmq-term")
    t.start()
    t.join(seconds)


def _raise_terminate(signum: int, frame: Any) -> None:
    raise _Terminate


@app.command()
def broker(
    frontend: Annotated[str, typer.Option(help="client endpoint to bind")] = p.DEFAULT_FRONTEND,
    backend: Annotated[str, typer.Option(help="worker endpoint to bind")] = p.DEFAULT_BACKEND,
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
    dispatch: Annotated[
        str, typer.Option(help="shortest_queue|lottery|round_robin|power_of_two|cache_aware")
    ] = "shortest_queue",
    cache_map_size: Annotated[
        int, typer.Option(help="cache_aware: prefix map entries, at most (LRU)")
    ] = 65_536,
    cache_threshold_abs: Annotated[
        float, typer.Option(help="cache_aware: load above the least loaded worker's ...")
    ] = 4.0,
    cache_threshold_rel: Annotated[
        float, typer.Option(help="cache_aware: ... and times it, past which the prefix loses")
    ] = 1.5,
    session_balance: Annotated[
        float, typer.Option(help="cache_aware: a session's worker may carry this x mean load")
    ] = 1.25,
    max_queue: Annotated[int, typer.Option(help="waiting requests per model")] = p.MAX_QUEUE,
    queue_timeout: Annotated[float, typer.Option(help="seconds a request may wait")] = (
        p.QUEUE_TIMEOUT
    ),
    max_message_size: int = p.MAX_MESSAGE_SIZE,
    frontend_hwm: Annotated[int, typer.Option(help="messages queued per client")] = (
        p.FRONTEND_HWM
    ),
    max_inflight_per_client: Annotated[
        int, typer.Option(help="requests one client may have in flight (0: no limit)")
    ] = 0,
    store_max_count: Annotated[
        int, typer.Option(help="stored responses held for the gateways, at most (oldest out)")
    ] = 10_000,
    store_max_bytes: Annotated[
        int, typer.Option(help="bytes of stored responses held for the gateways, at most")
    ] = 64 * 1024 * 1024,
    store_wait: Annotated[
        float,
        typer.Option(help="seconds a read of a stored response not (yet) here waits for its write"),
    ] = 0.25,
    ready_file: Annotated[
        str | None, typer.Option(help="write the bound endpoints here as JSON")
    ] = None,
    curve_secret: Annotated[
        str | None, typer.Option(help="CURVE on both sockets: the broker's .key_secret file")
    ] = None,
    curve_allow_workers: Annotated[
        str | None, typer.Option(help="CURVE: directory of worker .key files allowed")
    ] = None,
    curve_allow_clients: Annotated[
        str | None, typer.Option(help="CURVE: directory of client .key files allowed")
    ] = None,
    tenants: Annotated[
        str | None,
        typer.Option(help="tenants file (TOML): limits, priorities, fair shares (docs/tenants.md)"),
    ] = None,
    peer_bind: Annotated[
        str | None,
        typer.Option(help="tenants: endpoint to bind for usage reports to the peer brokers"),
    ] = None,
    peer: Annotated[
        list[str] | None,
        typer.Option("--peer", help="tenants: a peer broker's --peer-bind endpoint; repeatable"),
    ] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the broker (the controller): registry, dispatch, heartbeats. With
    CURVE, SIGHUP reloads both allow lists; with --tenants, the tenants file too."""
    from zserve.broker.dispatch import POLICIES
    from zserve.broker.server import Broker, BrokerConfig

    _logging(log_level)
    if dispatch not in POLICIES:
        raise typer.BadParameter(f"--dispatch must be one of {', '.join(POLICIES)}")
    cfg = BrokerConfig(
        frontend=frontend,
        backend=backend,
        heartbeat_interval=heartbeat_interval,
        heartbeat_liveness=heartbeat_liveness,
        dispatch=dispatch,
        cache_map_size=cache_map_size,
        cache_threshold_abs=cache_threshold_abs,
        cache_threshold_rel=cache_threshold_rel,
        session_balance=session_balance,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        max_message_size=max_message_size,
        frontend_hwm=frontend_hwm,
        max_inflight_per_client=max_inflight_per_client,
        store_max_count=store_max_count,
        store_max_bytes=store_max_bytes,
        store_wait=store_wait,
        curve_secret=curve_secret,
        curve_allow_workers=curve_allow_workers,
        curve_allow_clients=curve_allow_clients,
        tenants=tenants,
        peer_bind=peer_bind,
        peers=[a.strip() for v in peer or [] for a in v.split(",") if a.strip()],
    )
    with _exit_on_bad_input():  # a key file, an allow directory, the tenants file
        b = Broker(cfg)

    def _reload(signum: int, frame: Any) -> None:
        b.reload_keys()
        b.reload_tenants()

    if b.auth is not None or b.admission is not None:  # else SIGHUP keeps its default meaning
        signal.signal(signal.SIGHUP, _reload)
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            json.dump({"frontend": b.frontend_endpoint, "backend": b.backend_endpoint}, f)
        import os

        os.replace(ready_file + ".tmp", ready_file)

    def _goodbye(signum: int, frame: Any) -> None:
        # A planned stop: GOODBYE to clients, DISCONNECT to workers, then
        # close. A second signal: out at once.
        if b.stopping:
            raise _Terminate
        b.stop(goodbye=True)

    signal.signal(signal.SIGTERM, _goodbye)
    signal.signal(signal.SIGINT, _goodbye)
    try:
        b.run()
    except (KeyboardInterrupt, _Terminate):
        pass
    finally:
        b.close()
        # Closed sockets hand what they still hold (a GOODBYE) to ZeroMQ's
        # I/O thread, which dies with the process: terminating the context
        # waits out their linger (bounded here, whatever else is left open).
        _term_within(b.ctx, 2.0)


@app.command()
def worker(
    broker: Backends = None,
    engine: Annotated[str, typer.Option(help="null|hf|vllm|hf-api")] = "null",
    model: Annotated[
        list[str] | None, typer.Option(help="model path/hub id (null: a name); repeatable")
    ] = None,
    model_names: Annotated[
        list[str] | None,
        typer.Option(help="served names, comma-separated; once per --model"),
    ] = None,
    capacity: Annotated[
        int | None,
        typer.Option(
            help="concurrent requests (default: the engine's own; vllm: max_num_seqs, "
            "hf: max_batch_size, hf-api: 32 per endpoint, null: 1024)"
        ),
    ] = None,
    speed: Annotated[float, typer.Option(help="relative speed for dispatch")] = 1.0,
    token_delay: Annotated[float, typer.Option(help="null engine: seconds per token")] = 0.0,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto|float32|float16|bfloat16")] = "auto",
    context_length: int | None = None,
    model_info_file: Annotated[
        str | None, typer.Option(help="hf-api: JSON of served names -> endpoints")
    ] = None,
    tensor_parallel_size: int | None = None,
    gpu_memory_utilization: float | None = None,
    max_model_len: int | None = None,
    engine_arg: Annotated[
        list[str] | None, typer.Option(help="extra engine argument KEY=VALUE; repeatable")
    ] = None,
    tool_call_parser: Annotated[
        str | None,
        typer.Option(
            help="vLLM tool parser for tool_choice auto, as vllm serve names them "
            "(hermes, llama3_json, mistral, pythonic, ...); without it auto is refused"
        ),
    ] = None,
    heartbeat_interval: float = p.HEARTBEAT_INTERVAL,
    heartbeat_liveness: int = p.HEARTBEAT_LIVENESS,
    drain_timeout: Annotated[
        float,
        typer.Option(
            help="on SIGTERM/SIGINT or zserve drain: seconds running streams may go on "
            "before they are handed to other workers (a second signal: at once)"
        ),
    ] = p.DRAIN_TIMEOUT,
    curve_secret: CurveSecret = None,
    curve_server: CurveServer = None,
    log_level: LogLevel = "info",
) -> None:
    """Run a model worker on one engine, for one broker backend or several
    (--broker repeated or comma-separated: it registers with each, and its
    capacity is shared by all of them). SIGTERM or SIGINT drains it: it
    takes nothing new, lets its streams finish within --drain-timeout, hands
    the rest to other workers (their callers see one unbroken stream), and
    exits."""
    import asyncio

    from zserve.worker.engines import load_engine
    from zserve.worker.options import EngineOptions
    from zserve.worker.runtime import Worker, WorkerConfig

    _logging(log_level)
    if capacity is not None and capacity < 1:
        raise typer.BadParameter("--capacity must be >= 1")
    if speed <= 0:
        raise typer.BadParameter("--speed must be > 0")
    if drain_timeout < 0:
        raise typer.BadParameter("--drain-timeout must be >= 0")
    extra: dict[str, Any] = {}
    for kv in engine_arg or []:
        k, sep, v = kv.partition("=")
        if not sep:
            raise typer.BadParameter(f"--engine-arg wants KEY=VALUE, got {kv!r}")
        try:
            extra[k.replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            extra[k.replace("-", "_")] = v
    for k, v in (
        ("tensor_parallel_size", tensor_parallel_size),
        ("gpu_memory_utilization", gpu_memory_utilization),
        ("max_model_len", max_model_len),
    ):
        if v is not None:
            extra[k] = v
    models = list(model or [])
    if not models and engine == "null":
        models = ["null"]
    if not models and engine != "hf-api":
        raise typer.BadParameter("--model is required")
    opts = EngineOptions(
        models=models,
        model_names=[n.split(",") for n in model_names] if model_names else None,
        capacity=capacity or 1,
        token_delay=token_delay,
        device=device,
        dtype=dtype,
        context_length=context_length,
        model_info_file=model_info_file,
        engine_args=extra,
    )
    with _exit_on_bad_input():
        eng = load_engine(engine, opts)
    if capacity is None:
        capacity, why = eng.default_capacity()
    else:
        why = "--capacity"
    logging.getLogger("zserve.worker").info("capacity %d (%s)", capacity, why)
    wcfg = WorkerConfig(
        broker=_addresses(broker, p.DEFAULT_BACKEND),
        capacity=capacity,
        speed=speed,
        heartbeat_interval=heartbeat_interval,
        heartbeat_liveness=heartbeat_liveness,
        curve_secret=curve_secret,
        curve_server=curve_server,
        tool_call_parser=tool_call_parser,
        drain_timeout=drain_timeout,
    )
    with _exit_on_bad_input():  # a key file, a tool parser's name
        w = Worker(eng, wcfg)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, w.drain)  # again: hand over at once
        await w.run()

    with _exit_on_bad_input():
        _run_async(main())
    _term_within(w.ctx, 2.0)  # the last frames (finals, DISCONNECT) go out
    if getattr(eng, "dead", False):
        raise typer.Exit(1)


@app.command()
def status(
    broker: Frontends = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    timeout: float = 5.0,
    curve_secret: CurveSecret = None,
    curve_server: CurveServer = None,
) -> None:
    """Show the broker's workers and models. With several brokers (--broker
    repeated or comma-separated): each broker, reachable, leaving (stopping
    on purpose) or not reachable, and every worker once, draining or
    serving; exits 0 while any broker answers."""
    from zserve.client import Client
    from zserve.errors import ZServeError

    addresses = _addresses(broker, p.DEFAULT_FRONTEND)
    if len(addresses) > 1:
        with _exit_on_bad_input():  # a key file
            _status_of_several(addresses, json_out, timeout, curve_secret, curve_server)
        return
    (address,) = addresses
    try:
        with Client(
            address, timeout=timeout, connect_timeout=timeout,
            curve_secret=curve_secret, curve_server=curve_server,
        ) as c:  # fmt: skip
            st = c.status()
    except ZServeError as e:
        typer.echo(f"error [{e.code}]: {e.message}", err=True)
        raise typer.Exit(_EXIT.get(e.code, 1)) from None
    except (ValueError, OSError) as e:  # a key file
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        out = {
            "workers": [
                {
                    k: w[k]
                    for k in (
                        "id", "models", "capacity", "in_flight", "queue_length", "speed",
                        "last_seen_s", "draining",
                    )
                }
                for w in st["workers"]
            ],
            "models": st["models"],
            "counters": st.get("counters", {}),
            "curve": st.get("curve"),
            "dispatch": st.get("dispatch"),
            "prefix_map": st.get("prefix_map"),
            "tenants": st.get("tenants"),
            "state": st.get("state", "serving"),
        }
        typer.echo(json.dumps(out))
        return
    from rich.console import Console
    from rich.table import Table

    leaving = " (leaving: stopping on purpose)" if st.get("state") == "leaving" else ""
    t = Table(title=f"zserve broker {address}{leaving}")
    cols = ("worker", "state", "models", "engine", "capacity", "in flight", "queue", "speed",
            "seen")  # fmt: skip
    for col in cols:
        t.add_column(col)
    for w in st["workers"]:
        t.add_row(
            w["id"],
            "draining" if w.get("draining") else "serving",
            ",".join(w["models"]),
            w["engine"],
            str(w["capacity"]),
            str(w["in_flight"]),
            str(w["queue_length"]),
            f"{w['speed']:g}",
            f"{w['last_seen_s']:.1f}s ago",
        )
    con = Console()
    con.print(t)
    con.print(f"models: {', '.join(st['models']) or '(none)'}; queued: {st['queued'] or 0}")
    if pm := st.get("prefix_map"):
        from zserve.status import prefix_map_line

        con.print(prefix_map_line(pm))
    from zserve.status import TENANT_COLUMNS, tenant_rows

    if rows := tenant_rows(st):  # with --tenants
        tt = Table(title="tenants")
        for col in TENANT_COLUMNS:
            tt.add_column(col)
        for row in rows:
            tt.add_row(*row)
        con.print(tt)
    if cv := st.get("curve"):
        con.print(
            f"CURVE: {cv['allowed_workers']} worker keys, {cv['allowed_clients']} client keys "
            f"allowed; refused handshakes: workers {cv['refused_workers']}, "
            f"clients {cv['refused_clients']}"
        )


def _status_of_several(
    addresses: list[str],
    json_out: bool,
    timeout: float,
    curve_secret: str | None,
    curve_server: str | None,
) -> None:
    from zserve.security import ClientCurve
    from zserve.status import cluster_status

    ClientCurve.load(curve_secret, curve_server)  # bad key files fail once, here
    st = cluster_status(addresses, timeout, curve_secret, curve_server)
    up = [b for b in st["brokers"] if b["reachable"]]
    if json_out:
        typer.echo(json.dumps(st))
    else:
        from rich.console import Console
        from rich.table import Table

        bt = Table(title="zserve brokers")
        for col in ("broker", "state", "workers", "in flight", "queued", "uptime"):
            bt.add_column(col)
        for b in st["brokers"]:
            if b["reachable"]:
                queued = sum(b["queued"].values())
                bt.add_row(
                    b["broker"], "leaving" if b["state"] == "leaving" else "reachable",
                    str(b["workers"]),
                    str(b["requests_in_flight"]), str(queued), f"{b['uptime_s']:.0f}s",
                )  # fmt: skip
            else:
                err = b["error"]
                bt.add_row(b["broker"], f"unreachable [{err['code']}]", "-", "-", "-", "-")
        wt = Table(title="workers (each once, on every broker it serves)")
        cols = ("worker", "state", "models", "engine", "capacity", "in flight", "queue",
                "brokers", "seen")  # fmt: skip
        for col in cols:
            wt.add_column(col)
        index = {a: str(i + 1) for i, a in enumerate(addresses)}
        for w in st["workers"]:
            wt.add_row(
                w["id"], "draining" if w.get("draining") else "serving",
                ",".join(w["models"]), w["engine"], str(w["capacity"]),
                str(w["in_flight"]), str(w["queue_length"]),
                ",".join(index.get(b, b) for b in w["brokers"]),
                f"{w['last_seen_s']:.1f}s ago",
            )  # fmt: skip
        con = Console()
        con.print(bt)
        con.print(wt)
        con.print(
            f"brokers: {len(up)} of {len(addresses)} reachable "
            f"({', '.join(f'{i} = {a}' for a, i in index.items())}); "
            f"models: {', '.join(st['models']) or '(none)'}"
        )
        from zserve.status import prefix_map_line

        for b in up:
            if b.get("prefix_map"):
                con.print(f"{index[b['broker']]}: {prefix_map_line(b['prefix_map'])}")
    for b in st["brokers"]:
        if not b["reachable"]:
            err = b["error"]
            typer.echo(f"error [{err['code']}] {b['broker']}: {err['message']}", err=True)
    if not up:
        raise typer.Exit(_EXIT["broker_unreachable"])


@app.command()
def drain(
    worker: Annotated[
        str, typer.Argument(help="the worker: its id as zserve status shows it")
    ],
    broker: Frontends = None,
    timeout: float = 5.0,
    curve_secret: CurveSecret = None,
    curve_server: CurveServer = None,
) -> None:
    """Drain a worker through a broker, as SIGTERM would: it takes nothing
    new (every broker stops dispatching to it), lets its streams finish
    within its --drain-timeout, hands the rest to other workers, and exits.
    With several brokers, the first that knows the worker tells it."""
    from zserve.client import Client
    from zserve.errors import ZServeError

    errors: list[tuple[str, ZServeError]] = []
    for address in _addresses(broker, p.DEFAULT_FRONTEND):
        try:
            with _exit_on_bad_input(), Client(
                address, timeout=timeout, connect_timeout=timeout,
                curve_secret=curve_secret, curve_server=curve_server,
            ) as c:  # fmt: skip
                told = c.query(p.SERVICE_DRAIN, worker.encode())
        except ZServeError as e:
            errors.append((address, e))
            continue
        typer.echo(f"draining: {', '.join(told['draining'])} (told by {address})")
        return
    for address, e in errors:
        typer.echo(f"error [{e.code}] {address}: {e.message}", err=True)
    raise typer.Exit(_EXIT.get(errors[-1][1].code, 1))


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="the prompt")],
    model: Annotated[str, typer.Option(help="served model name")],
    broker: Frontend = p.DEFAULT_FRONTEND,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    stop: Annotated[list[str] | None, typer.Option(help="stop string; repeatable")] = None,
    chat: Annotated[bool, typer.Option(help="send as a chat user message")] = False,
    timeout: float = 60.0,
    curve_secret: CurveSecret = None,
    curve_server: CurveServer = None,
) -> None:
    """Stream a generation to stdout."""
    from zserve.client import Client
    from zserve.errors import ZServeError

    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "seed": seed,
        "stop": stop or None,
    }
    signal.signal(signal.SIGTERM, _raise_terminate)
    with _exit_on_bad_input():  # a key file
        client = Client(
            broker, timeout=timeout, curve_secret=curve_secret, curve_server=curve_server
        )
    try:
        with client as c:
            if chat:
                s = c.stream(model, messages=[{"role": "user", "content": prompt}], **kwargs)
            else:
                s = c.stream(model, prompt, **kwargs)
            with s:  # leaving it early (Ctrl-C) cancels the request on the worker
                for d in s:
                    sys.stdout.write(d.text)
                    sys.stdout.flush()
        sys.stdout.write("\n")
    except (KeyboardInterrupt, _Terminate):
        sys.stdout.write("\n")
        typer.echo("error [cancelled]: interrupted; the request was cancelled", err=True)
        raise typer.Exit(_EXIT["cancelled"]) from None
    except ZServeError as e:
        sys.stdout.write("\n")
        typer.echo(f"error [{e.code}]: {e.message}", err=True)
        raise typer.Exit(_EXIT.get(e.code, 1)) from None


@app.command()
def chat(
    model: Annotated[str, typer.Option(help="served model name")],
    broker: Frontend = p.DEFAULT_FRONTEND,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    timeout: Annotated[float, typer.Option(help="seconds an answer may go without a token")] = (
        60.0
    ),
    curve_secret: CurveSecret = None,
    curve_server: CurveServer = None,
) -> None:
    """Chat with a model in the terminal: /clear starts over, /exit or Ctrl-D
    leaves, Ctrl-C stops an answer."""
    from zserve.chat import run_chat
    from zserve.errors import ZServeError
    from zserve.security import ClientCurve

    with _exit_on_bad_input():
        ClientCurve.load(curve_secret, curve_server)  # bad key files fail before the chat starts
    try:
        code = run_chat(
            broker, model, system, temperature, max_tokens, timeout,
            curve_secret=curve_secret, curve_server=curve_server,
        )  # fmt: skip
    except ZServeError as e:
        typer.echo(f"error [{e.code}]: {e.message}", err=True)
        raise typer.Exit(_EXIT.get(e.code, 1)) from None
    raise typer.Exit(code)


@app.command()
def gateway(
    broker: Frontend = p.DEFAULT_FRONTEND,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port")] = 8000,
    api_keys: Annotated[
        str | None,
        typer.Option(
            help="accepted API keys, comma-separated (default: none needed); "
            "visible in ps: prefer --api-keys-file or the ZSERVE_API_KEYS environment variable",
            envvar="ZSERVE_API_KEYS",
        ),
    ] = None,
    api_keys_file: ApiKeysFile = None,
    timeout: Annotated[float, typer.Option(help="seconds a request may go without a token")] = (
        60.0
    ),
    connect_timeout: Annotated[
        float, typer.Option(help="seconds to wait for an unreachable broker")
    ] = 5.0,
    heartbeat_interval: Annotated[
        float, typer.Option(help="seconds between heartbeats (advertised to the broker)")
    ] = (
        p.HEARTBEAT_INTERVAL
    ),
    heartbeat_liveness: Annotated[
        int, typer.Option(help="silent intervals before the broker counts as gone")
    ] = (
        p.HEARTBEAT_LIVENESS
    ),
    header_timeout: Annotated[
        float,
        typer.Option(help="seconds a client may take to send a request's headers (then 408)"),
    ] = HEADER_TIMEOUT,
    body_timeout: Annotated[
        float,
        typer.Option(help="seconds a client may take to send a request's body (then 408)"),
    ] = BODY_TIMEOUT,
    max_connections: Annotated[
        int, typer.Option(help="open HTTP connections; requests on more are answered 503")
    ] = MAX_CONNECTIONS,
    curve_secret: CurveSecret = None,
    curve_server: CurveServer = None,
    tenants: Annotated[
        str | None,
        typer.Option(
            help="the broker's tenants file: its API keys run as their tenants; SIGHUP reloads it"
        ),
    ] = None,
    drain_delay: Annotated[
        float,
        typer.Option(
            help="on SIGTERM/SIGINT: seconds /ready fails while requests are still taken "
            "(a load balancer's time to notice), before the listener closes"
        ),
    ] = 0.0,
    drain_timeout: Annotated[
        float,
        typer.Option(
            help="then, seconds open responses may take to finish (a second signal: none)"
        ),
    ] = p.DRAIN_TIMEOUT,
    log_level: LogLevel = "info",
) -> None:
    """Run the OpenAI-compatible HTTP gateway (a broker client). SIGTERM or
    SIGINT drains it: /ready fails at once (/health stays), then the listener
    closes and open responses finish within --drain-timeout."""
    from zserve.gateway.app import serve
    from zserve.gateway.keys import api_keys as gather_keys
    from zserve.security import ClientCurve

    _logging(log_level)
    if drain_delay < 0 or drain_timeout < 0:
        raise typer.BadParameter("--drain-delay and --drain-timeout must be >= 0")
    with _exit_on_bad_input():
        keys = gather_keys(api_keys, api_keys_file)
        limits = ServerLimits(header_timeout, body_timeout, max_connections)
        ClientCurve.load(curve_secret, curve_server)  # bad key files fail before uvicorn starts
        if tenants:
            from zserve.tenants_config import load_tenants

            load_tenants(tenants)  # a bad tenants file too
    serve(
        broker, host, port, keys, timeout, connect_timeout,
        heartbeat_interval, heartbeat_liveness, log_level.lower(),
        curve_secret=curve_secret, curve_server=curve_server, server_limits=limits,
        tenants=tenants, drain_delay=drain_delay, drain_timeout=drain_timeout,
    )  # fmt: skip


@app.command()
def keys(
    directory: Annotated[str, typer.Argument(help="where to write the key files")],
    name: Annotated[str, typer.Option(help="NAME.key (public) and NAME.key_secret (0600)")],
) -> None:
    """Write a CURVE key pair: DIR/NAME.key and DIR/NAME.key_secret; never overwrites."""
    from zserve.security import write_keypair

    with _exit_on_bad_input(1):  # KeyExists included
        public, secret = write_keypair(directory, name)
    typer.echo(f"public key: {public}\nsecret key: {secret}")


@app.command("tiny-model")
def tiny_model(
    path: Annotated[str, typer.Argument(help="directory to write")],
    seed: int = 0,
    size: Annotated[str, typer.Option(help="tiny | medium | small")] = "tiny",
) -> None:
    """Write a small random-weight Llama model with a trained tokenizer."""
    from zserve.tiny_model import SIZES, write_tiny_model

    if size not in SIZES:
        raise typer.BadParameter(f"--size must be one of {', '.join(SIZES)}")
    out = write_tiny_model(path, seed=seed, size=size)
    typer.echo(str(out))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    model: Annotated[
        str | None, typer.Option(help="model path or hub id (default: the tiny model)")
    ] = None,
    engine: Annotated[str, typer.Option(help="hf|vllm|null, the embedded worker's")] = "hf",
    model_names: Annotated[
        str | None, typer.Option(help="served names, comma-separated (default: the basename)")
    ] = None,
    model_dir: Annotated[str, typer.Option(help="where the tiny model lives")] = ".models/tiny",
    frontend: str = p.DEFAULT_FRONTEND,
    backend: str = p.DEFAULT_BACKEND,
    gateway_port: int = 8000,
    brokers: Annotated[
        int,
        typer.Option(
            help="brokers to start: the first on --frontend/--backend, the others on free "
            "ports of the same hosts; the worker registers with all, the gateway knows all"
        ),
    ] = 1,
    curve_dir: Annotated[
        str | None,
        typer.Option(help="CURVE on: keys for broker, worker and client in DIR (made if missing)"),
    ] = None,
    api_keys_file: ApiKeysFile = None,
    log_level: LogLevel = "warning",
) -> None:
    """Serve one model: broker + worker + gateway until Ctrl-C. Other options
    (--capacity, --max-model-len, --engine-arg K=V, ...) go to the worker.
    The gateway takes its API keys from --api-keys-file or ZSERVE_API_KEYS."""
    from zserve.gateway.keys import read_key_file
    from zserve.launcher import run_stack

    _logging(log_level)
    if brokers < 1:
        raise typer.BadParameter("--brokers must be >= 1")
    gateway_args = []
    if api_keys_file is not None:
        with _exit_on_bad_input():
            read_key_file(api_keys_file)  # a bad file fails before anything starts
        gateway_args = ["--api-keys-file", api_keys_file]
    try:
        code = run_stack(
            engine, model_dir, frontend, backend, gateway_port, log_level,
            model=model, model_names=model_names, extra_worker_args=list(ctx.args),
            curve_dir=curve_dir, brokers=brokers, gateway_args=gateway_args,
        )  # fmt: skip
    except ValueError as e:  # endpoints that cannot take several brokers
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
