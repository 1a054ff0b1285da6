"""Starting the HTTP benchmarks' servers: logged process groups and readiness waits.

Built on `zserve.launcher.Proc` (each child leads its own process group;
``stop`` sends SIGTERM, then SIGKILL to the whole group). What this adds: the
child's output goes to a log file whose tail is shown when it dies or never
becomes ready, and readiness probes may raise while the server starts.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from zserve.launcher import Proc

STOP_GRACE = 2.0  # seconds between SIGTERM and SIGKILL


def log_tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


class LoggedProc(Proc):
    """A `Proc` whose output goes to `log_path`."""

    def __init__(self, argv: Sequence[str], name: str, log_path: Path, **popen: Any) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            super().__init__(
                argv, name, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, **popen
            )


def start_logged(
    stack: ExitStack,
    name: str,
    argv: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> LoggedProc:
    """Start `argv` in its own process group, output to `log_path`; stop it when `stack` closes."""
    proc = LoggedProc(argv, name, log_path, env=env, cwd=cwd)
    stack.callback(proc.stop, STOP_GRACE)
    return proc


def wait_ready(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    procs: Sequence[LoggedProc] = (),
    interval: float = 0.05,
) -> None:
    """Poll `ready()` until it returns True; raise if one of `procs` exits or `timeout` passes.

    Any exception from `ready` (connection refused while the server starts...)
    counts as "not yet".
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} exited with code {proc.popen.returncode}:\n"
                    + log_tail(proc.log_path)
                )
        try:
            if ready():
                return
        except Exception as exc:  # noqa: BLE001 - a starting server fails in many ways
            last_error = exc
        if time.monotonic() >= deadline:
            tails = "".join(f"\n--- {p.name}:\n{log_tail(p.log_path, 1500)}" for p in procs)
            raise TimeoutError(f"{what} not ready after {timeout:.0f} s ({last_error!r}){tails}")
        time.sleep(interval)
