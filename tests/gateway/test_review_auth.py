"""API keys (issue 19, defect 10): kept out of ``ps`` (a key file, the
environment), and a caller without one learns only the status: no model
names, no workers; ``/health`` and ``/ready`` cost one broker query a
second at most, however many probes come."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAST_HB, kill_children, start_run, wait_children_gone
from tests.gateway.conftest import start_gateway
from zserve.gateway.app import STATUS_TTL, Gateway
from zserve.gateway.errors import APIError
from zserve.launcher import Proc, start_broker, start_worker, wait_models, zserve_cmd

MODEL = "private-model-7"
FILE_KEY = "sk-from-the-file"
ENV_KEY = "sk-from-the-env"


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A gateway whose keys come from a file and from ZSERVE_API_KEYS."""
    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"# the gateway's keys\n\n  {FILE_KEY}  \n# sk-commented-out\n")
    broker, fe, be = start_broker(*FAST_HB)
    procs: list[Proc] = [broker]
    try:
        procs.append(start_worker(be, "--engine", "null", "--model", MODEL, *FAST_HB))
        env = {**os.environ, "ZSERVE_API_KEYS": ENV_KEY}
        wait_models(fe, [MODEL], 30)
        gateway, root = start_gateway(fe, "--api-keys-file", str(key_file), *FAST_HB, env=env)
        procs.append(gateway)
        worker_ids = [w["id"] for w in _status(fe)["workers"]]
        yield root, worker_ids[0]
    finally:
        for pr in reversed(procs):
            pr.stop()


def _status(frontend: str) -> dict[str, Any]:
    from zserve.client import Client

    with Client(frontend, timeout=10) as c:
        return c.status()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_stranger_learns_only_the_status(gw: tuple[str, str]) -> None:
    root, worker = gw
    for path in ("/health", "/ready"):
        r = httpx.get(root + path, timeout=10)
        assert r.status_code == 200, (path, r.text)
        assert MODEL not in r.text and worker not in r.text, (path, r.text)
    assert httpx.get(root + "/health", timeout=10).json() == {"status": "ok", "broker": "reachable"}
    assert httpx.get(root + "/ready", timeout=10).json() == {"ready": True}
    for path in ("/metrics", "/v1/models"):
        r = httpx.get(root + path, headers=bearer("sk-wrong"), timeout=10)
        assert r.status_code == 401, (path, r.text)
        assert MODEL not in r.text and worker not in r.text


@pytest.mark.parametrize("key", [FILE_KEY, ENV_KEY])
def test_keys_from_the_file_and_the_environment(gw: tuple[str, str], key: str) -> None:
    root, worker = gw
    models = httpx.get(root + "/v1/models", headers=bearer(key), timeout=10)
    assert models.status_code == 200 and [m["id"] for m in models.json()["data"]] == [MODEL]
    health = httpx.get(root + "/health", headers=bearer(key), timeout=10).json()
    assert health["models"] == [MODEL] and health["workers"] == 1
    ready = httpx.get(root + "/ready", headers=bearer(key), timeout=10).json()
    assert ready == {"ready": True, "workers": 1, "models": [MODEL]}
    metrics = httpx.get(root + "/metrics", headers=bearer(key), timeout=10)
    assert metrics.status_code == 200 and worker in metrics.text
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    r = httpx.post(root + "/v1/completions", json=body, headers=bearer(key), timeout=10)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "t0 t1 "


def test_commented_out_key_is_refused(gw: tuple[str, str]) -> None:
    r = httpx.get(gw[0] + "/v1/models", headers=bearer("sk-commented-out"), timeout=10)
    assert r.status_code == 401


def test_a_key_file_without_keys_fails_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n\n")
    for path in (str(empty), str(tmp_path / "missing")):
        r = subprocess.run(
            zserve_cmd("gateway", "--api-keys-file", path, "--port", "1"),
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert r.returncode == 2 and path in r.stderr, (r.returncode, r.stderr)


def test_zserve_run_passes_the_key_file_to_the_gateway(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text(FILE_KEY + "\n")
    proc, _, port, _ = start_run("--engine", "null", "--api-keys-file", str(key_file))
    children: list[Any] = []
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
        root = f"http://127.0.0.1:{port}"
        assert httpx.get(root + "/v1/models", timeout=10).status_code == 401
        r = httpx.get(root + "/v1/models", headers=bearer(FILE_KEY), timeout=10)
        assert r.status_code == 200
        assert "tiny" not in httpx.get(root + "/health", timeout=10).text
    finally:
        proc.stop()
        wait_children_gone(children, 15)
        kill_children(children)


# ------------------------------------------------- one query a second


class _CountingClient:
    """An AsyncClient stand-in that answers ``status`` and counts the calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    async def status(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0)  # the answer takes a loop turn, as a real one does
        if self.fail:
            raise APIError("no answer from the broker", "broker_unreachable")
        return {"workers": [{"id": "w"}], "models": [MODEL]}


def test_probes_share_one_broker_query_per_interval() -> None:
    async def main() -> None:
        gw = Gateway("tcp://127.0.0.1:1", api_keys=["k"])
        fake = _CountingClient()
        gw._client = fake  # type: ignore[assignment]
        now = [100.0]
        gw.clock = lambda: now[0]
        answers = await asyncio.gather(*(gw.broker_status() for _ in range(200)))
        assert fake.calls == 1 and all(a["models"] == [MODEL] for a in answers)
        now[0] += STATUS_TTL / 2
        await asyncio.gather(*(gw.broker_status() for _ in range(200)))
        assert fake.calls == 1
        now[0] += STATUS_TTL  # stale: one new query, failures shared alike
        fake.fail = True
        results = await asyncio.gather(
            *(gw.broker_status() for _ in range(50)), return_exceptions=True
        )
        assert fake.calls == 2
        assert all(isinstance(r, APIError) and r.code == "broker_unreachable" for r in results)
        await asyncio.gather(*(gw.broker_status() for _ in range(50)), return_exceptions=True)
        assert fake.calls == 2

    asyncio.run(main())
