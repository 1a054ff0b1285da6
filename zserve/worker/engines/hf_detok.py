"""Incremental detokenization that never splits a UTF-8 character.

Byte-level tokenizers can end a token in the middle of a multibyte
character; decoding such a prefix yields U+FFFD. The detokenizer decodes a
short window of recent tokens (the offsets scheme of TGI and vLLM) and holds
text back while it ends in U+FFFD, so every piece it returns is whole
characters and the pieces concatenate to the full decoded text.

A resumed request primes it with the ids an earlier attempt generated
(``generated``): they are replayed token by token, as that attempt pushed
them, so a character whose first bytes were among them comes out whole with
the first new token that completes it, and the text they gave then is known
again (``replayed``): the part of it the caller had not received (held back
by a stop string) can be sent exactly as the first attempt would have sent it.
"""

from __future__ import annotations

from typing import Any

REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context, so that tokenizers which drop a
# leading space at the start of a decode (SentencePiece) decode the first
# generated tokens the way they decode inside the full text.
PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    ``push(ids)`` returns the new text those ids complete (possibly ""),
    ``flush()`` what was held back once the stream ends (a dangling partial
    character comes out as U+FFFD there, as a full decode would show it).
    ``generated``: ids already streamed (their text delivered elsewhere), the
    state to continue from; ``replayed`` is the text they gave, piece by piece
    as they were pushed then.
    """

    __slots__ = (
        "tokenizer", "ids", "prefix_offset", "read_offset", "skip_special_tokens", "replayed",
    )  # fmt: skip

    def __init__(
        self,
        tokenizer: Any,
        prompt_ids: list[int] | None = None,
        skip_special_tokens: bool = True,
        generated: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        context = list(prompt_ids[-PROMPT_CONTEXT:]) if prompt_ids else []
        self.ids: list[int] = context
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.replayed = "".join([self.push([t]) for t in generated or ()])

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, ids: list[int]) -> str:
        if not ids:
            return ""
        self.ids.extend(ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return full[len(prefix) :]
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if len(full) > len(prefix) else ""
