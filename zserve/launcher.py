"""Start and stop zserve processes: the embedded stack (``zserve run``) and
the helpers tests and benchmarks use. Every child runs in its own process
group and is stopped (TERM, then KILL) when its owner ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from zserve import protocol as p


def zserve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "zserve.cli", *args]


class Proc:
    """A child process in its own process group."""

    def __init__(self, args: Sequence[str], name: str = "", **popen: Any) -> None:
        self.args = list(args)
        self.name = name or os.path.basename(self.args[0])
        self.popen = subprocess.Popen(self.args, start_new_session=True, **popen)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group, wait, then SIGKILL what is left."""
        if self.alive():
            self.kill(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.kill(signal.SIGKILL)  # stragglers in the group (engine subprocesses)
        try:
            return self.popen.wait(5)
        except subprocess.TimeoutExpired:
            return None


def wait_for(cond: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def start_broker(
    *args: str,
    frontend: str = "tcp://127.0.0.1:*",
    backend: str = "tcp://127.0.0.1:*",
    log_level: str = "warning",
    **popen: Any,
) -> tuple[Proc, str, str]:
    """Start ``zserve broker`` (ephemeral ports by default); return it and its endpoints."""
    fd, ready = tempfile.mkstemp(prefix="zserve-broker-", suffix=".json")
    os.close(fd)
    os.unlink(ready)
    proc = Proc(
        zserve_cmd(
            "broker",
            "--frontend",
            frontend,
            "--backend",
            backend,
            "--ready-file",
            ready,
            "--log-level",
            log_level,
            *args,
        ),
        name="broker",
        **popen,
    )
    try:
        wait_for(
            lambda: os.path.exists(ready) or not proc.alive(), 20, "the broker to bind"
        )
        if not proc.alive():
            raise RuntimeError(f"broker exited with {proc.popen.returncode}")
        with open(ready) as f:
            eps = json.load(f)
    except BaseException:
        proc.stop()
        raise
    finally:
        if os.path.exists(ready):
            os.unlink(ready)
    return proc, eps["frontend"], eps["backend"]


def start_worker(backend: str, *args: str, log_level: str = "warning", **popen: Any) -> Proc:
    return Proc(
        zserve_cmd("worker", "--broker", backend, "--log-level", log_level, *args),
        name="worker",
        **popen,
    )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_models(frontend: str, models: Sequence[str], timeout: float) -> None:
    """Wait until the broker at ``frontend`` serves every model in ``models``."""
    from zserve.client import Client

    with Client(frontend, timeout=5) as c:
        wait_for(lambda: set(models) <= set(c.models()), timeout, f"models {list(models)}")


def _http_ok(url: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def worker_args(
    engine: str, model: str | None, model_names: str | None, model_dir: str
) -> tuple[str, list[str]]:
    """The served name and the ``zserve worker`` arguments for ``zserve run``:
    ``model`` (a path or hub id) when given, else the tiny model in
    ``model_dir`` (written there first if missing); the null engine needs no
    model. The worker's capacity is the engine's own unless passed through."""
    if engine == "null":
        name = model_names or model or "tiny"
        return name.split(",")[0], ["--engine", "null", "--model", name.split(",")[0]]
    if model is None:
        path = Path(model_dir)
        if not (path / "config.json").exists():
            from zserve.tiny_model import write_tiny_model

            print(f"writing the tiny model to {path} ...", flush=True)
            write_tiny_model(path)
        model = str(path)
        model_names = model_names or "tiny"
    names = model_names or (os.path.basename(model.rstrip("/")) or model)
    return names.split(",")[0], ["--engine", engine, "--model", model, "--model-names", names]


def _any_port(endpoint: str) -> str:
    """``tcp://host:port`` -> ``tcp://host:*``: the same host, a free port."""
    scheme, sep, rest = endpoint.partition("://")
    host, colon, _ = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon:
        raise ValueError(f"several brokers need tcp:// endpoints, got {endpoint!r}")
    return f"tcp://{host}:*"


def run_stack(
    engine: str,
    model_dir: str,
    frontend: str = p.DEFAULT_FRONTEND,
    backend: str = p.DEFAULT_BACKEND,
    gateway_port: int = 8000,
    log_level: str = "warning",
    model: str | None = None,
    model_names: str | None = None,
    extra_worker_args: Sequence[str] = (),
    curve_dir: str | None = None,
    brokers: int = 1,
    gateway_args: Sequence[str] = (),
) -> int:
    """Broker + one worker (+ the gateway where installed) until Ctrl-C.

    ``brokers``: how many brokers; the first binds ``frontend`` and
    ``backend``, the others the same hosts on ports of the system's choosing.
    The worker registers with every broker and the gateway is given every
    frontend.

    ``model``: a path or hub id, served under ``model_names`` (default: its
    basename); without it, the tiny model. ``extra_worker_args`` go to
    ``zserve worker`` as they are (engine options, ``--capacity``, ...).
    ``curve_dir``: CURVE on both broker sockets, with the key set in that
    directory (``security.ensure_key_set``: written where missing); the
    gateway uses the client key. ``gateway_args`` go to ``zserve gateway``
    (``--api-keys-file``; keys in ``ZSERVE_API_KEYS`` reach it through the
    environment)."""
    procs: list[Proc] = []
    broker_curve: list[str] = []
    worker_curve: list[str] = []
    client_curve: list[str] = []
    client_keys: dict[str, Any] = {}
    if curve_dir is not None:
        from zserve.security import ensure_key_set

        keys = ensure_key_set(curve_dir)
        broker_curve, worker_curve = keys.broker_args(), keys.peer_args("worker")
        client_curve = keys.peer_args("client")
        client_keys = {"curve_secret": client_curve[1], "curve_server": client_curve[3]}

    def _terminate(signum: int, frame: object) -> None:
        # The first SIGINT/SIGTERM stops it all; later ones (a second Ctrl-C, a
        # supervisor signalling the whole group) must not cut the cleanup short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    if brokers < 1:
        raise ValueError("brokers must be >= 1")
    endpoints = [(frontend, backend)] + [
        (_any_port(frontend), _any_port(backend)) for _ in range(brokers - 1)
    ]
    try:
        fes: list[str] = []
        bes: list[str] = []
        for fe_bind, be_bind in endpoints:
            broker, fe, be = start_broker(
                *broker_curve, frontend=fe_bind, backend=be_bind, log_level=log_level
            )
            procs.append(broker)
            fes.append(fe)
            bes.append(be)
        fe, be = fes[0], bes[0]
        model, wargs = worker_args(engine, model, model_names, model_dir)
        worker = start_worker(
            ",".join(bes), *wargs, *worker_curve, *extra_worker_args, log_level=log_level
        )
        procs.append(worker)
        gateway = None
        try:
            import zserve.gateway.app  # noqa: F401

            gateway = Proc(
                zserve_cmd(
                    "gateway", "--broker", ",".join(fes), "--port", str(gateway_port),
                    "--log-level", log_level, *client_curve, *gateway_args,
                ),
                name="gateway",
            )
            procs.append(gateway)
        except ImportError:
            pass
        print(f"waiting for the worker to load {model} ...", flush=True)
        from zserve.client import Client

        for address in fes:  # registered with every broker
            with Client(address, timeout=5, **client_keys) as c:
                wait_for(
                    lambda c=c: model in c.models() or not worker.alive(),
                    1800,
                    f"the model {model} at {address}",
                )
        if not worker.alive():
            print(f"the worker exited ({worker.popen.returncode}) before serving", flush=True)
            return 1
        if gateway is not None:
            wait_for(
                lambda: _http_ok(f"http://127.0.0.1:{gateway_port}/health") or not gateway.alive(),
                60,
                "the gateway",
            )
            print(f"\nChat page: http://127.0.0.1:{gateway_port}/", flush=True)
        keys_note = keys_args = ""
        if curve_dir is not None:
            keys_note = f"  CURVE keys      : {curve_dir} (SIGHUP the broker to reload)\n"
            keys_args = " " + " ".join(client_curve)
        chat_line = f"  .venv/bin/zserve chat --broker {fe} --model {model}{keys_args}\n"
        if len(fes) == 1:
            where = f"  broker frontend : {fe}\n  broker backend  : {be}\n"
        else:
            where = "".join(
                f"  broker {i + 1}        : frontend {f}, backend {b}\n"
                for i, (f, b) in enumerate(zip(fes, bes, strict=True))
            )
        print(
            f"\nzserve is up.\n"
            f"{where}"
            f"  model           : {model} ({engine} engine)\n{keys_note}\n"
            f"Try:\n"
            f"  .venv/bin/zserve generate --broker {fe} --model {model} --max-tokens 16 "
            f"'Hello, world'{keys_args}\n"
            f"{chat_line}"
            f"  .venv/bin/zserve status --broker {','.join(fes)}{keys_args}\n",
            flush=True,
        )
        if gateway is not None:
            print(
                f"  curl http://127.0.0.1:{gateway_port}/v1/chat/completions "
                f"-H 'Content-Type: application/json' -d "
                f"'{{\"model\": \"{model}\", \"max_tokens\": 16, "
                f"\"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'\n",
                flush=True,
            )
        print("Ctrl-C stops everything.", flush=True)
        while all(pr.alive() for pr in procs):
            time.sleep(0.5)
        dead = [pr.name for pr in procs if not pr.alive()]
        print(f"stopping: {', '.join(dead)} exited", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        for pr in reversed(procs):
            pr.stop()
