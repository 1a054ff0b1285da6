"""Keys and CurveZMQ: key files become socket options here, and the broker's
ZAP authenticator runs here. The broker, the worker and the client call this
module; none of them reads a key file.

Key files are pyzmq's (``zmq.auth``): ``NAME.key`` holds a public key,
``NAME.key_secret`` the key pair. The broker is the CURVE server on both of
its sockets, with one ZAP domain per socket (``workers`` on the backend,
``clients`` on the frontend), and each domain has its own allow list: the
public ``.key`` files in a directory, reloaded on demand (SIGHUP in the CLI).
Workers and clients are CURVE clients: their own key pair plus the broker's
public key.

A peer whose key is not listed is refused during the handshake, before any
message passes; ``HandshakeWatch`` lets the refused side say so instead of
only timing out.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

# ZAP domains, one per broker socket: a key is allowed on one, both or neither.
DOMAIN_WORKERS = "workers"  # the backend ROUTER
DOMAIN_CLIENTS = "clients"  # the frontend ROUTER
DOMAINS = (DOMAIN_WORKERS, DOMAIN_CLIENTS)

REFUSED_LOG_INTERVAL = 1.0  # seconds: at most one "refused" log line per domain

KeySource = str | os.PathLike[str] | bytes  # a key file, or a z85 key itself


class KeyExists(FileExistsError):
    """``write_keypair`` would overwrite a key file."""


def write_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` (public, 0644) and ``DIR/NAME.key_secret``
    (the pair, 0600) with ``zmq.auth.create_certificates``; never overwrite.

    Both files are created empty first with O_EXCL and their final mode, so
    an existing file is refused and the secret is never readable by others,
    not even for a moment; pyzmq then writes into them.
    """
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"bad key name {name!r}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for f in (public, secret):
        if f.exists():
            raise KeyExists(f"{f} already exists; not overwriting it")
    made: list[Path] = []
    try:
        for f, mode in ((public, 0o644), (secret, 0o600)):
            try:
                fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            except FileExistsError:
                raise KeyExists(f"{f} already exists; not overwriting it") from None
            made.append(f)
            os.close(fd)
            os.chmod(f, mode)  # whatever the umask
        zmq.auth.create_certificates(d, name)
    except BaseException:
        for f in made:
            f.unlink(missing_ok=True)
        raise
    return public, secret


def _is_z85_key(v: KeySource) -> bool:
    return isinstance(v, bytes) and len(v) == 40


def load_public(source: KeySource) -> bytes:
    """A z85 public key from a ``.key`` (or ``.key_secret``) file, or as given."""
    if _is_z85_key(source):
        return bytes(source)  # type: ignore[arg-type]
    public, _ = zmq.auth.load_certificate(_path(source))
    return public


def load_keypair(source: KeySource) -> tuple[bytes, bytes]:
    """(public, secret), z85, from a ``.key_secret`` file or a z85 secret key."""
    if _is_z85_key(source):
        secret = bytes(source)  # type: ignore[arg-type]
        return zmq.curve_public(secret), secret
    path = _path(source)
    public, secret = zmq.auth.load_certificate(path)
    if secret is None:
        raise ValueError(f"{path} holds no secret key (a .key_secret file is needed)")
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("secret key file %s is readable by others (mode %o): chmod 600 it",
                    path, mode)  # fmt: skip
    return public, secret


def _path(source: KeySource) -> str:
    if isinstance(source, bytes):
        raise ValueError("a key given as bytes must be a 40-character z85 key")
    return os.fspath(source)


# ------------------------------------------------------------------ clients


@dataclass(frozen=True)
class ClientCurve:
    """What a connecting peer (a client or a worker) needs: its own key pair
    and the broker's public key, z85."""

    public: bytes
    secret: bytes
    server: bytes

    @classmethod
    def load(cls, secret: KeySource | None, server: KeySource | None) -> ClientCurve | None:
        """From ``--curve-secret`` and ``--curve-server``: both or neither."""
        if secret is None and server is None:
            return None
        if secret is None or server is None:
            raise ValueError("CURVE needs both a secret key (curve_secret) and the broker's "
                             "public key (curve_server)")  # fmt: skip
        public, sec = load_keypair(secret)
        return cls(public, sec, load_public(server))

    def apply(self, sock: zmq.Socket, events: int = 0) -> HandshakeWatch:
        """Make ``sock`` a CURVE client (before it connects); returns the
        watch on its handshakes (and ``events``), to be closed after the socket."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server
        return HandshakeWatch(sock, events)


_HANDSHAKE_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
_watch_ids = itertools.count()


class HandshakeWatch:
    """The outcome of a connecting socket's last handshake (a socket monitor).

    Read only when something failed (``explain``), so it costs nothing on
    the message path. The monitor's pipe has no high-water mark: a full one
    would block ZeroMQ's I/O thread. A handshake refused for the key ends
    the connection attempts (one event); one failing for another reason is
    retried every reconnect interval, so an idle socket in that state queues
    a few small events a second until it is next explained or closed.
    """

    def __init__(self, sock: zmq.Socket, events: int = 0) -> None:
        """``events``: more to watch; a client adds ``EVENT_DISCONNECTED``
        (counted, see ``take_disconnects``). A socket has one monitor at most."""
        addr = f"inproc://zserve.handshake.{os.getpid()}.{next(_watch_ids)}"
        sock.monitor(addr, _HANDSHAKE_EVENTS | events)
        self._sock = sock
        self._mon = sock.context.socket(zmq.PAIR)
        self._mon.setsockopt(zmq.RCVHWM, 0)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.connect(addr)
        self.last: tuple[int, int] | None = None  # (event, value) of the latest handshake
        self.disconnects = 0  # connections ended (EVENT_DISCONNECTED), not yet taken

    @property
    def socket(self) -> zmq.Socket:
        """The monitor's PAIR: readable (ZMQ_EVENTS) when events wait."""
        return self._mon

    def _drain(self) -> None:
        if self._mon.closed:
            return
        while self._mon.poll(0):
            ev = recv_monitor_message(self._mon, zmq.NOBLOCK)
            if ev["event"] & _HANDSHAKE_EVENTS:
                self.last = (int(ev["event"]), int(ev["value"]))
            elif ev["event"] == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1

    def take_disconnects(self) -> int:
        """Connections of the socket that ended since the last call."""
        self._drain()
        n, self.disconnects = self.disconnects, 0
        return n

    def refused(self) -> bool:
        """The broker refused our key (ZAP said no)."""
        self._drain()
        return self.last is not None and self.last[0] == zmq.EVENT_HANDSHAKE_FAILED_AUTH

    def explain(self, address: str) -> str:
        """Why nothing reached the broker at ``address``, as far as the
        handshakes tell; it always says the handshake may have been refused."""
        self._drain()
        ev, value = self.last or (None, 0)
        if ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return (
                f"the broker at {address} refused the CURVE handshake: this key is not in "
                f"its allow list (ZAP status {value})"
            )
        if ev == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            return (
                f"the CURVE handshake with {address} was refused: the broker does not speak "
                "CURVE (started without --curve-secret?)"
            )
        if ev == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            return (
                f"the CURVE handshake with {address} failed: the broker may have refused it "
                "(is curve_server the broker's public key?)"
            )
        if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return f"no answer from the broker at {address} (the CURVE handshake had succeeded)"
        return (
            f"no broker at {address}, or the CURVE handshake may have been refused "
            "(no handshake completed)"
        )

    def close(self) -> None:
        """Best before the socket closes: the monitor stops first. (Events a
        socket emits once its monitor's reader is gone block ZeroMQ's I/O
        thread, and with it every socket of the context.)"""
        if not self._sock.closed:
            try:
                self._sock.disable_monitor()
            except zmq.ZMQError:
                pass
        self._mon.close(0)


# ------------------------------------------------------------------ broker


class _AllowLists:
    """The ZAP credentials provider: one allowed key set per domain, and the
    refusals counted and logged (rate-limited). ``callback`` runs on the
    authenticator's thread; ``load`` on the broker's."""

    def __init__(self, dirs: dict[str, Path]) -> None:
        self.dirs = dirs
        self.keys: dict[str, frozenset[bytes]] = {d: frozenset() for d in dirs}
        self.counters: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._logged_at = dict.fromkeys(dirs, -1e9)
        self._unreported = dict.fromkeys(dirs, 0)

    def load(self, strict: bool) -> dict[str, int]:
        """Read every allow directory again; a directory that cannot be read
        keeps its previous list (``strict``: raise instead, at startup)."""
        for domain, d in self.dirs.items():
            try:
                keys = frozenset(zmq.auth.load_certificates(d))
            except (OSError, ValueError) as e:
                if strict:
                    raise ValueError(f"allowed {domain} keys: {e}") from None
                log.error("allowed %s keys not reloaded from %s: %s (keeping %d keys)",
                          domain, d, e, len(self.keys[domain]))  # fmt: skip
                continue
            self.keys[domain] = keys  # one reference swap: the ZAP thread sees old or new
        return {d: len(k) for d, k in self.keys.items()}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.keys.get(domain, ()):
            return True
        now = time.monotonic()
        with self._lock:
            self.counters[f"curve_refused_{domain}"] += 1
            self._unreported[domain] += 1
            if now - self._logged_at[domain] < REFUSED_LOG_INTERVAL:
                return False
            more = self._unreported[domain] - 1
            self._logged_at[domain] = now
            self._unreported[domain] = 0
        since = f" (and {more} more refusals since the last report)" if more else ""
        log.warning("CURVE key %s refused on the %s socket: not in %s%s",
                    key.decode("ascii", "replace"), domain, self.dirs[domain], since)  # fmt: skip
        return False

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.counters)


DOMAIN_BROKERS = "brokers"  # a broker's PUB to its peer brokers (broker/peers.py)


class _OnlyKey:
    """A ZAP credentials provider that allows one key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.key


class BrokerAuth:
    """The broker's CURVE side: its key pair, a ZAP authenticator (pyzmq's
    ``ThreadAuthenticator``) on the broker's context, and the two allow lists.

    Start it before the broker binds; ``apply`` each ROUTER with its domain.
    """

    def __init__(
        self,
        context: zmq.Context,
        secret: KeySource,
        allow_workers: str | os.PathLike[str],
        allow_clients: str | os.PathLike[str],
    ) -> None:
        self.public, self._secret = load_keypair(secret)
        self.lists = _AllowLists(
            {DOMAIN_WORKERS: Path(allow_workers), DOMAIN_CLIENTS: Path(allow_clients)}
        )
        sizes = self.lists.load(strict=True)
        self._auth = ThreadAuthenticator(context, log=log.getChild("zap"))
        self._auth.start()  # binds inproc://zeromq.zap.01 in this context
        for domain in DOMAINS:
            self._auth.configure_curve_callback(domain, self.lists)
        log.info("CURVE on: %d worker keys, %d client keys allowed",
                 sizes[DOMAIN_WORKERS], sizes[DOMAIN_CLIENTS])  # fmt: skip

    def apply(self, sock: zmq.Socket, domain: str) -> None:
        """Make ``sock`` a CURVE server in ``domain`` (before it binds)."""
        if domain not in DOMAINS:
            raise ValueError(f"unknown ZAP domain {domain!r}")
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public

    def serve_peers(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (the PUB a broker reports its usage on to its peer
        brokers) a CURVE server in the ``brokers`` ZAP domain, whose only
        allowed key is this broker's own: the brokers of one set share a
        key pair, as their clients know one server key."""
        own = self.public
        self._auth.configure_curve_callback(DOMAIN_BROKERS, _OnlyKey(own))
        sock.zap_domain = DOMAIN_BROKERS.encode()
        sock.curve_server = True
        sock.curve_secretkey = self._secret
        sock.curve_publickey = own

    def peer_client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (a SUB to a peer broker) a CURVE client with the set's key pair."""
        sock.curve_secretkey = self._secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.public

    def reload(self) -> dict[str, int]:
        """Read both allow lists again (SIGHUP). New connections see the new
        lists at once; connections already made stay until they drop."""
        sizes = self.lists.load(strict=False)
        log.warning("CURVE allow lists reloaded: %d worker keys, %d client keys",
                    sizes[DOMAIN_WORKERS], sizes[DOMAIN_CLIENTS])  # fmt: skip
        with self.lists._lock:
            self.lists.counters["curve_reloads"] += 1
        return sizes

    def counters(self) -> dict[str, int]:
        return self.lists.snapshot()

    def status(self) -> dict[str, Any]:
        c = self.counters()
        return {
            "allowed_workers": len(self.lists.keys[DOMAIN_WORKERS]),
            "allowed_clients": len(self.lists.keys[DOMAIN_CLIENTS]),
            "refused_workers": c.get(f"curve_refused_{DOMAIN_WORKERS}", 0),
            "refused_clients": c.get(f"curve_refused_{DOMAIN_CLIENTS}", 0),
            "reloads": c.get("curve_reloads", 0),
        }

    def stop(self) -> None:
        self._auth.stop()


# ------------------------------------------------------------------ a key set


@dataclass(frozen=True)
class KeySet:
    """Keys for one broker, one worker and one client in one directory (what
    ``zserve run --curve-dir DIR`` uses): ``DIR/{broker,worker,client}.key``
    and ``.key_secret``, and the allow lists ``DIR/allow-workers/worker.key``,
    ``DIR/allow-clients/client.key``."""

    directory: Path

    def path(self, name: str, secret: bool = False) -> str:
        return str(self.directory / (f"{name}.key_secret" if secret else f"{name}.key"))

    @property
    def allow_workers(self) -> str:
        return str(self.directory / "allow-workers")

    @property
    def allow_clients(self) -> str:
        return str(self.directory / "allow-clients")

    def broker_args(self) -> list[str]:
        return ["--curve-secret", self.path("broker", True),
                "--curve-allow-workers", self.allow_workers,
                "--curve-allow-clients", self.allow_clients]  # fmt: skip

    def peer_args(self, name: str) -> list[str]:
        """``--curve-secret`` and ``--curve-server`` for the ``worker`` or ``client`` key."""
        return ["--curve-secret", self.path(name, True), "--curve-server", self.path("broker")]


def ensure_key_set(directory: str | os.PathLike[str]) -> KeySet:
    """The key set in ``directory``, written where a key is missing (an
    existing key is kept, never overwritten)."""
    ks = KeySet(Path(directory))
    ks.directory.mkdir(parents=True, exist_ok=True)
    os.chmod(ks.directory, 0o700)
    for name, allow in (("broker", None), ("worker", ks.allow_workers),
                        ("client", ks.allow_clients)):  # fmt: skip
        if not Path(ks.path(name, True)).exists():
            write_keypair(ks.directory, name)
        if allow is not None:
            listed = Path(allow) / f"{name}.key"
            if not listed.exists():
                Path(allow).mkdir(exist_ok=True)
                listed.write_bytes(Path(ks.path(name)).read_bytes())
    return ks
