"""The floor of a Python broker: bare pyzmq, no bookkeeping, same workload shape.

Three roles, laid out like zserve's (client process -> broker process ->
worker process), each as small as pyzmq allows:

* **forwarder** (``python -m bench.floor forwarder``): a ROUTER frontend for
  clients and a ROUTER backend for the one worker. It only swaps routing ids:
  ``[client, rid, body]`` from the frontend goes to the worker as
  ``[worker, client, rid, body]``; ``[worker, client, payload]`` from the
  backend goes back as ``[client, payload]``. No registry, no heartbeats, no
  request table, no header: the cost of a Python hop and nothing else.
* **worker** (``python -m bench.floor worker``): a DEALER that answers a
  request ``{"max_tokens": n, "per_step": bool}`` with n tokens, one per step
  for every active request, as msgpack delta records shaped like zserve's
  (``[rid, text, token_ids, finish_reason, extra]``). ``per_step=False``:
  one message per token; ``per_step=True``: one message per client per step
  carrying a record for each of its active requests (zserve's coalescing).
* **FloorClient** (in the benchmark's own process): a DEALER that sends the
  requests and decodes the records, counting token ids like zserve's clients.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zserve.launcher import Proc, wait_for

log = logging.getLogger(__name__)

READY = b"READY"
DRAIN_BATCH = 256  # like the zserve broker: messages read from one socket per turn
REPO_ROOT = Path(__file__).resolve().parent.parent

_NOBLOCK = zmq.NOBLOCK
_pack = msgpack.Packer(use_bin_type=True).pack


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


# ------------------------------------------------------------------ forwarder


def run_forwarder(frontend: str, backend: str, ready_file: str) -> None:
    ctx = zmq.Context.instance()
    fe = ctx.socket(zmq.ROUTER)
    be = ctx.socket(zmq.ROUTER)
    for s in (fe, be):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # block rather than drop: counts must add up
    fe.bind(frontend)
    be.bind(backend)
    eps = {
        "frontend": fe.getsockopt_string(zmq.LAST_ENDPOINT),
        "backend": be.getsockopt_string(zmq.LAST_ENDPOINT),
    }
    tmp = ready_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump(eps, f)
    os.replace(tmp, ready_file)

    # Learn the worker's routing id before reading any client (requests wait in ZeroMQ).
    while True:
        frames = be.recv_multipart()
        if frames[1:] == [READY]:
            worker = frames[0]
            break

    poller = zmq.Poller()
    poller.register(fe, zmq.POLLIN)
    poller.register(be, zmq.POLLIN)
    fe_recv, fe_send = fe.recv_multipart, fe.send_multipart
    be_recv, be_send = be.recv_multipart, be.send_multipart
    while True:
        events = dict(poller.poll())
        if be in events:
            for _ in range(DRAIN_BATCH):
                try:
                    frames = be_recv(_NOBLOCK)
                except zmq.Again:
                    break
                try:
                    fe_send(frames[1:])  # [client, payload]
                except zmq.ZMQError:  # EHOSTUNREACH: that client is gone
                    pass
        if fe in events:
            for _ in range(DRAIN_BATCH):
                try:
                    frames = fe_recv(_NOBLOCK)
                except zmq.Again:
                    break
                be_send([worker, *frames])  # [worker, client, rid, body]


# ------------------------------------------------------------------ worker


def run_worker(backend: str) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(backend)
    sock.send(READY)
    recv, send = sock.recv_multipart, sock.send_multipart
    # client id -> its active requests: [rid, n, next token index, per_step]
    active: dict[bytes, list[list[Any]]] = {}
    while True:
        if not active:
            sock.poll(-1)
        while True:
            try:
                client, rid, body = recv(_NOBLOCK)
            except zmq.Again:
                break
            b = _unpack(body)
            active.setdefault(client, []).append(
                [rid, int(b["max_tokens"]), 0, bool(b.get("per_step"))]
            )
        # One engine step: one token for every active request.
        for client in list(active):
            batch: list[tuple[Any, ...]] = []
            keep: list[list[Any]] = []
            for r in active[client]:
                rid, n, i, per_step = r
                if i + 1 < n:
                    rec: tuple[Any, ...] = (rid, _text(i), [i], None, None)
                    r[2] = i + 1
                    keep.append(r)
                else:
                    usage = {"prompt_tokens": 1, "completion_tokens": n}
                    rec = (rid, _text(i), [i], "length", {"usage": usage})
                if per_step:
                    batch.append(rec)
                else:
                    send([client, _pack([rec])])
            if batch:
                send([client, _pack(batch)])
            if keep:
                active[client] = keep
            else:
                del active[client]


_TEXTS: list[str] = []


def _text(i: int) -> str:
    """Token i's text, ``t{i} `` as the null engine writes it (cached: a floor makes no garbage)."""
    try:
        return _TEXTS[i]
    except IndexError:
        _TEXTS.extend(f"t{j} " for j in range(len(_TEXTS), 2 * i + 16))
        return _TEXTS[i]


# ------------------------------------------------------------------ client


class FloorClient:
    """The bare load generator: one DEALER, requests out, records in, tokens counted."""

    def __init__(self, frontend: str, timeout: float = 30.0) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)  # as zserve's clients
        self.sock.connect(frontend)
        self.timeout_ms = int(timeout * 1000)
        self._ids = 0
        self.messages = 0  # messages received so far

    def close(self) -> None:
        self.sock.close(0)

    def __enter__(self) -> FloorClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rid(self) -> bytes:
        self._ids += 1
        return b"%x" % self._ids

    def _recv(self) -> list[Any]:
        if not self.sock.poll(self.timeout_ms, zmq.POLLIN):
            raise TimeoutError(f"floor: no reply within {self.timeout_ms} ms")
        (payload,) = self.sock.recv_multipart()
        self.messages += 1
        recs: list[Any] = _unpack(payload)
        return recs

    def request(self, max_tokens: int) -> int:
        """One request, waited for; returns the number of token ids received."""
        rid = self._rid()
        self.sock.send_multipart([rid, _pack({"max_tokens": max_tokens})])
        got = 0
        while True:
            for rec in self._recv():
                if rec[0] != rid:
                    raise RuntimeError("floor: record for an unknown request")
                got += len(rec[2])
                if rec[3] is not None:
                    return got

    def streams(self, concurrency: int, max_tokens: int, per_step: bool) -> list[int]:
        """``concurrency`` requests at once; returns the token count of each."""
        body = _pack({"max_tokens": max_tokens, "per_step": per_step})
        counts: dict[bytes, int] = {}
        for _ in range(concurrency):
            rid = self._rid()
            counts[rid] = 0
            self.sock.send_multipart([rid, body])
        open_ = concurrency
        while open_:
            for rec in self._recv():
                counts[rec[0]] += len(rec[2])
                if rec[3] is not None:
                    open_ -= 1
        return list(counts.values())


# ------------------------------------------------------------------ processes


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.floor", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def start_floor(timeout: float = 20.0) -> tuple[Proc, Proc, str]:
    """Start the forwarder and the worker on ephemeral ports; return them and the frontend."""
    fd, ready = tempfile.mkstemp(prefix="zserve-floor-", suffix=".json")
    os.close(fd)
    os.unlink(ready)
    fwd = Proc(
        _cmd("forwarder", "--ready-file", ready), name="floor-forwarder", env=_env(), cwd=REPO_ROOT
    )
    worker: Proc | None = None
    try:
        wait_for(lambda: os.path.exists(ready) or not fwd.alive(), timeout, "the forwarder")
        if not fwd.alive():
            raise RuntimeError(f"floor forwarder exited with {fwd.popen.returncode}")
        with open(ready) as f:
            eps = json.load(f)
        worker = Proc(
            _cmd("worker", "--backend", eps["backend"]),
            name="floor-worker",
            env=_env(),
            cwd=REPO_ROOT,
        )
        # Readiness: a 1-token round trip (the forwarder holds clients until the worker is in).
        with FloorClient(eps["frontend"], timeout=timeout) as c:
            if c.request(1) != 1:
                raise RuntimeError("floor: bad warm-up reply")
    except BaseException:
        if worker is not None:
            worker.stop()
        fwd.stop()
        raise
    finally:
        if os.path.exists(ready):
            os.unlink(ready)
    return fwd, worker, eps["frontend"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    sub = ap.add_subparsers(dest="role", required=True)
    f = sub.add_parser("forwarder")
    f.add_argument("--frontend", default="tcp://127.0.0.1:*")
    f.add_argument("--backend", default="tcp://127.0.0.1:*")
    f.add_argument("--ready-file", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--backend", required=True)
    a = ap.parse_args(argv)
    try:
        if a.role == "forwarder":
            run_forwarder(a.frontend, a.backend, a.ready_file)
        else:
            run_worker(a.backend)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
