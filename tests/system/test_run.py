"""`zserve run`, the embedded stack: it serves, and Ctrl-C / SIGTERM leave nothing running."""

from __future__ import annotations

import signal
import time
import urllib.request

import psutil
import pytest

from tests.conftest import kill_children, start_run, wait_children_gone
from zserve import Client


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGINT], [signal.SIGINT, signal.SIGINT, signal.SIGTERM], [signal.SIGTERM]],
    ids=["ctrl-c", "ctrl-c-twice-then-term", "sigterm"],
)
def test_run_serves_then_stops_everything(signals: list[int]) -> None:
    proc, frontend, gw, lines = start_run("--engine", "null")
    children: list = []
    try:
        out = "".join(lines)
        assert "zserve generate" in out and f"127.0.0.1:{gw}/v1/chat/completions" in out
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # broker, worker, gateway
        with Client(frontend, timeout=10) as c:
            assert c.generate("tiny", "hi", max_tokens=3).text == "t0 t1 t2 "
        with urllib.request.urlopen(f"http://127.0.0.1:{gw}/health", timeout=5) as r:
            assert r.status == 200
        for sig in signals:  # to the parent only, as a terminal's Ctrl-C reaches it
            proc.popen.send_signal(sig)
            time.sleep(0.05)
        assert proc.popen.wait(30) == 0
        wait_children_gone(children, 15)
    finally:
        proc.stop()
        kill_children(children)
