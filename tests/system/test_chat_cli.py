"""``zserve chat`` in a pseudo-terminal (pexpect), against a real broker and
null workers: streaming, history, /clear, Ctrl-C stops an answer on the
worker, Ctrl-D and /exit leave; plain text when stdout is not a terminal.

The null engine's ``prompt_tokens`` is the number of words in all the
messages it was sent, so the stats line under each answer shows what the
conversation held.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.conftest import FAST_HB, Stack
from zserve.launcher import wait_for, zserve_cmd

pexpect = pytest.importorskip("pexpect")


@pytest.fixture(scope="module")
def chat_stack() -> Iterator[Stack]:
    s = Stack()
    try:
        s.start_broker(*FAST_HB)
        s.worker("--model", "chatty", "--capacity", "2", "--token-delay", "0.01", *FAST_HB)
        s.worker("--model", "slow", "--capacity", "1", "--token-delay", "0.05", *FAST_HB)
        s.wait_workers(2)
        yield s
    finally:
        s.stop()


def spawn(stack: Stack, *args: str) -> pexpect.spawn:
    cmd = zserve_cmd("chat", "--broker", stack.frontend, *args)
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    child = pexpect.spawn(
        cmd[0], cmd[1:], env=env, encoding="utf-8", timeout=30, dimensions=(40, 120)
    )
    child.expect("zserve chat with")
    return child


def in_flight(stack: Stack, model: str) -> int:
    return sum(w["in_flight"] for w in stack.status()["workers"] if model in w["models"])


def test_chat_keeps_the_conversation_and_clears_it(chat_stack: Stack) -> None:
    child = spawn(chat_stack, "--model", "chatty", "--max-tokens", "5", "--system", "Be brief")
    try:
        child.expect_exact("you> ")
        child.sendline("hello")
        child.expect(r"t0 .*t1 .*t2 .*t3 .*t4")
        # system (2 words) + "hello"; 5 tokens
        child.expect_exact("[3 prompt tokens · 5 tokens · first token")
        child.expect_exact("tok/s]")
        child.expect_exact("you> ")
        child.sendline("again")  # + the answer (5 words) + "again"
        child.expect_exact("[9 prompt tokens · 5 tokens")
        child.expect_exact("you> ")
        child.sendline("/clear")
        child.expect_exact("(conversation cleared)")
        child.expect_exact("you> ")
        child.sendline("hello")
        child.expect_exact("[3 prompt tokens · 5 tokens")
        child.expect_exact("you> ")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)


def test_ctrl_c_stops_the_answer_on_the_worker(chat_stack: Stack) -> None:
    child = spawn(chat_stack, "--model", "slow", "--max-tokens", "2000")
    try:
        child.expect_exact("you> ")
        child.sendline("tell me a long story")
        child.expect(r"t3 ")  # it streams: the first tokens are on screen long before the end
        assert in_flight(chat_stack, "slow") == 1
        child.sendintr()  # Ctrl-C
        stopped = r"\[(\d+) tokens · first token \d+ ms · [\d.]+ tok/s · stopped\]"
        child.expect(stopped)
        assert 4 <= int(child.match.group(1)) < 2000
        child.expect_exact("you> ")
        wait_for(lambda: in_flight(chat_stack, "slow") == 0, 15, "the slow worker's slot to free")
        # The capacity-1 worker is free again: the next answer starts.
        child.sendline("and then")
        child.expect(r"t0 .*t1 ")
        child.sendintr()
        child.expect_exact("stopped]")
        child.expect_exact("you> ")
        child.sendintr()  # Ctrl-C at the prompt does not leave
        child.expect_exact("/exit or Ctrl-D leaves")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.close(force=True)
    wait_for(lambda: in_flight(chat_stack, "slow") == 0, 15, "the slow worker's slot to free")


def test_plain_text_when_not_a_terminal(chat_stack: Stack) -> None:
    out = subprocess.run(
        zserve_cmd(
            "chat", "--broker", chat_stack.frontend, "--model", "chatty", "--max-tokens", "3"
        ),
        input="hi there\n/exit\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "\x1b[" not in out.stdout  # no terminal escapes in a pipe
    assert "you> t0 t1 t2 \n[2 prompt tokens · 3 tokens · first token" in out.stdout


def test_unknown_model_exits_with_its_code(chat_stack: Stack) -> None:
    out = subprocess.run(
        zserve_cmd("chat", "--broker", chat_stack.frontend, "--model", "nope"),
        input="", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 3
    assert "model_not_found" in out.stderr and "chatty" in out.stderr
