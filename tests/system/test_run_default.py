"""`make run`'s default: ``zserve run`` with the hf engine on the tiny model.

The stack writes the tiny model itself (into a fresh directory here), serves
it through the native client and the gateway with the model's own greedy
output, and Ctrl-C leaves no process behind. test_run.py covers the signals
in detail on the null engine; this covers what ``make run`` really starts.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import threading
from pathlib import Path

import httpx
import psutil

from tests.conftest import kill_children, wait_children_gone
from tests.worker.reference import greedy_ref, load_reference, prompt_ids
from zserve import Client
from zserve.launcher import Proc, free_port, wait_for, zserve_cmd

PROMPT = "Hello, world"


def _lines(proc: Proc) -> queue.Queue[str | None]:
    """stdout lines as they come (None at EOF), read by a thread so that
    waiting for one has a deadline."""
    out: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            out.put(line)
        out.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return out


def test_run_default_hf_stack_serves_then_stops_everything(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny"  # not there yet: zserve run writes it
    fe, be, gw = (free_port() for _ in range(3))
    frontend = f"tcp://127.0.0.1:{fe}"
    proc = Proc(
        zserve_cmd(
            "run", "--model-dir", str(model_dir), "--frontend", frontend,
            "--backend", f"tcp://127.0.0.1:{be}", "--gateway-port", str(gw),
        ),
        name="run", stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        lines = _lines(proc)
        seen: list[str] = []

        def up() -> bool:
            while True:
                try:
                    line = lines.get_nowait()
                except queue.Empty:
                    return False
                assert line is not None, f"zserve run exited: {''.join(seen)}"
                seen.append(line)
                if line.startswith("Ctrl-C stops everything"):
                    return True

        wait_for(up, 600, "zserve run to print that it is up")
        out = "".join(seen)
        assert "writing the tiny model" in out and "(hf engine)" in out, out
        assert (model_dir / "config.json").is_file()
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # broker, worker, gateway

        ref = load_reference(model_dir)
        _, tok = ref
        expected = greedy_ref(ref, prompt_ids(ref, PROMPT), 8, ignore_eos=True)
        with Client(frontend, timeout=120) as c:
            assert c.models() == ["tiny"]
            r = c.generate("tiny", PROMPT, max_tokens=8, temperature=0, ignore_eos=True)
        assert r.token_ids == expected and r.finish_reason == "length"

        root = f"http://127.0.0.1:{gw}/v1"
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        resp = httpx.post(root + "/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["text"] == tok.decode(expected, skip_special_tokens=True)
        chat = {"model": "tiny", "max_tokens": 8,
                "messages": [{"role": "user", "content": "Hello"}]}  # fmt: skip
        resp = httpx.post(root + "/chat/completions", json=chat, timeout=120)
        assert resp.status_code == 200, resp.text
        assert 0 < resp.json()["usage"]["completion_tokens"] <= 8

        proc.popen.send_signal(signal.SIGINT)  # Ctrl-C, to the parent only
        assert proc.popen.wait(60) == 0
        wait_children_gone(children, 30)
    finally:
        proc.stop()
        kill_children(children)
