"""CurveZMQ on both broker sockets: real processes, ephemeral ports.

Only listed workers register, only listed clients get answers, a refused
client fails within its connect timeout with an error that says why, SIGHUP
reloads the allow lists, and the bytes on the wire are encrypted.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST_HB, Stack
from zserve import AsyncClient, BrokerUnreachable, Client
from zserve.launcher import wait_for, zserve_cmd

CONNECT_TIMEOUT = 2.0  # a refused client must fail within this (plus a little)


def _zserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(zserve_cmd(*args), capture_output=True, text=True, timeout=timeout)


@dataclass
class Keys:
    """Key pairs written by ``zserve keys``; the allow lists hold copies of
    the listed peers' public keys."""

    root: Path

    def secret(self, name: str) -> str:
        return str(self.root / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / f"{name}.key")

    @property
    def allow_workers(self) -> Path:
        return self.root / "allow-workers"

    @property
    def allow_clients(self) -> Path:
        return self.root / "allow-clients"

    def broker_args(self) -> list[str]:
        return ["--curve-secret", self.secret("broker"),
                "--curve-allow-workers", str(self.allow_workers),
                "--curve-allow-clients", str(self.allow_clients)]  # fmt: skip

    def peer_args(self, name: str) -> list[str]:
        return ["--curve-secret", self.secret(name), "--curve-server", self.public("broker")]

    def client_kw(self, name: str) -> dict[str, Any]:
        return {"curve_secret": self.secret(name), "curve_server": self.public("broker")}

    def allow(self, name: str, lst: Path) -> None:
        shutil.copy(self.public(name), lst / f"{name}.key")


@pytest.fixture(scope="module")
def key_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key pairs made once per module (the CLI takes a second or so each)."""
    root = tmp_path_factory.mktemp("curve-keys")
    for name in ("broker", "w1", "w2", "admin", "c1", "c2"):
        r = _zserve("keys", str(root), "--name", name)
        assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def keys(key_root: Path, tmp_path: Path) -> Keys:
    """A fresh copy per test (the reload test edits the allow lists): w1,
    admin and c1 listed; w2 and c2 not."""
    k = Keys(tmp_path / "keys")
    shutil.copytree(key_root, k.root)
    k.allow_workers.mkdir()
    k.allow_clients.mkdir()
    k.allow("w1", k.allow_workers)
    k.allow("admin", k.allow_clients)
    k.allow("c1", k.allow_clients)
    return k


def _status(stack: Stack, keys: Keys) -> dict[str, Any]:
    with Client(stack.frontend, timeout=10, **keys.client_kw("admin")) as c:
        return c.status()


def _refused_fast(make: Any) -> BrokerUnreachable:
    """``make()`` must raise BrokerUnreachable within the connect timeout."""
    t0 = time.monotonic()
    with pytest.raises(BrokerUnreachable) as ei:
        make()
    elapsed = time.monotonic() - t0
    assert elapsed < CONNECT_TIMEOUT + 3, f"took {elapsed:.1f} s"
    return ei.value


# ------------------------------------------------------------------ keys


def test_keys_command_writes_a_0600_secret_and_refuses_to_overwrite(tmp_path):
    d = tmp_path / "k"
    r = _zserve("keys", str(d), "--name", "alice")
    assert r.returncode == 0, r.stderr
    public, secret = d / "alice.key", d / "alice.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert not stat.S_IMODE(public.stat().st_mode) & 0o022
    import zmq.auth

    pub, none = zmq.auth.load_certificate(public)
    pub2, sec = zmq.auth.load_certificate(secret)
    assert none is None and pub == pub2 and sec is not None and len(sec) == 40
    before = (public.read_bytes(), secret.read_bytes())

    again = _zserve("keys", str(d), "--name", "alice")
    assert again.returncode != 0
    assert "already exists" in again.stderr and "not overwriting" in again.stderr
    assert (public.read_bytes(), secret.read_bytes()) == before


# ------------------------------------------------------------------ access


def test_listed_worker_and_client_work_end_to_end(stack, keys):
    stack.start_broker(*keys.broker_args())
    stack.worker("--model", "m", *keys.peer_args("w1"))
    kw = keys.client_kw("c1")
    with Client(stack.frontend, timeout=30, **kw) as c:
        wait_for(lambda: c.models() == ["m"], 30, "the listed worker registered")
        assert c.generate("m", "hello", max_tokens=4).text == "t0 t1 t2 t3 "

    async def async_side() -> str:
        async with AsyncClient(stack.frontend, timeout=30, **kw) as ac:
            texts = await asyncio.gather(
                *(ac.generate("m", f"p{i}", max_tokens=3) for i in range(8))
            )
        return "".join(t.text for t in texts)

    assert asyncio.run(async_side()) == "t0 t1 t2 " * 8

    gen = _zserve("generate", "--broker", stack.frontend, "--model", "m", "--max-tokens", "2",
                  *keys.peer_args("c1"), "hi")  # fmt: skip
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.strip() == "t0 t1"
    st = _zserve("status", "--broker", stack.frontend, "--json", *keys.peer_args("c1"))
    assert st.returncode == 0, st.stderr
    out = json.loads(st.stdout)
    assert out["models"] == ["m"]
    assert out["curve"]["allowed_workers"] == 1 and out["curve"]["allowed_clients"] == 2
    table = _zserve("status", "--broker", stack.frontend, *keys.peer_args("c1"))
    assert "CURVE: 1 worker keys, 2 client keys allowed" in table.stdout


def test_unlisted_worker_never_registers_and_is_counted(stack, keys, tmp_path):
    broker_log, worker_log = tmp_path / "broker.log", tmp_path / "worker.log"
    with open(broker_log, "w") as blog, open(worker_log, "w") as wlog:
        stack.start_broker(*FAST_HB, *keys.broker_args(), stderr=blog)
        stack.worker("--model", "listed", *FAST_HB, *keys.peer_args("w1"))
        stack.worker("--model", "stranger", *FAST_HB, *keys.peer_args("w2"),
                     log_level="info", stderr=wlog)  # fmt: skip
    # The stranger's session ends unheard after 0.6 s and it tries again
    # after its backoff (1 s, 2 s, ...): each try is one refused handshake.
    wait_for(
        lambda: _status(stack, keys)["counters"].get("curve_refused_workers", 0) >= 2,
        30, "the unlisted worker refused twice",
    )  # fmt: skip
    st = _status(stack, keys)
    assert st["models"] == ["listed"]
    assert len(st["workers"]) == 1
    assert st["curve"]["refused_workers"] >= 2 and st["curve"]["refused_clients"] == 0
    # Both sides say so: the broker (rate-limited), the worker at each session's end.
    w2 = keys_public_z85(keys.public("w2"))
    assert f"CURVE key {w2} refused on the workers socket" in broker_log.read_text()
    wait_for(lambda: "refused the CURVE handshake" in worker_log.read_text(), 20,
             "the worker's log line")  # fmt: skip


def keys_public_z85(path: str) -> str:
    import zmq.auth

    return zmq.auth.load_certificate(path)[0].decode()


def test_unlisted_client_fails_fast_with_a_clear_error(stack, keys):
    stack.start_broker(*keys.broker_args())
    stack.worker("--model", "m", *keys.peer_args("w1"))
    wait_for(lambda: _status(stack, keys)["models"] == ["m"], 30, "the worker")

    with Client(stack.frontend, connect_timeout=CONNECT_TIMEOUT, **keys.client_kw("c2")) as c:
        e = _refused_fast(lambda: c.generate("m", "hi", max_tokens=2))
    assert e.code == "broker_unreachable"
    assert "refused the CURVE handshake" in e.message and "allow list" in e.message

    async def async_side() -> None:
        async with AsyncClient(
            stack.frontend, connect_timeout=CONNECT_TIMEOUT, **keys.client_kw("c2")
        ) as ac:
            await ac.generate("m", "hi", max_tokens=2)

    e = _refused_fast(lambda: asyncio.run(async_side()))
    assert "refused the CURVE handshake" in e.message

    r = _zserve("status", "--broker", stack.frontend, "--timeout", str(CONNECT_TIMEOUT),
                *keys.peer_args("c2"))  # fmt: skip
    assert r.returncode == 8, r.stderr  # broker_unreachable
    assert "CURVE handshake" in r.stderr

    # A wrong broker key: the handshake fails, and the error says it may be refused.
    wrong = {"curve_secret": keys.secret("c1"), "curve_server": keys.public("w1")}
    with Client(stack.frontend, connect_timeout=CONNECT_TIMEOUT, **wrong) as c:
        e = _refused_fast(lambda: c.models())
    assert "CURVE handshake" in e.message and "refused" in e.message

    st = _status(stack, keys)
    assert st["counters"]["curve_refused_clients"] >= 3


def test_plain_text_peers_get_nothing_from_a_curve_broker(stack, keys, tmp_path):
    log = tmp_path / "plain-worker.log"
    stack.start_broker(*FAST_HB, *keys.broker_args())
    with open(log, "w") as f:
        stack.worker("--model", "plain", *FAST_HB, log_level="info", stderr=f)  # no keys
    stack.worker("--model", "m", *FAST_HB, *keys.peer_args("w1"))
    with Client(stack.frontend, connect_timeout=CONNECT_TIMEOUT) as c:
        e = _refused_fast(lambda: c.models())
    assert e.code == "broker_unreachable"
    # The plain worker said READY in three sessions (each ended unheard):
    # none of them registered it.
    wait_for(lambda: log.read_text().count("READY sent") >= 3, 30, "three plain sessions")
    assert _status(stack, keys)["models"] == ["m"]


def test_sighup_reloads_the_allow_lists_without_a_restart(stack, keys):
    broker = stack.start_broker(*keys.broker_args())
    stack.worker("--model", "m", *keys.peer_args("w1"))
    wait_for(lambda: _status(stack, keys)["models"] == ["m"], 30, "the worker")
    with Client(stack.frontend, connect_timeout=CONNECT_TIMEOUT, **keys.client_kw("c2")) as c:
        _refused_fast(lambda: c.models())

    # c2 in, c1 out; the broker keeps running (same process, same registry).
    keys.allow("c2", keys.allow_clients)
    (keys.allow_clients / "c1.key").unlink()
    broker.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: _status(stack, keys)["curve"]["reloads"] == 1, 20, "the reload")
    assert broker.alive()

    with Client(stack.frontend, timeout=30, **keys.client_kw("c2")) as c:
        assert c.generate("m", "now listed", max_tokens=2).text == "t0 t1 "
    with Client(stack.frontend, connect_timeout=CONNECT_TIMEOUT, **keys.client_kw("c1")) as c:
        e = _refused_fast(lambda: c.generate("m", "no longer", max_tokens=2))
    assert "refused the CURVE handshake" in e.message
    st = _status(stack, keys)
    assert st["curve"]["allowed_clients"] == 2  # admin and c2
    assert st["models"] == ["m"]  # the worker never had to come back


def test_chat_takes_keys_and_without_a_listed_one_is_refused(stack, keys):
    """``zserve chat`` with --curve-secret/--curve-server chats; without keys,
    or with an unlisted one, it exits with broker_unreachable's code at once."""
    stack.start_broker(*keys.broker_args())
    stack.worker("--model", "m", *keys.peer_args("w1"))
    wait_for(lambda: _status(stack, keys)["models"] == ["m"], 30, "the worker")
    chat = ["chat", "--broker", stack.frontend, "--model", "m", "--max-tokens", "3"]

    def run_chat(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(zserve_cmd(*chat, *args), input="hi there\n/exit\n",
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    ok = run_chat(*keys.peer_args("c1"))
    assert ok.returncode == 0, ok.stderr
    assert "you> t0 t1 t2 \n[2 prompt tokens · 3 tokens" in ok.stdout

    for args, why in (([], ""), (keys.peer_args("c2"), "refused the CURVE handshake")):
        t0 = time.monotonic()
        r = run_chat("--timeout", str(CONNECT_TIMEOUT), *args)
        elapsed = time.monotonic() - t0
        assert r.returncode == 8, (args, r.stdout, r.stderr)  # broker_unreachable
        assert "error [broker_unreachable]" in r.stderr and why in r.stderr, r.stderr
        assert elapsed < CONNECT_TIMEOUT + 15, f"took {elapsed:.1f} s"  # + interpreter start-up

    half = run_chat("--curve-secret", keys.secret("c1"))  # no --curve-server
    assert half.returncode == 2 and "CURVE needs both" in half.stderr, half.stderr


# ------------------------------------------------------------------ encryption


class RecordingRelay:
    """A loopback TCP relay that keeps every byte it forwards, both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.recorded = bytearray()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._server: asyncio.base_events.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "relay did not start"
        assert self._server is not None
        self.port = self._server.sockets[0].getsockname()[1]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    with self._lock:
                        self.recorded += data
                    w.write(data)
                    await w.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()

        async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                cw.close()
                return
            await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

        async def start() -> None:
            self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
            self._ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def data(self) -> bytes:
        with self._lock:
            return bytes(self.recorded)

    def close(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in asyncio.all_tasks():
                if t is not asyncio.current_task():
                    t.cancel()

        fut = asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


@pytest.fixture
def relays() -> Iterator[list[RecordingRelay]]:
    made: list[RecordingRelay] = []
    try:
        yield made
    finally:
        for r in made:
            r.close()


PROMPT = "attack at dawn: the launch code is 7-7-4-1-zebra"
N_TOKENS = 48


def _run_through_relays(
    stack: Stack, relays: list[RecordingRelay], broker_args: list[str],
    worker_args: list[str], client_kw: dict[str, Any],
) -> tuple[bytes, str]:
    """Broker, a worker and a client whose connections both pass through
    recording relays; returns every relayed byte and the generated text."""
    stack.start_broker(*broker_args)
    fe_relay, be_relay = RecordingRelay(_port(stack.frontend)), RecordingRelay(_port(stack.backend))
    relays += [fe_relay, be_relay]
    stack.backend = f"tcp://127.0.0.1:{be_relay.port}"
    stack.worker("--model", "m", *worker_args)
    with Client(f"tcp://127.0.0.1:{fe_relay.port}", timeout=30, **client_kw) as c:
        wait_for(lambda: c.models() == ["m"], 30, "the worker through the relay")
        text = c.generate("m", PROMPT, max_tokens=N_TOKENS).text
    return fe_relay.data() + be_relay.data(), text


def _secrets_in(wire: bytes, text: str) -> list[bytes]:
    """The prompt and every generated token of 4 bytes or more found in ``wire``."""
    pieces = [PROMPT.encode()] + [t.encode() + b" " for t in text.split() if len(t) >= 3]
    return [p for p in pieces if p in wire]


def test_curve_traffic_through_a_recording_relay_is_encrypted(stack, keys, relays):
    wire, text = _run_through_relays(
        stack, relays, keys.broker_args(), keys.peer_args("w1"), keys.client_kw("c1")
    )
    assert text == "".join(f"t{i} " for i in range(N_TOKENS))
    assert len(wire) > 2000  # the relays did carry the conversation
    assert _secrets_in(wire, text) == []


def test_plain_traffic_through_the_same_relay_is_readable(stack, relays):
    """The control: without CURVE the relay sees the prompt and the tokens."""
    wire, text = _run_through_relays(stack, relays, [], [], {})
    found = _secrets_in(wire, text)
    assert PROMPT.encode() in found
    assert len(found) == 1 + len([t for t in text.split() if len(t) >= 3])


# ------------------------------------------------------------------ zserve run


def test_run_with_a_curve_dir_serves_with_keys(tmp_path):
    """``zserve run --curve-dir DIR --engine null`` makes the key set, and
    only its client key gets answers."""
    d = tmp_path / "run-keys"
    fe_port, be_port, gw_port = (_free_port() for _ in range(3))
    fe = f"tcp://127.0.0.1:{fe_port}"
    proc = subprocess.Popen(
        zserve_cmd("run", "--engine", "null", "--curve-dir", str(d),
                   "--frontend", fe, "--backend", f"tcp://127.0.0.1:{be_port}",
                   "--gateway-port", str(gw_port)),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops everything" in line:
                break
        out = "".join(lines)
        assert "zserve is up" in out, out
        assert f"--curve-secret {d}/client.key_secret" in out
        chat = [x for x in lines if "zserve chat" in x]  # the banner's chat line holds the keys
        assert chat and f"--curve-server {d}/broker.key" in chat[0], out
        assert stat.S_IMODE((d / "broker.key_secret").stat().st_mode) == 0o600
        kw = {"curve_secret": str(d / "client.key_secret"), "curve_server": str(d / "broker.key")}
        with Client(fe, timeout=30, **kw) as c:
            assert c.generate("tiny", "hi", max_tokens=2).text == "t0 t1 "
        with Client(fe, connect_timeout=CONNECT_TIMEOUT) as c:
            _refused_fast(lambda: c.models())
        import urllib.request

        body = json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{gw_port}/v1/completions", body,
            {"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:  # the gateway holds the client key
            assert json.loads(r.read())["choices"][0]["text"] == "t0 t1 "
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
