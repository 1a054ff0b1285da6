"""Count the final records each request gets at a client.

Every request must end with exactly one final record, whatever the path
(retry, cancel, a dead worker, a slow client). The client library drops
records for requests it no longer tracks, so a second final would go
unseen: this wraps the client's own record router and counts them all.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

from zserve import protocol as p


class Finals(Counter[bytes]):
    """Final records seen, by request id."""

    def check(self) -> None:
        """No request got more than one final."""
        extra = {rid: n for rid, n in self.items() if n != 1}
        assert not extra, f"requests with more than one final: {extra}"

    def each_once(self) -> bool:
        """True when no request got more than one final (and some got one)."""
        self.check()
        return bool(self)


def tap_records(client: Any, see: Callable[[list[Any]], None]) -> None:
    """Show every TOKENS record that reaches ``client`` (a ``Client`` or an
    ``AsyncClient``) to ``see``, before the client's own router takes it."""
    core = client._core
    route = core.on_message

    def on_message(frames: list[bytes], now: float, *link: int) -> None:
        if len(frames) == 3 and frames[1] == p.C_TOKENS:
            try:
                recs = p.decode_tokens(frames[2])
            except ValueError:
                recs = []
            for r in recs:
                see(r)
        route(frames, now, *link)

    core.on_message = on_message


def count_finals(client: Any) -> Finals:
    """Start counting on ``client`` (a ``Client`` or an ``AsyncClient``)."""
    seen = Finals()

    def see(r: list[Any]) -> None:
        if r[3] is not None:
            seen[r[0]] += 1

    tap_records(client, see)
    return seen
