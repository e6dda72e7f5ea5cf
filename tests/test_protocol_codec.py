"""Codec and schema tests: roundtrips, zero-copy, every error kind, hostile input."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq
from crc32c import crc32c
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    ArrayMismatch,
    Error,
    FieldTypeError,
    Heartbeat,
    InvalidValue,
    LearnerProgress,
    MalformedFrame,
    Message,
    MissingField,
    NoWork,
    OversizeMessage,
    ProtocolError,
    RolloutGroup,
    StatsReport,
    TensorMeta,
    UnexpectedField,
    UnknownMessageType,
    VersionMismatch,
    WeightAck,
    WeightAnnounce,
    WeightChunk,
    WorkGrant,
    WorkRequest,
    decode,
    encode,
)
from protocol.errors import ERROR_CLASSES
from protocol.messages import WeightBroadcast, WeightGroupJoin, WeightGroupReady

ARRAY_FIELDS = ("prompt_token_ids", "completion_token_ids", "completion_lengths",
                "behaviour_logprobs", "token_versions", "rewards", "finished")


def make_group(lengths: list[int] | None = None, seed: int = 0, **override: Any) -> RolloutGroup:
    rng = np.random.default_rng(seed)
    lengths = [3, 0, 5] if lengths is None else lengths
    t = sum(lengths)
    fields: dict[str, Any] = dict(
        grant_id=7, lease_id=2, problem_id="p-17", actor_id="actor-0",
        prompt_token_ids=rng.integers(0, 50_000, 11, dtype=np.int32),
        completion_token_ids=rng.integers(0, 50_000, t, dtype=np.int32),
        completion_lengths=np.array(lengths, dtype=np.int32),
        behaviour_logprobs=-rng.random(t, dtype=np.float32) * 5,
        token_versions=rng.integers(0, 4, t, dtype=np.int32),
        rewards=rng.integers(0, 2, len(lengths)).astype(np.float32),
        finished=rng.integers(0, 2, len(lengths)).astype(bool),
        gen_seconds=1.25,
    )
    fields.update(override)
    return RolloutGroup(**fields)


def make_announce(**override: Any) -> WeightAnnounce:
    fields: dict[str, Any] = dict(
        version=3, total_bytes=1024, chunk_bytes=300, n_chunks=4,
        tensors=[TensorMeta("lm_head.weight", "bfloat16", [16, 16], 0, 512),
                 TensorMeta("norm.weight", "float32", [128], 512, 512)],
    )
    fields.update(override)
    return WeightAnnounce(**fields)


EXAMPLES: list[Message] = [
    WorkRequest(actor_id="actor-0", want=4, policy_version=12),
    WorkGrant(grant_id=1, lease_id=5, problem_id="dapo-3", prompt="Compute 1+1. ∑ üñí",
              answer="2", verifier="math", n=16, lease_s=30.0, issued_version=12),
    NoWork(retry_after_s=0.5, reason="pacing"),
    make_group(),
    StatsReport(grant_id=1, lease_id=5, problem_id="dapo-3", actor_id="actor-0", k=3, n=16),
    Heartbeat(sender="actor-0", role="actor", sent_at=1.7e9, policy_version=12,
              in_flight=[1, 2, 3]),
    LearnerProgress(version=12, consumed_groups=100, consumed_samples=1600, dropped_stale=2),
    make_announce(),
    WeightChunk(version=3, index=1, data=bytes(range(256)) * 2,
                crc32c=crc32c(bytes(range(256)) * 2)),
    WeightAck(actor_id="actor-0", version=3, next_index=2),
    WeightGroupJoin(epoch=2, rank=1, world=3, host="10.0.0.1", port=5713, timeout_s=30.0),
    WeightGroupReady(actor_id="actor-0", epoch=2, ok=True),
    WeightBroadcast(epoch=2, version=3, total_bytes=1024, chunk_bytes=300, n_chunks=4,
                    crc32c=12345, tensors=make_announce().tensors),
    Error(code="missing_field", message="WorkGrant.n: missing", ref=9),
]


def to_bytes(frames: list[Any]) -> list[bytes]:
    """What a peer receives over the network: fresh buffers, no shared memory with the sender."""
    return [bytes(f) for f in frames]


def rewrite(frames: list[Any], edit: Callable[[dict[str, Any]], object]) -> list[Any]:
    """Re-encode frame 0 after `edit` mutates the unpacked header."""
    header = msgpack.unpackb(frames[0], raw=False)
    edit(header)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


# ---------------------------------------------------------------- roundtrips


def test_examples_cover_every_message_type() -> None:
    assert {type(m).TYPE for m in EXAMPLES} == set(MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).TYPE)
@pytest.mark.parametrize("as_frames", [to_bytes, lambda fs: [zmq.Frame(bytes(f)) for f in fs]],
                         ids=["bytes", "zmq.Frame"])
def test_every_message_roundtrips(msg: Message, as_frames: Callable[[list[Any]], list[Any]]
                                  ) -> None:
    out = decode(as_frames(encode(msg)))
    assert type(out) is type(msg)
    assert out == msg


def test_equality_sees_array_content() -> None:
    a, b = make_group(seed=1), make_group(seed=2)
    assert a != b
    assert decode(to_bytes(encode(a))) != b


def test_header_layout_is_as_documented() -> None:
    frames = encode(make_group([2, 2]))
    header = msgpack.unpackb(frames[0], raw=False)
    assert header["v"] == PROTOCOL_VERSION and header["t"] == "RolloutGroup"
    assert [a[0] for a in header["a"]] == list(ARRAY_FIELDS)
    assert header["a"][3] == ["behaviour_logprobs", "<f4", [4]]
    assert len(frames) == 1 + len(ARRAY_FIELDS)
    assert "grant_id" in header["f"] and "rewards" not in header["f"]


def test_non_contiguous_arrays_are_sent_by_value() -> None:
    base = make_group([8, 8])
    strided = np.arange(32, dtype=np.int32)[::2]
    g = make_group([8, 8], completion_token_ids=strided)
    assert not g.completion_token_ids.flags.c_contiguous
    out = decode(to_bytes(encode(g)))
    assert np.array_equal(out.completion_token_ids, strided)
    assert out != base


def test_group_accessors_slice_each_sample() -> None:
    g = make_group([3, 0, 5])
    assert g.n == 3 and g.num_tokens == 8
    assert g.offsets.tolist() == [0, 3, 3, 8]
    s0, s1, s2 = g.samples()
    assert np.array_equal(s0.token_ids, g.completion_token_ids[:3])
    assert s1.token_ids.size == 0 and s1.logprobs.size == 0
    assert np.array_equal(s2.logprobs, g.behaviour_logprobs[3:])
    assert s2.reward == float(g.rewards[2]) and s2.finished == bool(g.finished[2])
    assert g.oldest_version == int(g.token_versions.min())
    assert make_group([0, 0]).oldest_version is None


# ---------------------------------------------------------------- zero copy


def test_encode_frames_are_views_of_the_message_arrays() -> None:
    g = make_group([64, 64])
    frames = encode(g)
    for i, name in enumerate(ARRAY_FIELDS, start=1):
        assert np.shares_memory(np.frombuffer(frames[i], np.uint8), getattr(g, name)), name


@pytest.mark.parametrize("wrap", [lambda b: b, zmq.Frame], ids=["bytes", "zmq.Frame"])
def test_decoded_arrays_are_views_of_the_received_frames(wrap: Callable[[bytes], Any]) -> None:
    frames = [wrap(f) for f in to_bytes(encode(make_group([64, 64])))]
    out = decode(frames)
    assert isinstance(out, RolloutGroup)
    for i, name in enumerate(ARRAY_FIELDS, start=1):
        buf = frames[i].buffer if isinstance(frames[i], zmq.Frame) else frames[i]
        arr = getattr(out, name)
        assert np.shares_memory(arr, np.frombuffer(buf, np.uint8)), name
        assert not arr.flags.writeable


def test_weight_chunk_payload_is_not_copied() -> None:
    payload = bytearray(b"\x01" * 4096)
    frames = encode(WeightChunk(version=1, index=0, data=payload, crc32c=0))
    assert np.shares_memory(np.frombuffer(frames[1], np.uint8), np.frombuffer(payload, np.uint8))
    received = to_bytes(frames)
    out = decode(received)
    assert isinstance(out, WeightChunk)
    assert np.shares_memory(np.frombuffer(out.data, np.uint8),
                            np.frombuffer(received[1], np.uint8))


# ---------------------------------------------------------------- typed errors


def expect(err_cls: type[ProtocolError], frames: list[Any], field: str | None,
           msg_type: str | None = "RolloutGroup", **kw: Any) -> ProtocolError:
    with pytest.raises(err_cls) as info:
        decode(frames, **kw)
    err = info.value
    assert err.code == err_cls.code
    assert err.field == field and err.msg_type == msg_type
    if field is not None:
        assert f"{msg_type}.{field}:" in str(err)
    return err


def group_frames(lengths: list[int] | None = None) -> list[bytes]:
    return to_bytes(encode(make_group(lengths)))


def test_error_codes_are_distinct_and_short() -> None:
    codes = [c.code for c in ERROR_CLASSES]
    assert len(set(codes)) == len(codes)
    assert all(c.isidentifier() and len(c) <= 20 for c in codes)


def test_unknown_type_is_rejected() -> None:
    frames = rewrite(group_frames(), lambda h: h.update(t="Bogus"))
    err = expect(UnknownMessageType, frames, None, None)
    assert "Bogus" in str(err)


def test_other_protocol_version_is_rejected() -> None:
    frames = rewrite(group_frames(), lambda h: h.update(v=PROTOCOL_VERSION + 1))
    err = expect(VersionMismatch, frames, None, None)
    assert str(PROTOCOL_VERSION + 1) in str(err)


def test_missing_header_field_is_named() -> None:
    expect(MissingField, rewrite(group_frames(), lambda h: h["f"].pop("problem_id")),
           "problem_id")


def test_missing_array_is_named() -> None:
    def drop_rewards(h: dict[str, Any]) -> None:
        h["a"] = [a for a in h["a"] if a[0] != "rewards"]
    frames = rewrite(group_frames(), drop_rewards)
    del frames[1 + ARRAY_FIELDS.index("rewards")]
    expect(MissingField, frames, "rewards")


def test_unexpected_field_is_named() -> None:
    expect(UnexpectedField, rewrite(group_frames(), lambda h: h["f"].update(extra=1)), "extra")


def test_wrong_scalar_type_is_named() -> None:
    err = expect(FieldTypeError, rewrite(group_frames(), lambda h: h["f"].update(grant_id="7")),
                 "grant_id")
    assert "expected int, got str" in str(err)
    expect(FieldTypeError, rewrite(group_frames(), lambda h: h["f"].update(gen_seconds=True)),
           "gen_seconds")


def test_array_in_header_is_a_type_error() -> None:
    expect(FieldTypeError, rewrite(group_frames(), lambda h: h["f"].update(rewards=[1.0])),
           "rewards")


def test_wrong_dtype_is_named() -> None:
    def f64(h: dict[str, Any]) -> None:
        h["a"][3][1] = "<f8"
    expect(ArrayMismatch, rewrite(group_frames(), f64), "behaviour_logprobs")


def test_token_count_mismatch_message_is_exact() -> None:
    g = make_group([500, 500])
    frames = to_bytes(encode(g))

    def shrink(h: dict[str, Any]) -> None:
        h["a"][3][2] = [999]
    frames = rewrite(frames, shrink)
    frames[4] = frames[4][:999 * 4]
    err = expect(ArrayMismatch, frames, "behaviour_logprobs")
    assert str(err) == ("RolloutGroup.behaviour_logprobs: expected float32 with 1000 elements "
                        "(sum of completion_lengths), got float32[999]")


def test_sample_count_mismatch_is_named() -> None:
    with pytest.raises(ArrayMismatch, match=r"RolloutGroup\.rewards: expected float32 with 3 "):
        make_group([1, 1, 1], rewards=np.zeros(2, np.float32))
    with pytest.raises(ArrayMismatch, match=r"RolloutGroup\.finished"):
        make_group([1, 1, 1], finished=np.zeros(4, bool))
    with pytest.raises(ArrayMismatch, match=r"completion_lengths: expected at least one"):
        make_group([], rewards=np.zeros(0, np.float32), finished=np.zeros(0, bool))


def test_construction_rejects_wrong_dtype_and_shape() -> None:
    with pytest.raises(ArrayMismatch, match=r"behaviour_logprobs: expected 1-D float32"):
        make_group([2], behaviour_logprobs=np.zeros(2, np.float64))
    with pytest.raises(ArrayMismatch, match=r"token_versions.*int32\[1,2\]"):
        make_group([2], token_versions=np.zeros((1, 2), np.int32))
    with pytest.raises(ArrayMismatch, match=r"dtype >f4"):
        make_group([2], behaviour_logprobs=np.zeros(2, ">f4"))
    with pytest.raises(FieldTypeError, match=r"rewards: expected numpy array"):
        make_group([2], rewards=[1.0])


@pytest.mark.parametrize(("override", "field"), [
    ({"behaviour_logprobs": np.array([-1.0, np.nan], np.float32)}, "behaviour_logprobs"),
    ({"behaviour_logprobs": np.array([-1.0, -np.inf], np.float32)}, "behaviour_logprobs"),
    ({"behaviour_logprobs": np.array([-1.0, 0.5], np.float32)}, "behaviour_logprobs"),
    ({"rewards": np.array([np.inf], np.float32)}, "rewards"),
    ({"token_versions": np.array([0, -1], np.int32)}, "token_versions"),
    ({"gen_seconds": -1.0}, "gen_seconds"),
    ({"grant_id": -1}, "grant_id"),
    ({"problem_id": ""}, "problem_id"),
])
def test_out_of_range_values_are_named(override: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidValue) as info:
        make_group([2], **override)
    assert info.value.field == field and info.value.code == "invalid_value"


def test_tiny_positive_logprob_is_tolerated() -> None:
    make_group([2], behaviour_logprobs=np.array([-1.0, 1e-6], np.float32))


def test_negative_length_is_rejected() -> None:
    with pytest.raises(InvalidValue, match=r"completion_lengths: expected lengths >= 0"):
        make_group([3, -1], completion_token_ids=np.zeros(2, np.int32),
                   behaviour_logprobs=np.zeros(2, np.float32),
                   token_versions=np.zeros(2, np.int32))


def test_bool_bytes_other_than_0_1_are_rejected() -> None:
    frames = group_frames([1, 1, 1])
    frames[7] = b"\x01\x02\x00"
    expect(InvalidValue, frames, "finished")


def test_stats_report_k_above_n_is_rejected() -> None:
    with pytest.raises(InvalidValue, match=r"StatsReport\.k: expected k <= n = 4, got 5"):
        StatsReport(grant_id=1, lease_id=1, problem_id="p", actor_id="a", k=5, n=4)


def test_heartbeat_in_flight_items_are_checked() -> None:
    with pytest.raises(FieldTypeError, match=r"Heartbeat\.in_flight\[1\]: expected int"):
        Heartbeat(sender="a", role="actor", sent_at=0.0, policy_version=0, in_flight=[1, "2"])


def test_weight_announce_layout_is_checked() -> None:
    with pytest.raises(InvalidValue, match=r"n_chunks: expected ceil"):
        make_announce(n_chunks=3)
    with pytest.raises(InvalidValue, match=r"tensors\[0\]\.nbytes: expected nbytes = 512"):
        make_announce(tensors=[TensorMeta("w", "bfloat16", [16, 16], 0, 500)])
    with pytest.raises(InvalidValue, match=r"tensors\[1\]\.offset: .* overlap"):
        make_announce(tensors=[TensorMeta("a", "uint8", [600], 0, 600),
                               TensorMeta("b", "uint8", [100], 500, 100)])
    with pytest.raises(InvalidValue, match=r"tensors\[0\]\.offset: .* exceed"):
        make_announce(tensors=[TensorMeta("a", "uint8", [100], 1000, 100)])
    with pytest.raises(InvalidValue, match=r"tensors\[1\]\.name: duplicate"):
        make_announce(tensors=[TensorMeta("a", "uint8", [1], 0, 1),
                               TensorMeta("a", "uint8", [1], 1, 1)])
    with pytest.raises(InvalidValue, match=r"tensors\[0\]\.dtype"):
        make_announce(tensors=[TensorMeta("a", "complex64", [1], 0, 8)])
    with pytest.raises(InvalidValue, match=r"crc32c"):
        WeightChunk(version=1, index=0, data=b"x", crc32c=2**32)


def test_oversize_message_is_rejected_before_parsing() -> None:
    frames = [b"\xff" * 64, b"\x00" * 2048]  # the header is garbage: size must be checked first
    expect(OversizeMessage, frames, None, None, max_message_bytes=1024)
    with pytest.raises(OversizeMessage):
        encode(make_group([600]), max_message_bytes=1024)


def test_frame_count_mismatch_is_malformed() -> None:
    frames = group_frames()
    expect(MalformedFrame, frames[:-1], None)
    expect(MalformedFrame, [*frames, b""], None)


def test_truncated_array_frame_is_malformed() -> None:
    frames = group_frames([8])
    frames[2] = frames[2][:-1]
    err = expect(MalformedFrame, frames, "completion_token_ids")
    assert "31 bytes" in str(err)


V = PROTOCOL_VERSION  # headers right in version, wrong in shape


@pytest.mark.parametrize("header", [
    b"",
    b"\xc1",  # never-used msgpack byte
    b"\x93\x01\x02\x03",  # an array, not a map
    b"\xdd\xff\xff\xff\xff",  # array declaring 4G items
    b"\xdf\xff\xff\xff\xff",  # map declaring 4G entries
    b"\xdb\xff\xff\xff\xff",  # str declaring 4 GiB
    b"\xc6\x7f\xff\xff\xff",  # bin declaring 2 GiB
    b"\x91" * 100_000,  # nested 100k deep
    b"\x81\xa1v\xc7\x01\x05\x00",  # ext type in the version slot
    msgpack.packb({"v": V, "t": "WorkRequest", "f": {}, "a": []}) + b"\x00",  # trailing bytes
    msgpack.packb({"t": "WorkRequest", "f": {}, "a": []}),  # no version
    msgpack.packb({"v": V, "t": "WorkRequest", "f": {}, "a": [], "x": 0}),  # extra key
    msgpack.packb({"v": V, "t": "WorkRequest", "f": [], "a": []}),
    msgpack.packb({"v": V, "t": "WeightChunk", "f": {"version": 1, "index": 0, "crc32c": 0},
                   "a": [["data", "bytes", [3]], ["data", "bytes", [3]]]}),
    msgpack.packb({1: 2}),  # int map key
    b"\x81\xa1v\xa3\xff\xfe\xfd",  # invalid UTF-8
])
def test_hostile_headers_are_malformed(header: bytes) -> None:
    with pytest.raises(MalformedFrame):
        decode([header])


def test_not_a_frame_list_is_malformed() -> None:
    for bad in (b"abc", [object()], [], ["text"]):
        with pytest.raises(MalformedFrame):
            decode(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- property tests

groups = st.builds(
    lambda lengths, seed, version: make_group(
        lengths, seed=seed, token_versions=np.full(sum(lengths), version, np.int32)),
    st.lists(st.integers(0, 40), min_size=1, max_size=24),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=150, deadline=None)
@given(groups)
def test_random_groups_roundtrip(g: RolloutGroup) -> None:
    out = decode(to_bytes(encode(g)))
    assert out == g
    assert [s.token_ids.tolist() for s in out.samples()] == [
        s.token_ids.tolist() for s in g.samples()]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=6))
def test_random_frames_raise_only_protocol_errors(frames: list[bytes]) -> None:
    with pytest.raises(ProtocolError):
        decode(frames)


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXAMPLES), st.data())
def test_corrupted_valid_messages_raise_only_protocol_errors(msg: Message,
                                                              data: st.DataObject) -> None:
    frames = to_bytes(encode(msg))
    header = msgpack.unpackb(frames[0], raw=False)
    where = data.draw(st.sampled_from(["f", "a", "frame", "flip"]))
    if where == "f" and header["f"]:
        key = data.draw(st.sampled_from(sorted(header["f"])))
        header["f"][key] = data.draw(msgpack_values)
    elif where == "a" and header["a"]:
        entry = data.draw(st.sampled_from(header["a"]))
        entry[data.draw(st.integers(0, 2))] = data.draw(msgpack_values)
    frames[0] = msgpack.packb(header, use_bin_type=True)
    if where == "frame" and len(frames) > 1:
        i = data.draw(st.integers(1, len(frames) - 1))
        frames[i] = data.draw(st.binary(max_size=64))
    elif where == "flip":
        i = data.draw(st.integers(0, len(frames[0]) - 1))
        raw = bytearray(frames[0])
        raw[i] ^= data.draw(st.integers(1, 255))
        frames[0] = bytes(raw)
    try:
        out = decode(frames)
    except ProtocolError:
        return
    assert isinstance(out, Message)  # a corruption may still be a valid message
