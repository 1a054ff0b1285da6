"""The FastChat 0.2.36 baseline: its own venv, and its serving stack on ephemeral ports.

``fastchat_stack()`` starts, each in its own process group, FastChat's
``fastchat.serve.controller``, a null model worker built on FastChat's own
worker app (``bench/fastchat_null_worker.py``) and FastChat's
``fastchat.serve.openai_api_server``, waits until the API server lists the
model, yields its OpenAI base URL (``http://127.0.0.1:PORT/v1``) and kills
the three process groups on exit.

FastChat runs from a separate venv, ``bench/.venv-fastchat`` (gitignored),
made on first use by ``ensure_fastchat_venv()`` from PyPI: ``fschat==0.2.36``
with its default dependencies but none of its extras (no torch, no
transformers: the controller, the API server and ``BaseModelWorker`` do not
import them), plus ``uvloop`` and ``httptools`` so that uvicorn runs the same
event loop and HTTP parser as in the other rows of the benchmark.

PATCH: FastChat 0.2.36 calls pydantic v1's ``chunk.json(..., ensure_ascii=False)``
in ``fastchat/serve/openai_api_server.py``; pydantic 2 rejects that keyword,
so every streaming request fails out of the box. The set-up rewrites those
calls to ``chunk.model_dump_json(...)`` (same JSON; pydantic 2 never escapes
non-ASCII) in the venv's installed copy only. Nothing else in FastChat is
changed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from bench._procs import LoggedProc, start_logged, wait_ready
from zserve.launcher import free_port

logger = logging.getLogger(__name__)

FASTCHAT_VERSION = "0.2.36"
BENCH_DIR = Path(__file__).resolve().parent
VENV_DIR = BENCH_DIR / ".venv-fastchat"
NULL_WORKER = BENCH_DIR / "fastchat_null_worker.py"
# uvicorn picks uvloop and httptools when they are installed ("auto").
PACKAGES = [f"fschat=={FASTCHAT_VERSION}", "uvloop", "httptools"]
READY_MARKER = ".zserve-bench-ready"
STARTUP_TIMEOUT = 60.0

_JSON_CALL = re.compile(r"\.json\(([^()]*?),\s*ensure_ascii=False\)")


def venv_python(venv: Path = VENV_DIR) -> Path:
    return venv / "bin" / "python"


def ensure_fastchat_venv(venv: Path = VENV_DIR) -> Path:
    """Create (once) the FastChat venv and return its python; idempotent.

    A marker file written after a successful install and patch makes later
    calls skip the install; the (idempotent) patch is checked every time.
    """
    python = venv_python(venv)
    marker = venv / READY_MARKER
    if python.exists() and marker.exists() and marker.read_text().strip() == FASTCHAT_VERSION:
        patch_fastchat(venv)  # a no-op unless the installed copy was reverted
        return python
    started = time.monotonic()
    print(f"[fastchat] creating {venv} with fschat=={FASTCHAT_VERSION} from PyPI", file=sys.stderr)
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, *PACKAGES], check=True)
    patch_fastchat(venv)
    marker.write_text(FASTCHAT_VERSION + "\n")
    print(f"[fastchat] venv ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return python


def patch_fastchat(venv: Path = VENV_DIR) -> int:
    """Rewrite ``.json(..., ensure_ascii=False)`` to ``.model_dump_json(...)``; idempotent.

    Returns the number of calls rewritten (0 when already patched).
    """
    found = sorted(venv.glob("lib/python3*/site-packages/fastchat/serve/openai_api_server.py"))
    if not found:
        raise FileNotFoundError(f"fastchat is not installed in {venv}")
    path = found[-1]
    source = path.read_text()
    patched, count = _JSON_CALL.subn(r".model_dump_json(\1)", source)
    if count:
        path.write_text(patched)
        print(
            f"[fastchat] PATCHED {count} pydantic-1 `.json(..., ensure_ascii=False)` calls "
            f"to `.model_dump_json(...)` in {path} (pydantic 2 rejects them)",
            file=sys.stderr,
        )
    return count


def _post_json(url: str, body: dict | None = None, timeout: float = 2.0) -> dict:
    data = json.dumps(body or {}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def _get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


@contextmanager
def fastchat_stack(
    python: str | Path | None = None,
    *,
    model: str = "null",
    port: int | None = None,
    worker_concurrency: int = 1024,
    stream_interval: int = 2,
    startup_timeout: float = STARTUP_TIMEOUT,
    log_dir: str | Path | None = None,
) -> Iterator[str]:
    """Run FastChat's controller + null worker + OpenAI API server; yield the API's base URL.

    `python` is the FastChat venv's interpreter (made by `ensure_fastchat_venv`
    when None). `port` is the API server's port (a free one when None); the
    controller and the worker always get free ports. `stream_interval` is
    tokens per worker chunk (2: FastChat's ``model_worker`` default; 1: one
    chunk per token). `worker_concurrency` is the worker's semaphore
    (``--limit-worker-concurrency``). Logs go to `log_dir`
    (a temporary folder, removed on exit, when None).
    """
    host = "127.0.0.1"  # zserve.launcher.free_port() finds loopback ports
    python = os.path.abspath(python or ensure_fastchat_venv())  # the children run in log_dir
    with ExitStack() as stack:
        if log_dir is None:
            log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastchat-"))
        logs = Path(log_dir)
        logs.mkdir(parents=True, exist_ok=True)
        # PYTHONSAFEPATH: the null worker runs as a script from bench/, where
        # bench/http.py would shadow the standard library's http package.
        env = {**os.environ, "LOGDIR": str(logs), "PYTHONUNBUFFERED": "1", "PYTHONSAFEPATH": "1"}
        env.pop("PYTHONPATH", None)
        ctl_port, wrk_port = free_port(), free_port()
        api_port = port or free_port()
        controller = f"http://{host}:{ctl_port}"
        worker = f"http://{host}:{wrk_port}"
        api = f"http://{host}:{api_port}"
        procs: list[LoggedProc] = []

        def start(name: str, argv: list[str]) -> None:
            procs.append(start_logged(stack, name, argv, logs / f"{name}.out", env=env, cwd=logs))

        start(
            "controller",
            [python, "-m", "fastchat.serve.controller", "--host", host, "--port", str(ctl_port)],
        )
        wait_ready(
            lambda: "models" in _post_json(controller + "/list_models"),
            timeout=startup_timeout,
            what="FastChat controller",
            procs=procs,
        )
        start(
            "worker",
            [
                python,
                str(NULL_WORKER),
                "--host",
                host,
                "--port",
                str(wrk_port),
                "--controller-address",
                controller,
                "--model-names",
                model,
                "--limit-worker-concurrency",
                str(worker_concurrency),
                "--stream-interval",
                str(stream_interval),
            ],
        )
        # The worker registers before it listens; ask it directly first, since
        # the API server's /v1/models drops workers that do not answer.
        wait_ready(
            lambda: model in _post_json(worker + "/worker_get_status")["model_names"],
            timeout=startup_timeout,
            what="FastChat null worker",
            procs=procs,
        )
        start(
            "openai_api_server",
            [
                python,
                "-m",
                "fastchat.serve.openai_api_server",
                "--host",
                host,
                "--port",
                str(api_port),
                "--controller-address",
                controller,
            ],
        )
        listed = lambda: any(m["id"] == model for m in _get_json(api + "/v1/models")["data"])  # noqa: E731
        wait_ready(listed, timeout=startup_timeout, what="FastChat openai_api_server", procs=procs)
        logger.info("FastChat stack up: api %s, controller %s, worker %s", api, controller, worker)
        yield api + "/v1"
