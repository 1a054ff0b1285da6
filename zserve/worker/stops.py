"""Stop strings, applied once for every engine by the worker runtime.

Matching runs one Aho-Corasick automaton over the text, character by
character: the work per token is that of its characters, whatever the
number of stop strings (``protocol.MAX_STOP_STRINGS`` and
``MAX_STOP_LENGTH`` bound the automaton, built once per distinct list).
"""

from __future__ import annotations

from functools import lru_cache


class _Automaton:
    """The stop strings' trie with failure links.

    State 0 is the root. For each state: ``goto`` its children by character,
    ``fail`` the state of its longest proper suffix that is also in the trie,
    ``depth`` the length of the text it stands for, ``match`` the length of
    the longest stop string that ends it (0: none).
    """

    __slots__ = ("goto", "fail", "depth", "match")

    def __init__(self, stops: tuple[str, ...]) -> None:
        goto: list[dict[str, int]] = [{}]
        depth = [0]
        ends = [False]
        for s in stops:
            state = 0
            for ch in s:
                nxt = goto[state].get(ch)
                if nxt is None:
                    nxt = goto[state][ch] = len(goto)
                    goto.append({})
                    depth.append(depth[state] + 1)
                    ends.append(False)
                state = nxt
            ends[state] = True
        fail = [0] * len(goto)
        match = [depth[i] if ends[i] else 0 for i in range(len(goto))]
        order = list(goto[0].values())  # breadth first: a state's fail is done before it
        for state in order:
            for ch, child in goto[state].items():
                f = fail[state]
                while f and ch not in goto[f]:
                    f = fail[f]
                fail[child] = goto[f].get(ch, 0) if state else 0
                if not match[child]:
                    match[child] = match[fail[child]]
                order.append(child)
        self.goto = goto
        self.fail = fail
        self.depth = depth
        self.match = match

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


@lru_cache(maxsize=256)
def _automaton(stops: tuple[str, ...]) -> _Automaton:
    return _Automaton(stops)


class StopMatcher:
    """Cuts a text stream where the first stop string ends.

    Text that could be the start of a stop string is held back until the
    next delta shows whether it is one, so a stop string never leaks out in
    pieces. The cut does not depend on how the text is split into deltas:
    the stream ends at the first character that completes a stop string,
    before the longest stop string that ends there.
    """

    __slots__ = ("stops", "held", "_auto", "_state")

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.held = ""  # text not sent yet: its end may begin a stop string
        self._auto = _automaton(tuple(self.stops)) if self.stops else None
        self._state = 0

    def hold(self, text: str) -> None:
        """Resume with ``text`` held back, as an earlier attempt held it."""
        self.held = text
        if self._auto is not None:
            state = 0
            for ch in text:
                state = self._auto.step(state, ch)
            self._state = state

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to send, whether a stop string ended the stream)."""
        auto = self._auto
        if auto is None:
            if self.held:  # restored by ``hold``
                text, self.held = self.held + text, ""
            return text, False
        buf = self.held + text
        base = len(self.held)
        state = self._state
        step, match = auto.step, auto.match
        for i, ch in enumerate(text):
            state = step(state, ch)
            if match[state]:
                self.held = ""
                self._state = 0
                return buf[: base + i + 1 - match[state]], True
        self._state = state
        keep = auto.depth[state]
        if keep:
            self.held = buf[len(buf) - keep :]
            return buf[: len(buf) - keep], False
        self.held = ""
        return buf, False

    def flush(self) -> str:
        """What was held back, once the stream ends without a stop string."""
        out, self.held = self.held, ""
        self._state = 0
        return out
