"""Structured outputs: the grammars that constrain decoding, shared by the engines.

A request opts in with ``SamplingParams.structured`` (``protocol.check_structured``):
``{type, value, whitespace, budget}``. This module turns it into an xgrammar
grammar (compiled once per distinct spec and tokenizer, cached) and gives each
request a ``RowState``: the grammar matcher, advanced with every token the
request produces, that masks the next token's logits. The engines only call
it: the hf engine on the constrained rows of its batch, the vllm engine from
its logits processor (``engines/vllm_grammar.py``); both run this same policy,
so they pick the same tokens.

Policy, beyond what the grammar allows:

* **Compact JSON** (``whitespace`` false, the default): JSON grammars allow
  no whitespace between tokens, so a model cannot spend ``max_tokens`` on
  newlines.
* **Valid within the budget** (``budget`` true, the default): the state keeps
  a shortest known way to close the value (``closing``: the open string, the
  required keys still missing, the open brackets) and what it costs in tokens
  (``need``, EOS included). While ``need + WINDOW < remaining`` only the
  grammar masks; inside that window the next token is one of the ``TOP_K``
  best allowed tokens after which the value can still close in time, or, when
  none can, the first token of the closing. Once the closing needs every
  token left, decoding follows it token by token. A reply is therefore
  complete and ends with EOS (``stop``) whenever ``max_tokens`` leaves room
  for the closing; otherwise it is cut at ``max_tokens`` (``length``). The
  closing is greedy, not minimal, and tuned to JSON (it also serves regexes,
  choices, EBNF and structural tags, through a fallback over single ASCII
  characters).
* Special tokens that are not EOS are never allowed (xgrammar would read
  ``<s>`` as three characters of text; the detokenizer drops it).

What it costs per token (``constrain_rows`` runs for every constrained row at
every step, so on a small model it is a share of each step; bench/structured
measures it): most rows need no mask. A greedy row whose best token the
grammar takes keeps it (accepted once, no bitmask); a row whose closing needs
every token left takes the closing's next token; a greedy row whose best
token is refused takes the best allowed one, read from its bitmask without
masking the logits. Inside a string whose content nothing constrains, a
token of whole characters without a quote or a backslash changes neither the
lexical state nor the closing and is taken on trust (fed to the matcher when
it is next needed), as is the closing a tight row follows: both were checked
against the grammar (``Grammars._plain_strings_hold``, ``closing``).

The policy is a pure function of the matcher, the lexical state (both rebuilt
by replaying ids) and the tokens left, so a resumed request replays its
delivered ids (``RowState.replay``) and decodes on as the uninterrupted one
would have.

xgrammar 0.2.8 compiles ``minLength``/``maxLength`` strings so that raw
control characters are allowed and escapes are not (upstream issue 800);
such strings are compiled as a ``pattern`` without control characters,
quotes or backslashes (``_string_bounds``), so the output stays valid JSON.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from zserve.protocol import ParamError, SamplingParams
from zserve.worker.engines.hf_sampling import argmax_rows

log = logging.getLogger(__name__)

WINDOW = 8  # the budget rule looks at candidates when need + WINDOW >= tokens left
TOP_K = 8  # candidates looked at inside the window
MAX_CLOSING = 256  # steps of the closing search before it gives up
CACHE_SIZE = 256  # compiled grammars kept per tokenizer
GREEDY_EPS = 1e-5  # temperatures below this are greedy (as in both engines)
_NEG_INF = float("-inf")
_LITTLE = sys.byteorder == "little"  # a bitmask word's bytes, lowest tokens first
# xgrammar's messages start with "[12:07:39] /project/cpp/file.cc:83: "
_XGR_PREFIX = re.compile(r"^\s*\[[\d:]+\]\s+\S+:\d+:\s*")
_STRING_CHARS = '[^"\\\\\\x00-\\x1f]'  # a JSON string character, escapes left out
_DIGITS = frozenset(b"0123456789")
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]+')  # bytes a JSON string takes raw
# Schema keys that constrain a string's content (or may: a key named so counts too).
_CONSTRAINED_STRINGS = re.compile(
    r'"(pattern|format|enum|const|minLength|maxLength|propertyNames|patternProperties|regex)"'
)
# Spec types whose closing tries JSON's characters first (``Lex.guesses``);
# the others (regex, choice, EBNF) search the allowed characters alone.
JSON_LIKE = frozenset({"json", "json_object", "structural_tag"})


def spec_key(spec: dict[str, Any]) -> str:
    """The cache key of a (canonical) spec: what the grammar depends on."""
    return json.dumps(
        [spec["type"], spec.get("value"), bool(spec.get("whitespace"))],
        sort_keys=True,
        ensure_ascii=False,
    )


def _message(e: BaseException) -> str:
    return _XGR_PREFIX.sub("", str(e)).strip().splitlines()[0] if str(e).strip() else repr(e)


def _string_bounds(schema: Any) -> Any:
    """``schema`` with bounded plain strings turned into patterns (the
    xgrammar 0.2.8 workaround in the module docstring)."""
    if isinstance(schema, list):
        return [_string_bounds(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for k, v in schema.items():
        out[k] = v if k in ("enum", "const", "default", "examples") else _string_bounds(v)
    if (
        out.get("type") == "string"
        and ("minLength" in out or "maxLength" in out)
        and not any(k in out for k in ("pattern", "format", "enum", "const"))
    ):
        lo = out.pop("minLength", 0)
        hi = out.pop("maxLength", None)
        if isinstance(lo, int) and (hi is None or isinstance(hi, int)):
            out["pattern"] = f"^{_STRING_CHARS}{{{lo},{'' if hi is None else hi}}}$"
    return out


def argmax_only(params: SamplingParams) -> bool:
    """Whether an engine reads only the argmax of this request's logits
    (greedy, no penalties, no logprobs): ``Grammars.row``'s ``greedy``."""
    return (
        params.temperature < GREEDY_EPS
        and params.repetition_penalty == 1.0
        and not params.presence_penalty
        and not params.frequency_penalty
        and params.logprobs is None
    )


def _choice_grammar(choices: list[str]) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class Grammars:
    """xgrammar for one tokenizer: its ``TokenizerInfo``, a compiler and the
    compiled grammars, cached by spec. Build it off the event loop (a large
    vocabulary takes a fraction of a second)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: frozenset[int] | set[int]):
        self.vocab_size = vocab_size
        self.stop_ids = sorted(int(t) for t in stop_ids if 0 <= t < vocab_size)
        self.stop_set = frozenset(self.stop_ids)
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=True)
        self._cache: OrderedDict[str, xgr.CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        specials = set(self.info.special_token_ids) | set(
            getattr(tokenizer, "all_special_ids", None) or ()
        )
        self.banned = sorted(t for t in specials if 0 <= t < vocab_size and t not in stop_ids)
        self.banned_set = frozenset(self.banned)
        # one bitmask row with the banned tokens' bits cleared
        allow = torch.ones(self.bitmask_width * 32, dtype=torch.bool)
        allow[self.banned] = False
        weights = torch.tensor([1 << b for b in range(32)], dtype=torch.int64)
        words = (allow.view(-1, 32).long() * weights).sum(-1)
        self.allow_bits = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
        self.allow_np = self.allow_bits.numpy()
        self._tokens: dict[bytes, list[int]] = {}
        # spec key -> (its strings are plain, (the closing from the start,)):
        # the start's closing search costs a few hundred microseconds
        self._starts: dict[str, tuple[bool, tuple[bytes | None] | None]] = {}
        # Text pieces: the bytes of each ordinary token, for the closing's tokens.
        self.pieces: dict[bytes, int] = {}
        self.decoded: list[bytes] = list(self.info.decoded_vocab)
        skip = specials | set(self.stop_ids)
        for tid, b in enumerate(self.decoded[:vocab_size]):
            if b and tid not in skip and b not in self.pieces:
                self.pieces[b] = tid
        self.max_piece = max((len(b) for b in self.pieces), default=1)
        # Tokens that stay inside a JSON string and leave it at a character's
        # end: whole UTF-8 characters, no quote, no backslash, no control
        # character (JSON refuses those raw) (``RowState._plain``).
        self.plain = [
            t not in skip and bool(b) and _PLAIN.fullmatch(b) is not None and _whole_utf8(b)
            for t, b in enumerate(self.decoded[:vocab_size])
        ] + [False] * max(0, vocab_size - len(self.decoded))
        # Tokens no JSON string takes at a character's end: a control character
        # or a byte that cannot start a UTF-8 character first (``RowState.pick``).
        self.no_string = [
            bool(b) and (b[0] < 0x20 or 0x80 <= b[0] < 0xC2 or b[0] >= 0xF5)
            for b in self.decoded[:vocab_size]
        ] + [False] * max(0, vocab_size - len(self.decoded))
        # printable ASCII characters with a token of their own, for the closing's fallback
        self.ascii = [(chr(c), self.pieces[bytes((c,))]) for c in range(0x21, 0x7F)
                      if bytes((c,)) in self.pieces]  # fmt: skip

    @property
    def bitmask_width(self) -> int:
        return (self.vocab_size + 31) // 32

    def compile(self, spec: dict[str, Any]) -> xgr.CompiledGrammar:
        """The compiled grammar of a canonical spec; ``ParamError`` (a
        ValueError naming ``structured``) when it does not compile."""
        key = spec_key(spec)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def cached(self, spec: dict[str, Any]) -> bool:
        with self._lock:
            return spec_key(spec) in self._cache

    def _compile(self, spec: dict[str, Any]) -> xgr.CompiledGrammar:
        kind, value, ws = spec["type"], spec.get("value"), bool(spec.get("whitespace"))
        c = self.compiler
        what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex",
                "choice": "choice", "grammar": "grammar", "structural_tag": "structural tag"}
        try:
            if kind in ("json", "json_object"):
                schema = {"type": "object"} if kind == "json_object" else value
                if isinstance(schema, bool):
                    schema = {} if schema else {"not": {}}
                return c.compile_json_schema(
                    json.dumps(_string_bounds(schema)),
                    any_whitespace=ws,
                    separators=None if ws else (",", ":"),
                    strict_mode=True,
                )
            if kind == "regex":
                return c.compile_regex(value)
            if kind == "choice":
                return c.compile_grammar(_choice_grammar(value))
            if kind == "grammar":
                try:
                    return c.compile_grammar(value)
                except Exception as ebnf_error:  # EBNF first; Lark as vLLM takes it too
                    try:
                        return c.compile_lark(value)
                    except Exception:
                        raise ebnf_error from None
            if kind == "structural_tag":
                return c.compile_structural_tag(json.dumps(value))
        except Exception as e:
            msg = f"structured {what.get(kind, kind)} does not compile: {_message(e)}"
            raise ParamError(msg, "structured") from None
        raise ParamError(f"structured type {kind!r} is unknown", "structured")

    def tokens(self, text: bytes) -> list[int]:
        """``text`` as ordinary tokens, longest piece first (cached). A prefix
        of these tokens spells a prefix of ``text`` and the rest spell the
        rest, so forcing them one by one keeps the count exact."""
        hit = self._tokens.get(text)
        if hit is not None:
            return hit
        pieces, most = self.pieces, self.max_piece
        out: list[int] = []
        i = 0
        while i < len(text):
            for n in range(min(most, len(text) - i), 0, -1):
                t = pieces.get(text[i : i + n])
                if t is not None:
                    out.append(t)
                    i += n
                    break
            else:  # a byte no token spells (not in byte-level vocabularies): count it
                out.append(self.stop_ids[0] if self.stop_ids else 0)
                i += 1
        if len(self._tokens) >= 4096:
            self._tokens.clear()
        self._tokens[text] = out
        return out

    def row(self, spec: dict[str, Any], max_tokens: int | None, greedy: bool = False) -> RowState:
        """A new request's state: ``max_tokens`` is what this attempt may still
        generate (the budget rule's horizon; None: no budget rule); ``greedy``:
        the engine reads only the argmax of this row (``is_greedy``)."""
        key = spec_key(spec)
        compiled = self.compile(spec)
        json_like = spec["type"] in JSON_LIKE
        known = self._starts.get(key)
        if known is None:
            start = RowState(self, compiled, 1 << 30, True, json_like=json_like).close
            plain = (
                spec["type"] in ("json", "json_object")
                and not _CONSTRAINED_STRINGS.search(json.dumps(spec.get("value")))
                and self._plain_strings_hold(compiled, start)
            )
            known = (plain, (start,))
            if len(self._starts) >= CACHE_SIZE:
                self._starts.clear()
            self._starts[key] = known
        budget = bool(spec.get("budget", True))
        return RowState(self, compiled, max_tokens, budget, json_like=json_like, greedy=greedy,
                        plain_strings=known[0], start=known[1])  # fmt: skip

    def _plain_strings_hold(self, compiled: xgr.CompiledGrammar, start: bytes | None) -> bool:
        """Whether this grammar takes every ``plain`` token inside a value
        string, as a JSON string whose content nothing constrains does: the
        rows then take such tokens on trust (``RowState._plain``). Checked
        once per spec, at the first value string of the closing from the
        start (or of ``{"k":"`` when that has none)."""
        m = xgr.GrammarMatcher(compiled, override_stop_tokens=self.stop_ids or None)
        prefix = _value_string_prefix(start or b"") or b'{"k":"'
        if not m.accept_string(prefix):
            return False
        bm = xgr.allocate_token_bitmask(1, self.vocab_size)
        m.fill_next_token_bitmask(bm, 0)
        allowed = _bool_mask(bm[0], self.vocab_size)
        plain = torch.tensor(self.plain[: self.vocab_size], dtype=torch.bool)
        return bool(allowed[plain].all())


class Lex:
    """A small JSON lexical state, enough to order the closing's guesses."""

    __slots__ = ("in_str", "esc", "stack", "digit", "utf8", "key", "want_key")

    def __init__(self) -> None:
        self.in_str = False
        self.esc = False
        self.stack: list[int] = []
        self.digit = False
        self.utf8 = 0  # continuation bytes still due in a multi-byte character
        self.key = False  # the open string is an object's key (a schema constrains those)
        self.want_key = False  # a string opened here would be a key

    def at(self) -> tuple[bool, bool, int]:
        """Where a token starts: in a value string (not a key), after a
        backslash, mid-character."""
        return self.in_str and not self.key, self.esc, self.utf8

    def copy(self) -> Lex:
        n = Lex()
        n.in_str, n.esc, n.stack, n.digit = self.in_str, self.esc, list(self.stack), self.digit
        n.utf8, n.key, n.want_key = self.utf8, self.key, self.want_key
        return n

    def feed(self, data: bytes) -> None:
        for c in data:
            if 0x80 <= c < 0xC0:
                self.utf8 = max(0, self.utf8 - 1)
            else:
                self.utf8 = 0 if c < 0x80 else 1 if c < 0xE0 else 2 if c < 0xF0 else 3
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == 0x5C:  # backslash
                    self.esc = True
                elif c == 0x22:  # quote
                    self.in_str = False
                continue
            self.digit = c in _DIGITS
            if c == 0x22:
                self.in_str = True
                self.key, self.want_key = self.want_key, False
            elif c in (0x7B, 0x5B):  # { [
                self.stack.append(c)
                self.want_key = c == 0x7B
            elif c == 0x2C:  # ,
                self.want_key = bool(self.stack) and self.stack[-1] == 0x7B
            elif c in (0x7D, 0x5D, 0x3A):  # } ] :
                self.want_key = False
                if c != 0x3A and self.stack:
                    self.stack.pop()

    def opens(self, data: bytes) -> bool:
        """Whether ``data`` from this state opens a new element: a ``,``,
        ``[`` or ``{`` outside a string."""
        in_str, esc = self.in_str, self.esc
        for c in data:
            if in_str:
                if esc:
                    esc = False
                elif c == 0x5C:  # backslash
                    esc = True
                elif c == 0x22:  # quote
                    in_str = False
            elif c in (0x2C, 0x5B, 0x7B):  # , [ {
                return True
            elif c == 0x22:
                in_str = True
        return False

    def guesses(self) -> list[str]:
        """Single characters to try, most likely to close first."""
        if self.in_str:
            return ["n", '"', "\\"] if self.esc else ['"']
        closer = []
        if self.stack:
            closer = ["}" if self.stack[-1] == 0x7B else "]"]
        if self.digit:
            return [*closer, ",", "}", "]"]
        return [*closer, "0", '"', "n", "t", "f", "[", "{", ":", ","]


class RowState:
    """One request's grammar: advance it with ``accept``, mask with ``constrain``
    (or ``constrain_rows`` for a batch).

    With the budget rule on it keeps ``close``, a text that completes the
    value from the current state, and ``need``, its tokens plus EOS. After
    each token the closing is carried forward rather than searched again: its
    rest when the token spelled its beginning, itself when it still completes
    the value, else a new search (``closing``). That makes it a function of
    the tokens accepted so far, so a replay rebuilds it exactly."""

    def __init__(
        self,
        g: Grammars,
        compiled: xgr.CompiledGrammar,
        max_tokens: int | None,
        budget: bool,
        json_like: bool = True,
        greedy: bool = False,
        plain_strings: bool = False,
        start: tuple[bytes | None] | None = None,
    ) -> None:
        self.g = g
        self.json_like = json_like  # the closing tries JSON's characters first
        # No string of the grammar has constrained content (no pattern, format,
        # enum, const or length): a token inside one keeps the closing valid.
        self.plain_strings = plain_strings
        self._m = xgr.GrammarMatcher(compiled, override_stop_tokens=g.stop_ids or None)
        # Tokens taken on trust and not yet fed to the matcher (``m``): a
        # plain string's content, and the closing the rows follow when tight.
        self._pend: list[int] = []
        self.done = False  # the grammar took EOS (``m.is_terminated()``, kept by ``accept``)
        self.lex = Lex()
        self.max_tokens = max_tokens
        self.budget = budget and max_tokens is not None
        self.n_out = 0  # tokens accepted as this attempt's output
        # Greedy, without penalties or logprobs: only the argmax of this row
        # is read, so a row whose best token the grammar allows needs no mask.
        self.greedy = greedy
        self._scratch: torch.Tensor | None = None
        # the token ``constrain_rows`` already accepted for this step (``take``)
        # and the state before it (``_undo``), should the engine sample another
        self._taken: int | None = None
        self._undo: tuple[Any, ...] | None = None
        self.close: bytes | None = None
        self.need: int | None = None
        self.need0 = 0  # the whole value's shortest closing: what a new element may cost
        if self.budget:  # ``start``: the closing from the start, known from an earlier row
            self._set_close(start[0] if start is not None else self.closing(self.m, self.lex))
            self.need0 = self.need or 0

    @property
    def m(self) -> xgr.GrammarMatcher:
        """The grammar matcher, fed first with the tokens taken on trust."""
        if self._pend:
            self._feed()
        return self._m

    @m.setter
    def m(self, matcher: xgr.GrammarMatcher) -> None:
        self._pend.clear()
        self._m = matcher

    def _feed(self) -> None:
        """The tokens taken on trust into the matcher: all but the last as one
        string (each call into xgrammar lets the event loop's thread take the
        GIL, which a step pays for in waits), the last as a token, so that a
        ``rollback(1)`` still takes back exactly one token."""
        pend, self._pend = self._pend, []
        m, g = self._m, self.g
        head = pend[:-1]
        if any(t in g.stop_set for t in head):  # (a stop token ends a reply: not here)
            ok = all(m.accept_token(t) for t in head)
        else:
            ok = not head or m.accept_string(b"".join(g.decoded[t] for t in head))
        if not (ok and m.accept_token(pend[-1])):  # cannot happen: only what it takes is trusted
            log.error("structured output: the grammar refused tokens taken on trust (%s)", pend)

    @property
    def delivered(self) -> int:
        """Output tokens the engine has confirmed (``accept``): ``n_out`` less
        a ``take`` still waiting for its ``accept``."""
        return self.n_out - (self._taken is not None)

    @property
    def terminated(self) -> bool:
        """The grammar accepted EOS: the request is complete."""
        return self.done

    def accept(self, token: int, output: bool = True) -> bool:
        """Advance with ``token``; False (state unchanged) if the grammar refuses it."""
        if self._taken is not None:  # advanced by ``take`` when the batch was masked
            taken, self._taken = self._taken, None
            if taken == token:
                return True
            self._restore()  # the engine sampled another token: back to before the take
        if self._plain(token):  # taken on trust; nothing else changes
            self._pend.append(token)
            if output:
                self.n_out += 1
            return True
        if not self.m.accept_token(token):
            return False
        self.done = token in self.g.stop_set  # (only a stop token ends the grammar)
        data = b""
        if 0 <= token < len(self.g.decoded) and token not in self.g.stop_ids:
            data = self.g.decoded[token]
        before = self.lex.at()
        self.lex.feed(data)
        if output:
            self.n_out += 1
        if self.budget and not self.done:
            self._set_close(self._carried(self.m, before, self.lex, data))
        return True

    def _plain(self, token: int) -> bool:
        """Whether ``token``, next, leaves the lexical state and the closing as
        they are, and the grammar takes it (so it is taken on trust): inside
        a value string (not a key), at a character's end, it spells whole
        characters, no quote, no backslash, no control character
        (``Grammars.plain``), and no string's content is constrained
        (``plain_strings``, checked against the grammar). Most of a long
        string's tokens are such."""
        lex = self.lex
        return (
            lex.in_str
            and not lex.key
            and not lex.esc
            and not lex.utf8
            and 0 <= token < len(self.g.plain)
            and self.g.plain[token]
            and self.plain_strings
            and (not self.budget or bool(self.close))
        )

    def replay(self, ids: list[int]) -> bool:
        """A resumed request: advance through the ids an earlier attempt delivered."""
        return all(self.accept(t, output=False) for t in ids)

    def _set_close(self, text: bytes | None) -> None:
        self.close = text
        self.need = None if text is None else len(self.g.tokens(text)) + 1

    def _carried(
        self, m: xgr.GrammarMatcher, before: tuple[bool, bool, int], lex: Lex, data: bytes
    ) -> bytes | None:
        """The closing from ``m`` and ``lex`` (the state after a token that
        spelled ``data``; ``before``: ``Lex.at`` before it), carried forward
        from ``self.close``."""
        c = self.close
        if c is not None:
            if data and c.startswith(data):
                return c[len(data) :]
            if c:
                s = self._in_string(m, before, lex, data)
                if s is not None:
                    return s
                f = m.fork()
                if f.accept_string(c) and f.is_completed():
                    return c
        return self.closing(m, lex)

    def _in_string(
        self, m: xgr.GrammarMatcher, before: tuple[bool, bool, int], lex: Lex, data: bytes
    ) -> bytes | None:
        """The closing after a token that stayed inside a string whose content
        nothing constrains (None for any other token): ``self.close`` itself
        after whole characters; its rest after continuation bytes it spelled;
        after a token that leaves a character open, that character's
        continuation bytes (the first ones ``closing`` would find) and then
        the string's closing, checked once. The closing search would take
        tens of microseconds for each; a byte-level vocabulary's model emits
        such tokens often."""
        in_str, esc, p = before
        c = self.close
        if (
            not self.plain_strings
            or not in_str
            or esc
            or not lex.in_str
            or lex.key
            or lex.esc
            or not c
            or b'"' in data
            or b"\\" in data
        ):
            return None
        q = lex.utf8
        if p:  # a character was open: ``c`` starts with its p continuation bytes
            k = 0
            while k < min(p, len(data)) and 0x80 <= data[k] < 0xC0:
                k += 1
            if k == len(data):
                return c[k:]  # more of the character, not all of it
            if k < p:
                return None
        base = c[p:]  # the string's closing from the end of a character
        if not q:
            return base
        if base[:1] != b'"':
            return None
        last = data[-1]  # the lead byte, when it ends the token: its first continuation
        first = b"\xa0" if last in (0xE0, 0xF0) else b"\x80"  # is narrower (as in closing)
        text = (first if last >= 0xC0 else b"\x80") + b"\x80" * (q - 1) + base
        f = m.fork()
        return text if f.accept_string(text) and f.is_completed() else None

    # ---------------------------------------------------------------- masking

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """The grammar's allowed tokens into ``bitmask[row]`` (only EOS once
        the grammar has taken EOS: nothing may follow)."""
        if self.done:
            bitmask[row].zero_()
            t = (self.g.stop_ids or [0])[0]
            bit = 1 << (t & 31)
            bitmask[row, t >> 5] = bit - (1 << 32) if bit >= 1 << 31 else bit
            return
        self.m.fill_next_token_bitmask(bitmask, row)

    def constrain(self, logits: torch.Tensor, bitmask: torch.Tensor, row: int) -> None:
        """Mask ``logits[row]`` (``logits`` [N, V], or [V] with ``row`` 0) to
        the tokens this state allows next; ``bitmask`` [>row, ceil(V/32)] int32
        is scratch space for the grammar's mask."""
        if logits.dim() == 1:
            rows: list[RowState | None] = [self]
            constrain_rows(logits.unsqueeze(0), rows, bitmask[row : row + 1])
            return
        rows = [None] * logits.shape[0]
        rows[row] = self
        constrain_rows(logits, rows, bitmask)

    def take(self, token: int, check: bool = False) -> bool:
        """Accept ``token`` now, if the grammar (and the ban on special tokens)
        allows it, for the engine's next ``accept`` of it to confirm (another
        token there undoes this one first). ``check``: the budget rule has a
        say at this step (``in_window`` or ``at_opener``), and ``token`` is
        taken only if the value can still close in time after it: the test
        ``steer`` applies to each candidate, so a greedy row whose best token
        passes it needs neither a mask nor ``steer``."""
        if token in self.g.banned_set:
            return False
        if self._plain(token):  # taken on trust: nothing but ``n_out`` changes
            if check and not self._fits(1):
                return False
            self._undo = (_TRUSTED, self.lex, self.close, self.need, self.done, self.n_out)
            self._pend.append(token)
            self.n_out += 1
            self._taken = token
            return True
        undo = (None, self.lex.copy(), self.close, self.need, self.done, self.n_out)
        if not self.accept(token):
            return False
        if check and token not in self.g.stop_ids and not self._fits(0):
            self._undo = undo
            self._restore()
            return False
        self._taken, self._undo = token, undo
        return True

    def _follow(self, t: int) -> bool:
        """``take`` of the closing's next token ``t`` on trust: the closing was
        checked against the grammar when it was found, and any tokens that
        spell its bytes spell what was checked. False (nothing done) for
        a token that does not spell its beginning (``tokens``' stand-in for
        a byte no token spells)."""
        c = self.close
        if c is None:
            return False
        stop = t in self.g.stop_ids
        data = b"" if stop else self.g.decoded[t]
        if (not stop and not (data and c.startswith(data))) or (stop and c):
            return False
        self._undo = (_TRUSTED, self.lex.copy(), c, self.need, self.done, self.n_out)
        self._pend.append(t)
        if stop:
            self.done = True
        else:
            self.lex.feed(data)
            self._set_close(c[len(data) :])
        self.n_out += 1
        self._taken = t
        return True

    def _restore(self) -> None:
        """Back to the state before the last ``take`` (or ``steer``'s commit)."""
        assert self._undo is not None
        m, self.lex, self.close, self.need, self.done, self.n_out = self._undo
        if m is _TRUSTED and self._pend:
            self._pend.pop()
        elif m is None or m is _TRUSTED:
            self.m.rollback(1)
        else:
            self.m = m
        self._undo = self._taken = None

    def _fits(self, used: int) -> bool:
        """Whether the closing still fits in what is left after ``used`` more tokens."""
        assert self.max_tokens is not None
        return self.need is not None and self.need <= self.max_tokens - self.n_out - used

    def pick(self, best: int | None) -> int | None:
        """This step's token when the row needs no mask, taken (``take``):
        the closing's next token when the closing needs every token left
        (no token that keeps it can fit), else ``best`` (a greedy row's
        argmax; None for a sampled row) when the grammar takes it and,
        where the budget rule has a say (``in_window``, ``at_opener``), the
        value can still close after it. None: the row needs its mask. (The
        tests of ``in_window`` and ``at_opener`` in one pass: this runs for
        every row at every step.)"""
        if self.done:
            return None
        check = False
        need = self.need
        if self.budget and need is not None:
            left = self.max_tokens - self.n_out  # type: ignore[operator]
            if need >= left:  # tight
                t = self.forced()
                return t if self._follow(t) or self.take(t) else None
            if best is not None:
                check = need + WINDOW >= left or (
                    need + self.need0 + WINDOW >= left
                    and self.lex.opens(self.g.decoded[best] if best < len(self.g.decoded) else b"")
                )
        if best is None or not self.greedy:
            return None
        lex = self.lex
        if lex.in_str and not lex.esc and not lex.utf8 and self.g.no_string[best]:
            return None  # the grammar refuses it (``Grammars.no_string``): the mask picks
        return best if self.take(best, check) else None

    def in_window(self) -> bool:
        """Whether the budget rule has a say at this step."""
        if not self.budget or self.need is None or self.done:
            return False
        assert self.max_tokens is not None
        return self.need + WINDOW >= self.max_tokens - self.n_out

    def at_opener(self, x: torch.Tensor | int) -> bool:
        """Whether the budget rule must look at this step although it is
        outside the window: a new element (a ``,``, ``[`` or ``{`` outside a
        string) can cost as much as the whole value (``need0``), so with less
        than that left beyond ``need`` a greedy row whose best token opens
        one, and a sampled row outside a string, are steered. (The window
        alone let an array of parallel tool calls start one more call than
        ``max_tokens`` could close.) ``x``: the row's logits, or their argmax
        when the caller has it."""
        if not self.budget or self.need is None or self.done:
            return False
        assert self.max_tokens is not None
        if self.need + self.need0 + WINDOW < self.max_tokens - self.n_out:
            return False
        if not self.greedy and not self.lex.in_str:
            return True
        t = x if isinstance(x, int) else int(x.argmax())
        return self.lex.opens(self.g.decoded[t] if t < len(self.g.decoded) else b"")

    def steer(self, x: torch.Tensor, anyway: bool = False, commit: bool = False) -> int | None:
        """The budget rule on one masked row of logits (see the module
        docstring; ``anyway``: outside the window, ``at_opener``). A greedy
        row keeps only the best token that fits. ``commit`` (a greedy row of
        the hf engine, which samples its argmax right after): the kept token,
        when it was found among the candidates, is accepted here with the
        state its check built (as ``take`` does) and returned."""
        if not anyway and not self.in_window():
            return None
        assert self.max_tokens is not None
        remaining = self.max_tokens - self.n_out
        k = min(TOP_K, x.shape[-1])
        vals, ids = torch.topk(x, k)
        keep: list[int] = []
        stops = self.g.stop_ids
        chosen: tuple[xgr.GrammarMatcher, Lex, bytes] | None = None  # a greedy keep's state
        stuck = bool(self.close) and not self._fits(1)  # a token that keeps the closing fails
        for v, t in zip(vals.tolist(), ids.tolist(), strict=True):
            if v == _NEG_INF or v != v:  # masked, or NaN
                break
            if t in stops:
                keep.append(t)
            else:
                data = self.g.decoded[t] if t < len(self.g.decoded) else b""
                if stuck and self._plain(t):
                    continue  # it keeps the closing (``_carried``), which does not fit
                f = self.m.fork()
                if not f.accept_token(t):
                    continue
                lex = self.lex.copy()
                lex.feed(data)
                c = self._carried(f, self.lex.at(), lex, data)
                if c is not None and len(self.g.tokens(c)) + 1 <= remaining - 1:
                    keep.append(t)
                    chosen = (f, lex, c)
            if keep and self.greedy:
                break
        if not keep:
            forced = self.forced()
            if not self.m.fork().accept_token(forced):  # never a token the grammar refuses
                allowed = [t for v, t in zip(vals.tolist(), ids.tolist(), strict=True)
                           if v != _NEG_INF and v == v]  # fmt: skip
                forced = allowed[0] if allowed else forced
            keep = [forced]
        if self.greedy:  # argmax is all that is read from a greedy row
            if commit and chosen is not None and keep[0] not in stops:
                # the sampler uses the returned token as is: the row is not read
                self._undo = (self.m, self.lex, self.close, self.need, self.done, self.n_out)
                self.m, self.lex, close = chosen
                self.n_out += 1
                self._set_close(close)
                self._taken = keep[0]
                return keep[0]
            x.fill_(_NEG_INF)
            x[keep[0]] = 0.0
            return None
        _only(x, keep)
        return None

    def forced(self) -> int:
        """The first token of the closing (EOS once the value is complete)."""
        text = self.close
        if text:
            return self.g.tokens(text)[0]
        if text == b"" and self.g.stop_ids:
            return self.g.stop_ids[0]
        # no closing known: the best we can do is any allowed token
        bm = self._bitmask()
        self.m.fill_next_token_bitmask(bm, 0)
        allowed = _allowed(bm[0], self.g.vocab_size)
        return allowed[0] if allowed else (self.g.stop_ids[:1] or [0])[0]

    def closing(self, m: xgr.GrammarMatcher, lex: Lex) -> bytes | None:
        """A short text that completes the grammar from ``m`` (b"" when it
        is complete); None when none was found. Greedy, not minimal."""
        if m.is_completed():
            return b""
        f = m.fork()
        lex = lex.copy()
        out = bytearray()
        last = ""
        for _ in range(MAX_CLOSING):
            if f.is_completed():
                return bytes(out)
            jump = f.find_jump_forward_string()
            if jump:
                b = jump.encode()
                if not f.accept_string(b):
                    return None
                out += b
                lex.feed(b)
                continue
            if lex.utf8:  # inside a multi-byte character: finish it first
                tail = next((b for b in _CONTINUATIONS if f.accept_string(b)), None)
                if tail is None:
                    return None
                out += tail
                lex.feed(tail)
                continue
            guesses = lex.guesses() if self.json_like else ()
            step = next((c for c in guesses if f.accept_string(c)), None)
            if step is None:
                step = self._fallback(f, last)
                if step is None:
                    return None
                f.accept_string(step)
            last = step
            out += step.encode()
            lex.feed(step.encode())
        return None

    def _fallback(self, f: xgr.GrammarMatcher, last: str) -> str | None:
        """An allowed printable ASCII character: one that completes the
        grammar if any, else the first that differs from the last one taken."""
        bm = self._bitmask()
        f.fill_next_token_bitmask(bm, 0)
        words = bm[0].tolist()
        ok = [c for c, t in self.g.ascii if (words[t >> 5] >> (t & 31)) & 1]
        if not ok:
            return None
        for c in ok:
            probe = f.fork()
            if probe.accept_string(c) and probe.is_completed():
                return c
        return next((c for c in ok if c != last), ok[0])

    def _bitmask(self) -> torch.Tensor:
        if self._scratch is None:
            self._scratch = xgr.allocate_token_bitmask(1, self.g.vocab_size)
        return self._scratch


# Continuation bytes to try, in order, to finish a character (any one of them
# completes a 2-byte lead; the later ones fit the narrower ranges after E0, ED, F0, F4).
_CONTINUATIONS = (b"\x80", b"\xa0", b"\x90", b"\xbf")


_TRUSTED = object()  # an undo entry: the token is in ``_pend``, not in the matcher


def _value_string_prefix(text: bytes) -> bytes | None:
    """``text`` up to the opening quote of its first value string (not a key)."""
    lex = Lex()
    for i in range(len(text)):
        lex.feed(text[i : i + 1])
        if lex.in_str and not lex.key:
            return text[: i + 1]
    return None


def _whole_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _bool_mask(bits: torch.Tensor, vocab: int) -> torch.Tensor:
    """[..., W] int32 bitmask rows as [..., vocab] booleans (True: allowed)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    return (((bits.unsqueeze(-1) >> shifts) & 1) != 0).flatten(-2)[..., :vocab]


def _allowed(bits: torch.Tensor, vocab: int) -> list[int]:
    return _bool_mask(bits, vocab).nonzero().flatten().tolist()


def _only(x: torch.Tensor, keep: list[int]) -> None:
    """-inf everywhere but ``keep`` (whose values stay)."""
    idx = torch.tensor(keep, device=x.device)
    vals = x.index_select(0, idx)
    if bool(torch.isinf(vals).all()) or bool(torch.isnan(vals).any()):
        vals = torch.zeros_like(vals)  # a forced token the model scored -inf
    x.fill_(_NEG_INF)
    x.index_copy_(0, idx, vals)


def constrain_rows(
    logits: torch.Tensor,
    rows: list[RowState | None],
    bitmask: torch.Tensor | None = None,
    taken: list[int | None] | None = None,
) -> None:
    """Mask each constrained row of ``logits`` [N, V] (``rows[i]`` None: row
    ``i`` is left alone): the grammars' masks in one pass over the batch,
    then the budget rule row by row. ``bitmask``: scratch [>= N, ceil(V/32)]
    int32, allocated when not given.

    Two kinds of row need no mask: a row whose closing needs every token
    left (a tight row) gets the closing's next token, and a greedy row whose
    best token the grammar takes (and which, where the budget rule has a
    say, leaves the value able to close in time) keeps it. Either token is
    accepted here (``take``); with ``taken`` given (the hf engine, which
    samples right after) it is written to ``taken[i]`` for the sampler to use
    as is (no second argmax, no mask), otherwise a tight row is masked to its
    one token and the engine's ``accept`` of the token confirms the take."""
    states = [(i, st) for i, st in enumerate(rows) if st is not None]
    if not states:
        return
    n, vocab = logits.shape
    # numpy views, taken once: each call into torch (or xgrammar) lets the
    # engine's other threads take the GIL, and the step waits for it back
    L = logits.detach().numpy() if _cpu(logits) else None
    best = None
    if any(st.greedy for _, st in states):
        best = L.argmax(1).tolist() if L is not None else argmax_rows(logits)
    masked: list[int] = []
    for i, st in states:
        b = best[i] if best is not None and st.greedy else None
        t = st.pick(b)
        if t is None:
            masked.append(i)
        elif taken is not None:
            taken[i] = t
        elif t != b:  # a tight row's token: the engine samples this row, so mask it to t
            _one_token(logits, L, i, t)
    if not masked:
        return
    if bitmask is None or bitmask.shape[0] < n:
        bitmask = torch.from_numpy(np.empty((n, (vocab + 31) // 32), dtype=np.int32))
    B = bitmask.numpy() if _cpu(bitmask) else None
    by_grammar: dict[int, tuple[Grammars, list[int]]] = {}
    for i in masked:
        st = rows[i]
        assert st is not None
        st.fill(bitmask, i)
        by_grammar.setdefault(id(st.g), (st.g, []))[1].append(i)
    for g, idx in by_grammar.values():  # never a special token that is not EOS
        if not g.banned:
            continue
        if B is not None:
            B[idx] &= g.allow_np[: B.shape[1]]
        else:
            sel = torch.tensor(idx, device=bitmask.device)
            bitmask[sel] = bitmask[sel] & g.allow_bits.to(bitmask.device)[: bitmask.shape[1]]
    # A greedy row outside the budget window takes the best allowed token,
    # read from its bitmask; only the other rows' logits are masked.
    greedy = [i for i in masked if _outside(rows[i])]
    slow = [i for i in masked if i not in greedy] if greedy else masked
    if greedy:
        for i, t in zip(greedy, _masked_argmax(logits, L, bitmask, B, greedy), strict=True):
            st = rows[i]
            assert st is not None
            if st.at_opener(t) or not st.take(t):
                slow.append(i)
            elif taken is not None:
                taken[i] = t
            else:
                _one_token(logits, L, i, t)
    if not slow:
        return
    _apply_rows(logits, bitmask, slow)
    commit = taken is not None
    for i in slow:
        st = rows[i]
        assert st is not None
        t = None
        if st.in_window():
            t = st.steer(logits[i], commit=commit)
        elif st.at_opener(logits[i]):
            t = st.steer(logits[i], anyway=True, commit=commit)
        if t is not None and taken is not None:
            taken[i] = t


def _cpu(x: torch.Tensor) -> bool:
    """Whether ``x`` can be read and written through numpy (a torch op on one
    small row costs several microseconds, a numpy one a fraction of one)."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.int32)


def _one_token(logits: torch.Tensor, L: np.ndarray | None, i: int, t: int) -> None:
    """Row ``i`` of ``logits`` (``L``: its numpy view, if any) allows token ``t`` only."""
    if L is not None:
        L[i].fill(_NEG_INF)
        L[i, t] = 0.0
    else:
        logits[i].fill_(_NEG_INF)
        logits[i, t] = 0.0


def _outside(st: RowState | None) -> bool:
    """A greedy row the budget window does not cover: its masked argmax is its token."""
    return st is not None and st.greedy and not st.done and not st.in_window()


def _masked_argmax(
    logits: torch.Tensor,
    L: np.ndarray | None,
    bitmask: torch.Tensor,
    B: np.ndarray | None,
    idx: list[int],
) -> list[int]:
    """The best token each of rows ``idx`` allows (its bitmask row), without
    writing the logits (``L``, ``B``: their numpy views, if any): a few
    numpy calls for all the rows, where masking them costs ~6 us a row."""
    vocab = logits.shape[1]
    if L is not None and B is not None and _LITTLE:
        words = B[idx].view(np.uint8)
        allowed = np.unpackbits(words, axis=1, count=vocab, bitorder="little").view(bool)
        return np.where(allowed, L[idx], -np.inf).argmax(1).tolist()  # type: ignore[no-any-return]
    sel = torch.tensor(idx, device=logits.device)
    allowed_t = _bool_mask(bitmask[idx].to(logits.device), vocab)
    return logits.index_select(0, sel).masked_fill(~allowed_t, _NEG_INF).argmax(-1).tolist()  # type: ignore[no-any-return]


def _apply_rows(logits: torch.Tensor, bitmask: torch.Tensor, idx: list[int]) -> None:
    n, vocab = logits.shape
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        xgr.apply_token_bitmask_inplace(logits, bitmask[:n], vocab_size=vocab, indices=idx)
    else:
        sel = torch.tensor(idx, device=logits.device)
        allowed = _bool_mask(bitmask[idx].to(logits.device), vocab)
        logits[sel] = logits[sel].masked_fill(~allowed, _NEG_INF)


__all__ = ["Grammars", "RowState", "argmax_only", "constrain_rows", "spec_key"]
