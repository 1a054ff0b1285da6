"""The structured-output policy (zserve/worker/grammar.py) on the tiny
random-weight model, which never writes JSON on its own: whatever valid comes
back was made valid by the grammar and the budget rule."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import jsonschema
import pytest
import torch

from zserve.protocol import ParamError, SamplingParams, check_structured
from zserve.worker.grammar import Grammars, RowState, constrain_rows

EOS = 1
PROMPT = "Once upon a time"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "notes": {"type": "array", "items": {"type": "string", "maxLength": 8}},
    },
    "required": ["name", "age", "notes"],
}
# No string's content constrained (the rows take string tokens on trust), and
# keys of several tokens ("member") in the closing the budget rule follows.
PLAIN = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
    },
    "required": ["name", "member", "tags"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The model runs in this process: one torch thread on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def g(ref: tuple[Any, Any]) -> Grammars:
    return Grammars(ref[1], ref[0].config.vocab_size, {EOS})


def decode(ref: tuple[Any, Any], st: RowState | None, n: int, *, temp: float = 0.0,
           seed: int = 0, prefix: list[int] | None = None) -> list[int]:  # fmt: skip
    """Up to ``n`` tokens after PROMPT (+ ``prefix``), masked by ``st``."""
    model, tok = ref
    ids = tok(PROMPT)["input_ids"] + (prefix or [])
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    past = None
    with torch.inference_mode():
        for _ in range(n):
            x = torch.tensor([out[-1:] if past is not None else ids])
            step = model(input_ids=x, past_key_values=past, use_cache=True)
            past = step.past_key_values
            logits = step.logits[:, -1, :].float()
            constrain_rows(logits, [st])
            if temp:
                t = int(torch.multinomial((logits[0] / temp).softmax(-1), 1, generator=gen))
            else:
                t = int(logits[0].argmax())
            if st is not None:
                assert st.accept(t), f"the grammar refused its own mask's token {t}"
            out.append(t)
            if t == EOS:
                break
    return out


def spec(kind: str, value: Any = None, **kw: Any) -> dict[str, Any]:
    return check_structured({"type": kind, "value": value, **kw})


def text(ref: tuple[Any, Any], ids: list[int]) -> str:
    return ref[1].decode(ids, skip_special_tokens=True)


# ------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    "bad",
    [
        "json",
        {"type": "yaml"},
        {"type": "json", "value": 3},
        {"type": "json", "value": "{not json"},
        {"type": "regex", "value": ""},
        {"type": "choice", "value": []},
        {"type": "choice", "value": ["a", 1]},
        {"type": "json_object", "whitespace": "yes"},
        {"type": "json_object", "budget": 0},
        {"type": "json_object", "extra": 1},
    ],
)
def test_a_malformed_spec_is_refused_naming_structured(bad: Any) -> None:
    with pytest.raises(ParamError) as e:
        SamplingParams.from_dict({"structured": bad})
    assert e.value.param == "structured" and str(e.value).startswith("structured")


def test_the_spec_is_canonical_and_survives_the_wire() -> None:
    p = SamplingParams.from_dict({"structured": {"type": "json", "value": json.dumps(SCHEMA)}})
    assert p.structured == {"type": "json", "value": SCHEMA, "whitespace": False, "budget": True}
    assert SamplingParams.from_dict(p.to_dict()).structured == p.structured


@pytest.mark.parametrize(
    "kind,value,words",
    [
        ("json", {"type": "bogus"}, "JSON schema"),
        ("regex", "a(b", "regex"),
        ("grammar", 'root ::= "a" | ', "grammar"),
        ("structural_tag", {"type": "nothing"}, "structural tag"),
    ],
)
def test_what_does_not_compile_is_a_param_error(g: Grammars, kind: str, value: Any,
                                                 words: str) -> None:  # fmt: skip
    with pytest.raises(ParamError) as e:
        g.compile(spec(kind, value))
    assert e.value.param == "structured" and words in str(e.value)
    assert "/project/" not in str(e.value)  # xgrammar's source path is not the caller's business


def test_the_same_spec_is_compiled_once(g: Grammars, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = g._compile
    monkeypatch.setattr(g, "_compile", lambda s: calls.append(s) or real(s))
    schema = {"type": "object", "properties": {"once": {"type": "boolean"}}}
    a = g.compile(spec("json", schema))
    b = g.compile(spec("json", json.dumps(schema)))  # the same schema as a string
    assert a is b and len(calls) == 1
    g.compile(spec("json", schema, whitespace=True))  # another grammar
    g.compile(spec("json", schema, budget=False))  # the same grammar, another policy
    assert len(calls) == 2


# ------------------------------------------------------------------ decoding


@pytest.mark.parametrize("schema", [SCHEMA, PLAIN], ids=["bounded", "plain"])
@pytest.mark.parametrize("max_tokens", [40, 64, 128])
def test_a_schema_greedy_validates_and_stops_within_max_tokens(ref, g, max_tokens, schema) -> None:
    st = g.row(spec("json", schema), max_tokens, greedy=True)
    assert st.plain_strings is (schema is PLAIN)
    out = decode(ref, st, max_tokens)
    assert out[-1] == EOS and len(out) <= max_tokens and st.terminated
    value = json.loads(text(ref, out))  # strict: no raw control characters
    jsonschema.validate(value, schema)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_plain_strings_sampled_validate_and_stop(ref, g, seed) -> None:
    """Tokens inside a string whose content nothing constrains are taken on
    trust (fed to the matcher later): sampled replies, which wander through
    control characters and split UTF-8, still validate."""
    st = g.row(spec("json", PLAIN), 64)
    out = decode(ref, st, 64, temp=1.0, seed=seed)
    assert out[-1] == EOS and st.terminated
    jsonschema.validate(json.loads(text(ref, out)), PLAIN)
    assert not st.m.fork().accept_token(EOS)  # the matcher caught up: EOS taken, nothing after


def test_trust_is_checked_against_the_grammar(g) -> None:
    """A value string with constrained content refuses plain tokens: the
    check that guards the trust says so (beside the keyword screen)."""
    enum = {"type": "object", "properties": {"k": {"enum": ["abc", "abd"]}}, "required": ["k"]}
    compiled = g.compile(spec("json", enum))
    assert not g._plain_strings_hold(compiled, b'{"k":"abc"}')
    assert g._plain_strings_hold(g.compile(spec("json", PLAIN)), b'{"name":"","member":true}')


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_object_sampled_parses_and_stops(ref, g, seed) -> None:
    out = decode(ref, g.row(spec("json_object"), 48), 48, temp=1.0, seed=seed)
    assert out[-1] == EOS
    assert isinstance(json.loads(text(ref, out)), dict)


def test_without_the_budget_rule_a_long_value_is_cut(ref, g) -> None:
    """The same request with budget off runs into max_tokens mid-value:
    the rule, not luck, made the replies above complete."""
    out = decode(ref, g.row(spec("json", SCHEMA, budget=False), 40), 40)
    assert len(out) == 40 and out[-1] != EOS
    with pytest.raises(ValueError):
        json.loads(text(ref, out))


def test_compact_json_by_default_whitespace_on_request(ref, g) -> None:
    compact = text(ref, decode(ref, g.row(spec("json", SCHEMA), 64), 64))
    assert not re.search(r"\s", _outside_strings(compact))
    spaced = g.row(spec("json", SCHEMA, whitespace=True), 64)
    assert spaced.accept(ref[1].encode("{", add_special_tokens=False)[0])
    assert spaced.m.accept_string("\n  ")  # free whitespace is allowed there


def _outside_strings(s: str) -> str:
    return re.sub(r'"(?:[^"\\]|\\.)*"', '""', s)


def test_regex_and_choice(ref, g) -> None:
    out = decode(ref, g.row(spec("regex", r"[a-z]{3,6}@[a-z]+\.com"), 12), 12)
    assert out[-1] == EOS and re.fullmatch(r"[a-z]{3,6}@[a-z]+\.com", text(ref, out))
    out = decode(ref, g.row(spec("choice", ["yes", "no", "maybe"]), 8), 8)
    assert out[-1] == EOS and text(ref, out) in ("yes", "no", "maybe")


def test_max_length_strings_stay_valid_json(ref, g) -> None:
    """xgrammar 0.2.8 lets raw control characters into bounded strings; the
    pattern workaround keeps them out."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}},
              "required": ["s"]}  # fmt: skip
    for seed in (1, 2):
        out = decode(ref, g.row(spec("json", schema), 40), 40, temp=1.0, seed=seed)
        jsonschema.validate(json.loads(text(ref, out)), schema)


@pytest.mark.parametrize(
    "kind,value",
    [("json", SCHEMA), ("json", PLAIN), ("regex", r"[a-z]{3,6}@[a-z]+\.com")],
    ids=["bounded", "plain", "regex"],
)
def test_a_replayed_state_continues_as_the_uninterrupted_one(ref, g, kind, value) -> None:
    n = 40
    whole = decode(ref, g.row(spec(kind, value), n, greedy=True), n)
    for k in (1, len(whole) // 2, len(whole) - 2):
        st = g.row(spec(kind, value), n - k, greedy=True)
        assert st.replay(whole[:k])
        assert whole[:k] + decode(ref, st, n - k, prefix=whole[:k]) == whole


def test_a_replay_the_grammar_refuses_is_reported(ref, g) -> None:
    st = g.row(spec("json_object"), 10)
    assert not st.replay(ref[1].encode("hello", add_special_tokens=False))


def test_only_constrained_rows_are_masked(ref, g) -> None:
    logits = torch.randn(3, ref[0].config.vocab_size)
    before = logits.clone()
    constrain_rows(logits, [None, g.row(spec("choice", ["yes"]), 8), None])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(ref[1].decode([t]) in ("y", "ye", "yes") for t in allowed)


@pytest.mark.parametrize("schema", [SCHEMA, PLAIN], ids=["bounded", "plain"])
def test_the_greedy_shortcut_picks_what_the_full_mask_picks(ref, g, schema) -> None:
    """A greedy row is masked only when its best token is refused, and in the
    budget window keeps only the best token that fits: the same tokens."""
    for n in (40, 64, 96):
        full = decode(ref, g.row(spec("json", schema), n), n)
        short = decode(ref, g.row(spec("json", schema), n, greedy=True), n)
        assert short == full and full[-1] == EOS


def test_a_structural_tag_closes_within_its_budget(ref, g) -> None:
    """What tool_choice required/named sends: a tag around a JSON schema."""
    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    begin, end = '<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>"
    tag = {"type": "structural_tag", "format": {"type": "tag", "begin": begin, "end": end,
           "content": {"type": "json_schema", "json_schema": params}}}  # fmt: skip
    st = g.row(spec("structural_tag", tag), 64)
    out = decode(ref, st, 64)
    assert out[-1] == EOS and st.terminated
    body = text(ref, out)
    assert body.startswith(begin) and body.endswith(end)
    jsonschema.validate(json.loads(body[len(begin) : -len(end)]), params)


def test_the_closing_is_trusted_inside_plain_strings_only(ref, g) -> None:
    """A token inside a string keeps the closing unchecked only where no
    string's content is constrained (an enum would make it wrong)."""
    assert g.row(spec("json", SCHEMA), 64).plain_strings is False  # maxLength in notes
    assert g.row(spec("json_object"), 64).plain_strings is True
    enum = {"type": "object", "properties": {"k": {"enum": ["abc", "abd"]}}, "required": ["k"]}
    st = g.row(spec("json", enum), 64)
    assert st.plain_strings is False
    out = decode(ref, st, 64)
    assert json.loads(text(ref, out))["k"] in ("abc", "abd") and out[-1] == EOS


def test_a_character_split_across_tokens_is_finished_before_closing(ref, g) -> None:
    """A token that ends inside a UTF-8 character (byte-level vocabularies
    have them): the closing first finishes the character, and the budget
    rule still ends the value in time."""
    st = g.row(spec("json_object"), 12)
    for t in ref[1].encode('{"a":"', add_special_tokens=False):
        assert st.accept(t)
    lead = g.pieces[b"\xe4"]  # the first of a 3-byte character
    assert st.accept(lead) and st.lex.utf8 == 2
    assert st.close is not None and st.close.startswith(b"\x80\x80")
    f = st.m.fork()
    assert f.accept_string(st.close) and f.is_completed()
    out = decode(ref, st, 12 - st.n_out, prefix=[])
    assert out[-1] == EOS
