"""``zserve chat``: an interactive terminal chat over the broker (FastChat's
``fastchat.serve.cli``).

The conversation is kept as chat messages (an optional system message, then
user and assistant turns) and sent whole on every turn; each answer streams
as it arrives. ``/clear`` starts over, ``/exit`` or Ctrl-D leaves, Ctrl-C
during an answer stops it (closing the stream cancels the request on the
worker) and returns to the prompt; the part already shown stays in the
conversation. On a terminal the output goes through rich; otherwise it is
plain text, so the chat can be piped.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from zserve.client import Client
from zserve.errors import ZServeError

HELP = "/clear starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer"


@dataclass
class Turn:
    """One answer: its text and how it went."""

    text: str = ""
    stopped: bool = False  # Ctrl-C cut it short
    error: ZServeError | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    ttft: float | None = None  # seconds from sending to the first text
    elapsed: float = 0.0  # seconds from the first text to the end

    def stats(self) -> str:
        parts = []
        if self.prompt_tokens is not None:
            parts.append(f"{self.prompt_tokens} prompt tokens")
        parts.append(f"{self.completion_tokens} tokens")
        if self.ttft is not None:
            parts.append(f"first token {self.ttft * 1000:.0f} ms")
        if self.completion_tokens > 1 and self.elapsed > 0:
            parts.append(f"{(self.completion_tokens - 1) / self.elapsed:.1f} tok/s")
        if self.stopped:
            parts.append("stopped")
        return " · ".join(parts)


@dataclass
class Conversation:
    """The messages sent on every turn."""

    system: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)

    def clear(self) -> None:
        self.messages = []

    def request(self, user: str) -> list[dict[str, Any]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return [*head, *self.messages, {"role": "user", "content": user}]


class Output:
    """Where the chat writes: rich on a terminal, plain text elsewhere."""

    def __init__(self, stream: TextIO, rich: bool) -> None:
        self.stream = stream
        self.console: Any = None
        if rich:
            from rich.console import Console

            self.console = Console(file=stream, highlight=False, soft_wrap=True)

    def info(self, text: str) -> None:
        self._line(text, "dim")

    def error(self, text: str) -> None:
        self._line(text, "bold red")

    def stats(self, text: str) -> None:
        self._line(f"[{text}]", "dim")

    def token(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, end="", style="cyan", markup=False)
        else:
            self.stream.write(text)
        self.stream.flush()

    def end_answer(self) -> None:
        self.stream.write("\n")
        self.stream.flush()

    def _line(self, text: str, style: str) -> None:
        if self.console is not None:
            self.console.print(text, style=style, markup=False)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


class Chat:
    """A conversation with one model through a ``Client``."""

    def __init__(
        self,
        client: Client,
        model: str,
        out: Output,
        system: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> None:
        self.client = client
        self.model = model
        self.out = out
        self.conversation = Conversation(system or None)
        self.params = {k: v for k, v in (params or {}).items() if v is not None}

    def ask(self, user: str) -> Turn:
        """Stream one answer to the terminal; Ctrl-C stops it."""
        turn = Turn()
        messages = self.conversation.request(user)
        t0 = time.monotonic()
        first = 0.0
        stream = None
        try:
            stream = self.client.stream(self.model, messages=messages, **self.params)
            for d in stream:
                if d.text:
                    if turn.ttft is None:
                        first = time.monotonic()
                        turn.ttft = first - t0
                    turn.text += d.text
                    self.out.token(d.text)
                turn.completion_tokens += len(d.token_ids or ())
                if d.usage:
                    if "prompt_tokens" in d.usage:
                        turn.prompt_tokens = int(d.usage["prompt_tokens"])
                    if "completion_tokens" in d.usage:
                        turn.completion_tokens = int(d.usage["completion_tokens"])
        except KeyboardInterrupt:
            turn.stopped = True
        except ZServeError as e:
            turn.error = e
        finally:
            if stream is not None:
                stream.close()  # cancels the request on the worker if it still runs
        if turn.ttft is not None:
            turn.elapsed = time.monotonic() - first
        if turn.text or turn.stopped:
            self.out.end_answer()
        if turn.error is not None:
            self.out.error(f"error [{turn.error.code}]: {turn.error.message}")
            return turn  # a failed turn is not part of the conversation
        self.conversation.messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": turn.text},
        ]
        self.out.stats(turn.stats())
        return turn

    def loop(self, read: Callable[[str], str]) -> None:
        """Read lines until /exit or end of input."""
        while True:
            try:
                line = read("you> ")
            except EOFError:
                self.out.end_answer()
                return
            except KeyboardInterrupt:
                self.out.end_answer()
                self.out.info(f"({HELP})")
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/clear":
                self.conversation.clear()
                self.out.info("(conversation cleared)")
                continue
            if text == "/help":
                self.out.info(HELP)
                continue
            self.ask(line)


def run_chat(
    broker: str,
    model: str,
    system: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
    timeout: float = 60.0,
    stdout: TextIO | None = None,
    read: Callable[[str], str] | None = None,
    *,
    curve_secret: str | None = None,
    curve_server: str | None = None,
) -> int:
    """Chat until /exit or Ctrl-D. Returns 0, or the ``ZServeError`` whose code
    the CLI maps to an exit status when the broker or the model is missing
    (or refuses the CURVE handshake: ``curve_secret``/``curve_server`` are
    this client's secret key file and the broker's public one)."""
    out_stream = stdout or sys.stdout
    tty = out_stream.isatty()
    out = Output(out_stream, rich=tty)
    if read is None:
        if tty and sys.stdin.isatty():
            import readline  # noqa: F401 - line editing and history for input()
        read = input
    with Client(
        broker, timeout=timeout, connect_timeout=min(timeout, 5.0),
        curve_secret=curve_secret, curve_server=curve_server,
    ) as client:  # fmt: skip
        served = client.models()  # BrokerUnreachable here says so at once
        if model not in served:
            from zserve.errors import ModelNotFound

            have = ", ".join(sorted(served)) or "none"
            raise ModelNotFound(f"the broker does not serve {model!r} (it serves: {have})")
        chat = Chat(
            client, model, out, system, {"temperature": temperature, "max_tokens": max_tokens}
        )
        out.info(f"zserve chat with {model} via {broker}; {HELP}")
        chat.loop(read)
    return 0
