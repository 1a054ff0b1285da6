"""Stop strings, applied once for every engine by the worker runtime."""

from __future__ import annotations


class StopMatcher:
    """Cuts a text stream at the first stop string.

    Text that could be the start of a stop string is held back until the
    next delta shows whether it is one, so a stop string never leaks out in
    pieces.
    """

    __slots__ = ("stops", "held", "_longest")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to send, whether a stop string ended the stream)."""
        if not self.stops:
            return text, False
        buf = self.held + text
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (cut == -1 or i < cut):
                cut = i
        if cut != -1:
            self.held = ""
            return buf[:cut], True
        hold = 0
        for k in range(min(self._longest - 1, len(buf)), 0, -1):
            tail = buf[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
                break
        self.held = buf[len(buf) - hold :] if hold else ""
        return (buf[: len(buf) - hold] if hold else buf), False

    def flush(self) -> str:
        """What was held back, once the stream ends without a stop string."""
        out, self.held = self.held, ""
        return out
