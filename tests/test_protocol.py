import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zserve import protocol as p


def test_worker_info_roundtrip():
    info = p.WorkerInfo(["a", "b"], capacity=4, context_length=2048, engine="hf", speed=2.5, pid=7)
    assert p.WorkerInfo.decode(info.encode()) == info


@pytest.mark.parametrize(
    "body",
    [
        {"models": []},
        {"models": "a"},
        {"models": ["a"], "capacity": 0},
        {"models": ["a"], "speed": -1},
        [1, 2],
    ],
)
def test_worker_info_rejects_bad_ready(body):
    with pytest.raises(ValueError):
        p.WorkerInfo.decode(msgpack.packb(body))


def test_request_roundtrip_generate_and_embed():
    r = p.Request(
        prompt="hi",
        params=p.SamplingParams.from_dict({"max_tokens": 5, "stop": "x", "top_k": -1}),
    )
    back = p.Request.decode(r.encode())
    assert back.prompt == "hi"
    assert back.params.max_tokens == 5
    assert back.params.stop == ["x"]
    assert back.params.top_k == 0
    e = p.Request(kind=p.KIND_EMBED, texts=["a", "b"])
    assert p.Request.decode(e.encode()).texts == ["a", "b"]


@pytest.mark.parametrize(
    "params,msg",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": [1]}, "stop"),
        ({"logprobs": 50}, "logprobs"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_sampling_params_validation(params, msg):
    with pytest.raises(ValueError, match=msg):
        p.SamplingParams.from_dict(params)


@pytest.mark.parametrize(
    "body",
    [{"kind": "what"}, {"kind": "generate"}, {"prompt": 3}, {"messages": [{"x": 1}]}, "str"],
)
def test_request_decode_rejects(body):
    with pytest.raises(ValueError):
        p.Request.decode(msgpack.packb(body))


def test_delta_record_roundtrip_with_extra():
    d = p.Delta(
        "hé", [1, 2], "stop", usage={"prompt_tokens": 1, "completion_tokens": 2},
        logprobs=[{"token": "h", "logprob": -0.1, "top_logprobs": []}],
    )
    rid, back = p.Delta.from_record(p.decode_tokens(p.encode_tokens([d.record(b"7")]))[0])
    assert rid == b"7"
    assert back == d


def test_plain_delta_record_is_small():
    # one token, no extras: a compact array, no map keys on the wire
    assert len(p.encode_tokens([p.Delta("t1 ", [1]).record(b"1")])) < 16


def test_header_roundtrip_and_empty_constant():
    assert p.encode_header([], []) == p.EMPTY_HEADER
    assert p.decode_header(p.EMPTY_HEADER) == ([], [])
    assert p.decode_header(p.encode_header([b"a"], [b"b", b"c"])) == ([b"a"], [b"b", b"c"])
    with pytest.raises(ValueError):
        p.decode_header(msgpack.packb({"a": 1}))


def test_decode_tokens_rejects_malformed():
    bad_payloads = [1, [[1, 2]], [["s", "", None, None, None]]]
    for bad in map(msgpack.packb, bad_payloads):
        with pytest.raises(ValueError):
            p.decode_tokens(bad)


@given(
    st.binary(min_size=1, max_size=8),
    st.text(),
    st.one_of(st.none(), st.lists(st.integers(0, 2**31))),
    st.one_of(st.none(), st.sampled_from(["stop", "length", "error", "cancelled"])),
)
def test_delta_roundtrip_property(rid, text, ids, finish):
    d = p.Delta(text, ids, finish)
    assert p.Delta.from_record(p.decode_tokens(p.encode_tokens([d.record(rid)]))[0]) == (rid, d)


def test_expiry_is_derived():
    assert p.HEARTBEAT_EXPIRY == p.HEARTBEAT_INTERVAL * p.HEARTBEAT_LIVENESS


@pytest.mark.parametrize(
    ("prompt", "messages"),
    [("hi", None), (None, [{"role": "user", "content": "hi"}]), ("a", [{"role": "user"}])],
)
def test_encode_generate_is_the_plain_msgpack_map(prompt, messages):
    sp = p.SamplingParams.from_dict({"max_tokens": 3, "stop": ["x"], "temperature": 0})
    body = p.encode_generate(prompt, messages, sp.encode())
    want = {"kind": "generate", "params": sp.to_dict()}
    if prompt is not None:
        want["prompt"] = prompt
    if messages is not None:
        want["messages"] = messages
    assert msgpack.unpackb(body) == want
    back = p.Request.decode(body)
    assert (back.prompt, back.messages, back.params) == (prompt, messages, sp)


def test_heartbeat_ms_codec():
    assert p.encode_heartbeat_ms(1.0) == b"1000"
    assert p.encode_heartbeat_ms(0.0001) == b"1"
    assert p.decode_heartbeat_ms(b"250") == 0.25
    assert p.decode_heartbeat_ms(b"999999999") == p.MAX_CLIENT_HEARTBEAT_INTERVAL
    for bad in (b"", b"-5", b"1.5", b"abc", b"1" * 12):
        with pytest.raises(ValueError):
            p.decode_heartbeat_ms(bad)


@pytest.mark.parametrize(
    "params",
    [{"temperature": float("nan")}, {"top_p": True}, {"max_tokens": True}, {"seed": 1.5}],
)
def test_sampling_params_refuse_nan_and_bools(params):
    with pytest.raises(ValueError):
        p.SamplingParams.from_dict(params)


def test_encode_tokens_takes_tuples_and_subclasses_too():
    """The exact-types fast packer falls back to the general one, whole."""

    class Text(str):
        pass

    recs = [[b"r", Text("hi"), (1, 2), None, {"logprobs": ({"token": "h"},)}]]
    assert p.decode_tokens(p.encode_tokens(recs)) == [
        [b"r", "hi", [1, 2], None, {"logprobs": [{"token": "h"}]}]
    ]
    plain = [[b"r", "a", [1], None, None]]
    assert p.decode_tokens(p.encode_tokens(plain)) == plain  # nothing left over from the failure


def test_routing_frame_roundtrip_and_malformed():
    from zserve import protocol as pr

    msgs = [{"role": "system", "content": "x" * 1000}, {"role": "user", "content": "hi"}]
    chain = pr.prefix_chain(pr.canonical_prompt(None, msgs))
    assert len(chain) == 1004 // pr.ROUTE_BLOCK and all(len(h) == 8 for h in chain)
    # the next turn of a conversation starts with the same hashes
    longer = pr.prefix_chain(pr.canonical_prompt(None, [*msgs, {"role": "assistant",
                                                                "content": "y" * 600}]))
    assert longer[: len(chain)] == chain and len(longer) > len(chain)
    assert pr.encode_routing(None, []) == b""
    assert pr.decode_routing(b"") == (None, [])
    assert pr.decode_routing(pr.encode_routing(None, chain)) == (None, chain)
    assert pr.decode_routing(pr.encode_routing("s1", chain)) == (pr.session_key("s1"), chain)
    assert pr.decode_routing(pr.encode_routing("s1", [])) == (pr.session_key("s1"), [])
    too_many = b"\x00" + b"h" * 8 * (pr.MAX_ROUTE_BLOCKS + 1)
    for bad in (b"\x02", b"\x80" + b"h" * 8, b"\x00h", b"\x01" + b"s" * 7, too_many):
        with pytest.raises(ValueError):
            pr.decode_routing(bad)
    assert len(pr.prefix_chain(b"z" * pr.ROUTE_BLOCK * 1000)) == pr.MAX_ROUTE_BLOCKS


def test_client_requests_and_continuations_carry_the_routing_frame():
    from zserve import protocol as pr
    from zserve._client_core import ClientCore

    core = ClientCore()
    args = (4, None, None, None, None, None, None)
    msgs = [{"role": "system", "content": "x" * 1000}]
    rid, frames = core.request_frames("m", None, msgs, args, {}, session_id="conv-1")
    assert len(frames) == 7
    session, chain = pr.decode_routing(frames[6])
    assert session == pr.session_key("conv-1")
    assert chain == pr.prefix_chain(pr.canonical_prompt(None, msgs))
    _, short = core.request_frames("m", "hi", None, args, {})
    assert len(short) == 6  # nothing to route by: no frame
    # a stream whose worker dies after a token continues with the same keys
    core.mark_sent(rid, 1.0)
    core.on_message([pr.CLIENT, pr.C_TOKENS, pr.encode_tokens([[rid, "a", [1], None, None]])], 1.1)
    lost = pr.error_record(rid, "worker_lost", "gone")
    core.on_message([pr.CLIENT, pr.C_TOKENS, pr.encode_tokens([lost])], 1.2)
    ((_, again),) = core.take_resends()
    assert again[6] == frames[6] and again[2] != rid


@given(st.binary(max_size=2 + 8 * (p.MAX_ROUTE_BLOCKS + 2)))
def test_routing_frame_decode_never_raises_anything_but_valueerror(frame):
    try:
        session, chain = p.decode_routing(frame)
    except ValueError:
        return
    assert session is None or len(session) == p.ROUTE_HASH
    assert len(chain) <= p.MAX_ROUTE_BLOCKS and all(len(h) == p.ROUTE_HASH for h in chain)
    if session is None and chain:  # a valid frame re-encodes to itself
        assert p.encode_routing(None, chain) == frame
