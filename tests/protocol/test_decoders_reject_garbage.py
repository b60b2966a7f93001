"""Every decoder turns bad input into a ProtocolError subclass, and nothing else.

A gateway counts rejections by `reason`; any other exception type escaping a
decoder is a crash path an attacker can reach with one MQTT message.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import cbor, envelope, schemas, tensors
from protocol.digest import sha256
from protocol.envelope import Context
from protocol.errors import (
    BadSignature,
    BadTensor,
    DigestMismatch,
    KeyFileError,
    LimitExceeded,
    MalformedCBOR,
    NonCanonicalCBOR,
    NonFiniteValues,
    ProtocolError,
    SchemaError,
)
from protocol.keys import Identity

settings.register_profile(
    "protocol-garbage", max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("protocol-garbage")

GATEWAY = Identity.from_seed(bytes(range(32)))
DEVICE = Identity.from_seed(bytes(range(1, 33)))
BASE = sha256(b"model v1")

SCHEMA_CLASSES = [schemas.Task, schemas.Reply, schemas.Receipt, schemas.ModelRelease, schemas.EnrollRequest]


def _update_payload() -> bytes:
    delta = {
        "conv/w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
        "b": np.array([0.5, -0.25], np.float32),
    }
    return schemas.encode_update(delta, {"loss": 0.5, "acc": 0.75}, "i8")


def _model_payload() -> bytes:
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    return schemas.encode_model(weights)


UPDATE = _update_payload()
MODEL = _model_payload()
REPLY = envelope.seal(
    DEVICE,
    "reply",
    Context(DEVICE.public_key, GATEWAY.id, round=3, task="t-3", base=BASE),
    schemas.Reply(digest=sha256(UPDATE), examples=120).to_body(),
    UPDATE,
)
TASK = envelope.seal(
    GATEWAY,
    "task",
    Context(GATEWAY.public_key, GATEWAY.id, round=3, task="t-3", base=BASE),
    schemas.Task("train", DEVICE.id, schemas.TrainConfig(2, 16, 0.05, 1.7e9), "i8").to_body(),
)
RECEIPT = envelope.seal(
    GATEWAY,
    "receipt",
    Context(GATEWAY.public_key, GATEWAY.id, round=3, task="t-3", base=BASE),
    schemas.Receipt(DEVICE.id, sha256(UPDATE), False, "bad_signature").to_body(),
)
VALID_ENVELOPES = {"reply": REPLY, "task": TASK, "receipt": RECEIPT}
VALID_MESSAGES = {**VALID_ENVELOPES, "update": UPDATE, "model": MODEL}


def _from_bodies(data: bytes) -> None:
    """Decode leniently, then hand the value (and every map inside it) to every from_body."""
    value = cbor.loads(data, canonical=False)
    stack = [value]
    maps = []
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            maps.append(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    for doc in maps:
        for cls in SCHEMA_CLASSES:
            _expect_protocol_error_or_success(cls.from_body, doc)
        _expect_protocol_error_or_success(schemas.TrainConfig.from_wire, doc)
        _expect_protocol_error_or_success(Context.from_wire, doc)
        _expect_protocol_error_or_success(tensors.decode_tensor, doc)


def _tensors_from(data: bytes) -> None:
    value = cbor.loads(data, canonical=False)
    tensors.decode_tensors(value.get("tensors") if isinstance(value, dict) else value)


def _envelope_then_verify(data: bytes) -> None:
    envelope.decode(data).verify()


DECODERS = {
    "cbor.loads": cbor.loads,
    "cbor.loads(lenient)": lambda d: cbor.loads(d, canonical=False),
    "envelope.decode": envelope.decode,
    "envelope.decode+verify": _envelope_then_verify,
    "envelope.open_verified": lambda d: envelope.open_verified(d, "reply"),
    "schemas.decode_update": schemas.decode_update,
    "schemas.decode_model": schemas.decode_model,
    "tensors.decode_tensors": _tensors_from,
    "from_body on decoded maps": _from_bodies,
}


def _id(value) -> str:
    """A short test id (repr of a 5000-digit int raises)."""
    try:
        text = repr(value)
    except ValueError:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 30 else text[:27] + "..."


def _expect_protocol_error_or_success(fn, data):
    """Run a decoder: success or a ProtocolError is fine; any other exception propagates (test fails)."""
    try:
        fn(data)
    except ProtocolError:
        pass


def _expect_protocol_error(fn, data) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(data)
    return info.value


# --- random bytes ----------------------------------------------------------------------


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(decoder, data):
    _expect_protocol_error_or_success(DECODERS[decoder], data)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@given(
    prefix=st.sampled_from([b"\xa5", b"\xa6", b"\xa2", b"\x82", b"\xa1\x67tensors\x81"]),
    data=st.binary(max_size=120),
)
def test_random_bytes_behind_a_map_or_array_header_raise_only_protocol_errors(decoder, prefix, data):
    _expect_protocol_error_or_success(DECODERS[decoder], prefix + data)


@pytest.mark.parametrize("decoder", sorted(DECODERS))
@pytest.mark.parametrize(
    "data", [b"", b"\x00", b"\xff", b"\xf7", b"\xa0", b"\x80", b"\x40", b"\x60"], ids=_id
)
def test_tiny_inputs_raise_only_protocol_errors(decoder, data):
    _expect_protocol_error_or_success(DECODERS[decoder], data)


@pytest.mark.parametrize(
    "decoder", ["cbor.loads", "envelope.decode", "schemas.decode_update", "schemas.decode_model"]
)
@pytest.mark.parametrize("data", [None, "text", 42, [1, 2]], ids=_id)
def test_non_bytes_inputs_raise_malformed(decoder, data):
    with pytest.raises(MalformedCBOR):
        DECODERS[decoder](data)


# --- structurally valid CBOR, wrong in type or value ---------------------------------------

ANY_KEY = (
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.text(max_size=6) | st.binary(max_size=6)
)
ANY_SCALAR = (
    ANY_KEY
    | st.integers(-(2**300), 2**300)
    | st.floats()
    | st.sampled_from(["i8", "f16", "f32", "digest", "tensors", "metrics", "scale", "reply", "task"])
)
ANY_VALUE = st.recursive(
    ANY_SCALAR,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(ANY_KEY, children, max_size=4),
    max_leaves=12,
)


def _paths(value, prefix=()):
    """Every (path, value) inside nested dicts and lists."""
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _paths(item, (*prefix, i))


def _replace(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    out = list(value)
    out[head] = _replace(value[head], rest, new)
    return out


def _safe_dumps(value):
    try:
        return cbor.dumps(value)
    except (ValueError, LimitExceeded):  # e.g. two NaN keys
        return None


@pytest.mark.parametrize("message", sorted(VALID_MESSAGES))
@given(data=st.data())
def test_a_field_swapped_for_any_value_raises_only_protocol_errors(message, data):
    doc = cbor.loads(VALID_MESSAGES[message])
    paths = [p for p, _ in _paths(doc)]
    path = data.draw(st.sampled_from(paths))
    mutated = _safe_dumps(_replace(doc, path, data.draw(ANY_VALUE)))
    if mutated is None:
        return
    for name in sorted(DECODERS):
        _expect_protocol_error_or_success(DECODERS[name], mutated)


@pytest.mark.parametrize("message", sorted(VALID_MESSAGES))
@given(data=st.data())
def test_an_extra_field_of_any_key_type_raises_only_protocol_errors(message, data):
    doc = cbor.loads(VALID_MESSAGES[message])
    maps = [p for p, v in _paths(doc) if isinstance(v, dict)]
    path = data.draw(st.sampled_from(maps))
    target = doc
    for key in path:
        target = target[key]
    extra = {**target, data.draw(ANY_KEY): data.draw(ANY_VALUE)}
    extra = {**extra, data.draw(ANY_KEY): data.draw(ANY_VALUE)}
    mutated = _safe_dumps(_replace(doc, path, extra))
    if mutated is None:
        return
    for name in sorted(DECODERS):
        _expect_protocol_error_or_success(DECODERS[name], mutated)


@pytest.mark.parametrize("cls", SCHEMA_CLASSES, ids=lambda c: c.__name__)
@given(body=st.dictionaries(ANY_KEY, ANY_VALUE, max_size=6))
def test_from_body_on_any_decoded_map_raises_only_protocol_errors(cls, body):
    _expect_protocol_error_or_success(cls.from_body, body)


@pytest.mark.parametrize("cls", SCHEMA_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("body", [[], "x", None, 3, b"", [("digest", b"")]], ids=_id)
def test_from_body_on_a_non_map_raises_schema_error(cls, body):
    with pytest.raises(SchemaError):
        cls.from_body(body)


@pytest.mark.parametrize("cls", SCHEMA_CLASSES, ids=lambda c: c.__name__)
def test_from_body_reports_unknown_keys_of_mixed_types_as_schema_error(cls):
    with pytest.raises(SchemaError, match="unknown field"):
        cls.from_body({**_valid_bodies()[cls], 1: 2, "zz": 3, b"k": 4})


def _valid_bodies():
    return {
        schemas.Task: schemas.Task("train", "dev").to_body(),
        schemas.Reply: schemas.Reply(bytes(32), 3).to_body(),
        schemas.Receipt: schemas.Receipt("dev", b"", True).to_body(),
        schemas.ModelRelease: schemas.ModelRelease(bytes(32), 1, "arch", 1.7e9).to_body(),
        schemas.EnrollRequest: schemas.EnrollRequest("dev", 1.0).to_body(),
    }


# --- truncations and single-byte mutations of valid messages ---------------------------------


@pytest.mark.parametrize("message", sorted(VALID_MESSAGES))
def test_every_truncation_of_a_valid_message_is_refused(message):
    data = VALID_MESSAGES[message]
    decoders = [cbor.loads, lambda d: cbor.loads(d, canonical=False)]
    decoders += [envelope.decode] if message in VALID_ENVELOPES else []
    decoders += {"update": [schemas.decode_update], "model": [schemas.decode_model]}.get(message, [])
    for cut in range(len(data)):
        for decode in decoders:
            error = _expect_protocol_error(decode, data[:cut])
            assert isinstance(error, MalformedCBOR)


MUTATIONS = [0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF]


def _mutants(data: bytes):
    for pos in range(len(data)):
        for mask in MUTATIONS:
            out = bytearray(data)
            out[pos] ^= mask
            yield pos, bytes(out)


@pytest.mark.parametrize("message", sorted(VALID_ENVELOPES))
def test_no_single_byte_mutation_of_a_signed_envelope_verifies(message):
    outcomes = {"decode": 0, "bad_signature": 0, "digest_mismatch": 0}
    for pos, mutant in _mutants(VALID_ENVELOPES[message]):
        try:
            decoded = envelope.decode(mutant)
        except ProtocolError:
            outcomes["decode"] += 1
            continue
        try:
            decoded.verify()
        except BadSignature:
            outcomes["bad_signature"] += 1
        except DigestMismatch:
            outcomes["digest_mismatch"] += 1
        else:
            pytest.fail(f"byte {pos} mutated, and the envelope still verifies: {mutant.hex()}")
        with pytest.raises((BadSignature, DigestMismatch)):
            envelope.open_verified(mutant, decoded.type)
    assert sum(outcomes.values()) == len(VALID_ENVELOPES[message]) * len(MUTATIONS)
    assert outcomes["bad_signature"] > 0  # signature and body bytes are reachable
    if message == "reply":
        assert outcomes["digest_mismatch"] > 0  # attachment bytes are reachable


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _structural_positions(data: bytes) -> list[int]:
    """Byte positions outside the contents of long strings (keys, signatures, digests, ids, attachment)."""
    inside = set()
    for leaf in _leaves(cbor.loads(data)):
        if isinstance(leaf, (bytes, str)) and len(leaf) >= 8:
            raw = leaf.encode() if isinstance(leaf, str) else leaf
            encoded = cbor.dumps(leaf)
            end = data.index(encoded) + len(encoded)
            inside.update(range(end - len(raw), end))
    return [pos for pos in range(len(data)) if pos not in inside]


def test_no_value_of_any_structural_byte_makes_a_reply_verify():
    # Every one of the 255 other values at every header, key and small-value byte:
    # e.g. v: 1 (0x01) turned into v: true (0xf5) or v: 1.0 must not verify.
    data = VALID_ENVELOPES["reply"]
    positions = _structural_positions(data)
    assert len(positions) > 60
    for pos in positions:
        for value in range(256):
            if value == data[pos]:
                continue
            mutant = bytearray(data)
            mutant[pos] = value
            try:
                decoded = envelope.decode(bytes(mutant))
            except ProtocolError:
                continue
            with pytest.raises((BadSignature, DigestMismatch)):
                decoded.verify()


@pytest.mark.parametrize("message", ["update", "model"])
def test_single_byte_mutations_of_attachments_raise_only_protocol_errors(message):
    decode = {"update": schemas.decode_update, "model": schemas.decode_model}[message]
    refused = 0
    for _, mutant in _mutants(VALID_MESSAGES[message]):
        try:
            decode(mutant)
        except ProtocolError:
            refused += 1
    assert refused > 0


def test_a_mutated_attachment_inside_a_reply_fails_with_digest_mismatch():
    decoded = envelope.decode(REPLY)
    att_at = REPLY.index(UPDATE)
    for offset in (0, len(UPDATE) // 2, len(UPDATE) - 1):
        mutant = bytearray(REPLY)
        mutant[att_at + offset] ^= 0x01
        with pytest.raises(DigestMismatch):
            envelope.decode(bytes(mutant)).verify()
    assert decoded.attachment == UPDATE


# --- specific malleability: values that compare equal but encode differently ------------


@pytest.mark.parametrize("version", [True, 1.0, 1.5, "1", b"\x01", [1], None, 2, 0, 2**70], ids=_id)
def test_envelope_version_must_be_the_integer_one(version):
    doc = cbor.loads(TASK)
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "v": version}))


@pytest.mark.parametrize("msg_type", [["task"], {"t": 1}, b"task", 1, None, "Task", "tasks"], ids=_id)
def test_envelope_type_must_be_a_known_string(msg_type):
    doc = cbor.loads(TASK)
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "type": msg_type}))


@pytest.mark.parametrize("att", [None, "text", 1, [b"x"]], ids=_id)
def test_envelope_attachment_when_present_must_be_bytes(att):
    doc = cbor.loads(TASK)
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "att": att}))


def test_envelope_with_attachment_must_carry_a_digest():
    doc = cbor.loads(TASK)
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "att": b"payload"}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sender", b"\x00" * 31),
        ("sender", "key"),
        ("gateway", ""),
        ("gateway", "g" * 65),
        ("gateway", 7),
        ("round", -1),
        ("round", 2**31),
        ("round", True),
        ("round", 1.0),
        ("task", "t" * 65),
        ("task", None),
        ("base", b"\x00" * 31),
        ("base", "digest"),
    ],
    ids=_id,
)
def test_envelope_context_fields_are_checked(field, value):
    doc = cbor.loads(TASK)
    ctx = {**doc["ctx"], field: value}
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "ctx": ctx}))


@pytest.mark.parametrize("sig", [b"", b"\x00" * 63, b"\x00" * 65, "sig", None], ids=_id)
def test_envelope_signature_must_be_64_bytes(sig):
    doc = cbor.loads(TASK)
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "sig": sig}))


def test_envelope_with_a_non_text_body_key_is_refused():
    doc = cbor.loads(TASK)
    with pytest.raises(SchemaError):
        envelope.decode(cbor.dumps({**doc, "body": {**doc["body"], 1: 2}}))


# --- limits ------------------------------------------------------------------------------


def test_oversize_input_to_cbor_loads_is_a_limit_exceeded_before_parsing():
    with pytest.raises(LimitExceeded):
        cbor.loads(b"\xff" * 101, max_bytes=100)
    assert cbor.loads(cbor.dumps(b"x" * 90), max_bytes=100) == b"x" * 90


def test_oversize_envelope_is_limit_exceeded_on_decode_and_on_seal():
    too_big = b"\x00" * (envelope.MAX_ENVELOPE_BYTES + 1)
    with pytest.raises(LimitExceeded):
        envelope.decode(too_big)
    with pytest.raises(LimitExceeded):
        envelope.open_verified(too_big, "reply")
    with pytest.raises(LimitExceeded):
        envelope.decode(REPLY, max_bytes=len(REPLY) - 1)
    ctx = Context(DEVICE.public_key, GATEWAY.id)
    with pytest.raises(LimitExceeded):
        envelope.seal(DEVICE, "reply", ctx, {}, b"\x00" * envelope.MAX_ENVELOPE_BYTES)


def test_oversize_attachments_are_limit_exceeded():
    with pytest.raises(LimitExceeded):
        schemas.decode_update(b"\x00" * (schemas.MAX_UPDATE_BYTES + 1))
    with pytest.raises(LimitExceeded):
        schemas.decode_model(b"\x00" * (schemas.MAX_MODEL_BYTES + 1))


def _tensor_doc(**changes):
    doc = tensors.encode_tensor("w", np.ones((2, 3), np.float32), "f32")
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("limits", "docs"),
    [
        (tensors.TensorLimits(max_tensors=2), [_tensor_doc(name=f"t{i}") for i in range(3)]),
        (tensors.TensorLimits(max_rank=1), [_tensor_doc()]),
        (tensors.TensorLimits(max_elements=5), [_tensor_doc()]),
        (tensors.TensorLimits(max_total_elements=11), [_tensor_doc(name="a"), _tensor_doc(name="b")]),
    ],
    ids=["tensors", "rank", "elements", "total"],
)
def test_tensor_limits_give_limit_exceeded(limits, docs):
    tensors.decode_tensors(docs)  # fine under the default limits
    with pytest.raises(LimitExceeded):
        tensors.decode_tensors(docs, limits)


@pytest.mark.parametrize("shape", [[0, 2**62], [0, 2**64 + 5], [2**40, 0], [0, 0, 0, 2**200]], ids=_id)
def test_huge_dimensions_next_to_a_zero_dimension_are_limit_exceeded(shape):
    with pytest.raises(LimitExceeded):
        tensors.decode_tensor(_tensor_doc(shape=shape, data=b""))


def test_default_limits_refuse_a_rank_five_tensor():
    with pytest.raises(LimitExceeded):
        tensors.decode_tensor(_tensor_doc(shape=[1, 1, 2, 1, 3]))


def test_update_limits_are_enforced_through_decode_update():
    big = schemas.encode_update({"w": np.zeros(100, np.float32)}, {}, "i8")
    with pytest.raises(LimitExceeded):
        schemas.decode_update(big, tensors.TensorLimits(max_elements=99))
    too_many_metrics = {f"m{i}": 0.0 for i in range(schemas.MAX_METRICS + 1)}
    with pytest.raises(LimitExceeded):
        schemas.decode_update(schemas.encode_update({}, too_many_metrics))


@pytest.mark.parametrize(
    ("cls", "field", "value", "error"),
    [
        (schemas.Reply, "examples", schemas.MAX_EXAMPLES + 1, LimitExceeded),
        (schemas.Reply, "examples", -1, LimitExceeded),
        (schemas.Reply, "examples", 10**5000, LimitExceeded),  # a bignum whose str() would raise
        (schemas.Reply, "examples", 3.0, SchemaError),
        (schemas.Reply, "examples", True, SchemaError),
        (schemas.Reply, "digest", b"\x00" * 31, SchemaError),
        (schemas.ModelRelease, "version", 2**31, LimitExceeded),
        (schemas.ModelRelease, "architecture", "a" * 65, LimitExceeded),
        (schemas.ModelRelease, "expires", 0.0, schemas.NoExpiry),  # "never expires" is no longer a thing
        (schemas.ModelRelease, "expires", 0, schemas.NoExpiry),
        (schemas.ModelRelease, "expires", -1.0, LimitExceeded),
        (schemas.ModelRelease, "expires", float("nan"), NonFiniteValues),
        (schemas.Receipt, "reason", "r" * 65, LimitExceeded),
        (schemas.Receipt, "accepted", 1, SchemaError),
        (schemas.Receipt, "reply", b"\x00" * 5, SchemaError),
        (schemas.Task, "kind", "sleep", SchemaError),
        (schemas.Task, "kind", "k" * 300, LimitExceeded),
        (schemas.Task, "codec", "f64", SchemaError),
        (schemas.Task, "device", "d" * 65, LimitExceeded),
        (schemas.Task, "config", [], SchemaError),
        (schemas.EnrollRequest, "time", 2**1100, LimitExceeded),  # an int too big for a float
        (schemas.EnrollRequest, "time", -1.0, LimitExceeded),
        (schemas.EnrollRequest, "time", float("inf"), NonFiniteValues),
        (schemas.EnrollRequest, "time", float("nan"), NonFiniteValues),
        (schemas.EnrollRequest, "time", "now", SchemaError),
    ],
    ids=_id,
)
def test_schema_fields_out_of_range_or_of_wrong_type(cls, field, value, error):
    body = {**_valid_bodies()[cls], field: value}
    with pytest.raises(error):
        cls.from_body(body)
    with pytest.raises(error):  # the same through the wire, where it applies
        cls.from_body(cbor.loads(cbor.dumps(body), canonical=False))


def test_a_release_that_never_expires_is_neither_made_nor_taken():
    with pytest.raises(ValueError, match="must expire"):  # the sender's side: a gateway cannot sign one
        schemas.ModelRelease(bytes(32), 1, "arch", 0.0).to_body()
    with pytest.raises(schemas.NoExpiry) as refused:  # the receiver's side, with its own reason
        schemas.ModelRelease.from_body({**_valid_bodies()[schemas.ModelRelease], "expires": 0.0})
    assert refused.value.reason == "model_no_expiry" and isinstance(refused.value, SchemaError)


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("epochs", 101, LimitExceeded),
        ("batch_size", 0, LimitExceeded),
        ("lr", 10.5, LimitExceeded),
        ("lr", float("nan"), NonFiniteValues),
        ("deadline", float("-inf"), NonFiniteValues),
        ("deadline", 2**2000, LimitExceeded),
        ("epochs", "1", SchemaError),
    ],
    ids=_id,
)
def test_train_config_fields_are_checked(field, value, error):
    config = {**schemas.TrainConfig().to_wire(), field: value}
    with pytest.raises(error):
        schemas.TrainConfig.from_wire(config)
    with pytest.raises(error):
        schemas.Task.from_body({**schemas.Task("train", "dev").to_body(), "config": config})


# --- non-finite values ----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=_id)
@pytest.mark.parametrize("codec", sorted(tensors.CODECS))
def test_encoding_a_non_finite_tensor_is_refused(bad, codec):
    with pytest.raises(NonFiniteValues):
        tensors.encode_tensor("w", np.array([1.0, bad], np.float32), codec)


@pytest.mark.parametrize("value", [65520.0, -1e5, 3e38])
def test_encoding_values_beyond_the_f16_range_is_refused_not_sent_as_inf(value):
    with pytest.raises(NonFiniteValues):
        tensors.encode_tensor("w", np.array([0.0, value], np.float32), "f16")
    # 65504 is the largest f16 and encodes fine
    assert tensors.decode_tensor(tensors.encode_tensor("w", np.array([65504.0]), "f16"))[1][0] == 65504.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=_id)
@pytest.mark.parametrize("codec", ["f32", "f16"])
def test_decoding_a_tensor_with_nan_or_inf_is_non_finite_values(bad, codec):
    dtype = tensors.CODECS[codec]
    doc = _tensor_doc(codec=codec, shape=[3], data=np.array([1.0, bad, 2.0], dtype).tobytes())
    with pytest.raises(NonFiniteValues):
        tensors.decode_tensor(doc)
    update = cbor.dumps({"tensors": [doc], "metrics": {}})
    with pytest.raises(NonFiniteValues):
        schemas.decode_update(update)
    with pytest.raises(NonFiniteValues):
        schemas.decode_model(cbor.dumps({"tensors": [doc]}))


@pytest.mark.parametrize("scale", [1e300, 3e38])
def test_an_int8_scale_that_overflows_float32_is_non_finite_values(scale):
    doc = _tensor_doc(codec="i8", shape=[2], data=bytes([127, 1]), scale=scale)
    with pytest.raises(NonFiniteValues):
        tensors.decode_tensor(doc)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), 1, True, "1"], ids=_id)
def test_an_int8_scale_must_be_a_finite_positive_float(scale):
    with pytest.raises(BadTensor):
        tensors.decode_tensor(_tensor_doc(codec="i8", shape=[2], data=b"\x01\x02", scale=scale))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=_id)
def test_non_finite_metrics_are_non_finite_values(bad):
    update = cbor.dumps({"tensors": [], "metrics": {"loss": bad}})
    with pytest.raises(NonFiniteValues):
        schemas.decode_update(update)


@pytest.mark.parametrize(
    "changes",
    [
        {"codec": "f64"},
        {"codec": ["f32"]},
        {"codec": {"c": 1}},
        {"shape": [2, -3]},
        {"shape": [2, 3.0]},
        {"shape": [True, 6]},
        {"data": b"\x00" * 23},
        {"shape": [7]},
    ],
    ids=_id,
)
def test_inconsistent_tensors_are_bad_tensor(changes):
    with pytest.raises(BadTensor):
        tensors.decode_tensor(_tensor_doc(**changes))


@pytest.mark.parametrize(
    "doc",
    [
        [1],
        {"name": "w"},
        {**_tensor_doc(), "extra": 1},
        {**_tensor_doc(), 7: 1, "x": 2},
        _tensor_doc(name=""),
        _tensor_doc(name="n" * 65),
        _tensor_doc(name=5),
        _tensor_doc(data="bytes"),
        {k: v for k, v in tensors.encode_tensor("w", np.ones(2), "i8").items() if k != "scale"},
    ],
    ids=_id,
)
def test_misshapen_tensor_maps_are_schema_errors(doc):
    with pytest.raises(SchemaError):
        tensors.decode_tensor(doc)


def test_a_tensor_name_twice_is_a_schema_error():
    with pytest.raises(SchemaError):
        tensors.decode_tensors([_tensor_doc(), _tensor_doc()])


# --- nesting, tags and hostile structure -----------------------------------------------------


@pytest.mark.parametrize("opener", [b"\x81", b"\xa1\x61k", b"\xd8\x20"], ids=["array", "map", "tag"])
@pytest.mark.parametrize("depth", [cbor.MAX_DEPTH + 2, 1000, 20_000])
def test_deep_nesting_is_a_protocol_error_not_a_recursion_error(opener, depth):
    data = opener * depth + b"\x00"
    lenient = lambda d: cbor.loads(d, canonical=False)  # noqa: E731
    for decoder in (cbor.loads, lenient, envelope.decode, schemas.decode_update):
        error = _expect_protocol_error(decoder, data)
        assert isinstance(error, MalformedCBOR)


def test_encoding_nesting_beyond_the_limit_is_limit_exceeded():
    value = 0
    for _ in range(cbor.MAX_DEPTH + 1):
        value = [value]
    with pytest.raises(LimitExceeded):
        cbor.dumps(value)


def _head(major: int, arg: int) -> bytes:
    """A CBOR initial byte plus argument, in the shortest form (RFC 8949 section 3)."""
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * size):
            return bytes([major << 5 | info]) + arg.to_bytes(size, "big")
    raise ValueError(arg)


@pytest.mark.timeout(10)
def test_a_value_sharing_bomb_is_refused_quickly():
    # 28 marks a shareable value, 29 refers back to it: each level repeats the one
    # below 8 times, so re-encoding would write 8**9 items from 220 bytes.
    def level(depth, index):
        if depth == 0:
            return _head(6, 28) + _head(4, 1) + b"\x00"
        back_reference = _head(6, 29) + _head(0, index + 1)
        return _head(6, 28) + _head(4, 8) + level(depth - 1, index + 1) + back_reference * 7

    data = level(9, 0)
    assert len(data) < 300
    started = time.monotonic()
    for decoder in (cbor.loads, lambda d: cbor.loads(d, canonical=False), envelope.decode):
        with pytest.raises(MalformedCBOR, match="tag 28"):
            decoder(data)
    assert time.monotonic() - started < 1.0


@pytest.mark.timeout(10)
def test_map_keys_with_colliding_hashes_are_refused_quickly():
    # Python hashes integers modulo 2**61 - 1: these bignum keys all collide, and
    # inserting n of them into a dict costs n**2.
    modulus = (1 << 61) - 1
    n = 20_000
    items = b"".join(cbor2.dumps(5 + (1 << 64) + i * modulus) + b"\x00" for i in range(n))
    data = _head(5, n) + items
    started = time.monotonic()
    with pytest.raises(MalformedCBOR, match="map keys"):
        cbor.loads(data, canonical=False)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    "key_hex",
    ["c249010000000000000000", "8101", "a10102", "d820617a"],
    ids=["bignum", "array", "map", "tagged text"],
)
def test_map_keys_must_be_integers_strings_or_simple_values(key_hex):
    data = bytes.fromhex("a1" + key_hex + "00")
    for canonical in (True, False):
        with pytest.raises(MalformedCBOR):
            cbor.loads(data, canonical=canonical)


def test_the_rfc_4_2_1_example_with_array_keys_encodes_but_is_refused_on_decode():
    encoded = cbor.dumps({10: 0, 100: 0, -1: 0, "z": 0, "aa": 0, (100,): 0, (-1,): 0, False: 0})
    with pytest.raises(MalformedCBOR):
        cbor.loads(encoded)


@pytest.mark.parametrize("tag", [4, 5, 25, 28, 29, 30, 35, 36, 37, 256, 258, 55799, 1000])
def test_tags_with_costly_or_unneeded_semantics_are_refused(tag):
    data = _head(6, tag) + cbor2.dumps([1, 2])
    for canonical in (True, False):
        with pytest.raises(MalformedCBOR, match=f"tag {tag}"):
            cbor.loads(data, canonical=canonical)


@pytest.mark.parametrize(
    "hexstr",
    [
        "5bffffffffffffffff00",  # a byte string claiming 2**64 - 1 bytes
        "9bffffffffffffffff00",  # an array claiming 2**64 - 1 items
        "bbffffffffffffffff00",  # a map claiming 2**64 - 1 pairs
        "7a7fffffff61",  # a text string claiming 2 GiB
        "1c",
        "3d",
        "fe",  # reserved additional information
        "ff",  # a lone break
        "f818",  # simple value 24 in two bytes: not well-formed
        "62c328",  # invalid UTF-8
        "0000",  # trailing byte
    ],
)
def test_malformed_headers_are_malformed_cbor(hexstr):
    for canonical in (True, False):
        with pytest.raises(MalformedCBOR):
            cbor.loads(bytes.fromhex(hexstr), canonical=canonical)


def test_protocol_errors_carry_their_reason_in_the_message():
    with pytest.raises(MalformedCBOR) as info:
        cbor.loads(b"")
    assert str(info.value).startswith("malformed: ")
    assert info.value.reason == "malformed"
    with pytest.raises(NonCanonicalCBOR) as info:
        cbor.loads(bytes.fromhex("1817"))
    assert info.value.reason == "non_canonical"


# --- key files ---------------------------------------------------------------------------


def _load_key_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "device.key"
        path.write_bytes(raw)
        os.chmod(path, 0o600)
        Identity.load(path)


@given(st.binary(max_size=200))
def test_random_key_files_are_refused_with_key_file_error(raw):
    with pytest.raises(KeyFileError):
        _load_key_bytes(raw)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=70),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3),
    max_leaves=8,
)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.just("starling-ed25519-v1") | JSON_VALUES,
            "seed": st.just("00" * 32) | st.text(alphabet="0123456789abcdefg ", max_size=70) | JSON_VALUES,
            "public_key": JSON_VALUES,
            "id": JSON_VALUES,
        },
    )
)
def test_key_files_with_wrong_fields_raise_only_key_file_errors(doc):
    try:
        _load_key_bytes(json.dumps(doc).encode())
    except KeyFileError:
        return
    # only a file with the right type and a 32-byte hex seed may load
    assert doc["type"] == "starling-ed25519-v1"
    assert len(bytes.fromhex(doc["seed"])) == 32


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\x00garbage",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"type": "starling-ed25519-v1", "seed": 5}',
        b"1e400",
        b"NaN",
        b'"just a string"',
    ],
    ids=["not utf-8", "deep json", "seed not text", "huge float", "nan", "string"],
)
def test_hostile_key_files_are_key_file_errors(raw):
    with pytest.raises(KeyFileError):
        _load_key_bytes(raw)


def test_an_integer_where_a_float_is_expected_is_accepted_as_a_float():
    # the other side of the bignum check above: a plain integer in range is fine
    request = schemas.EnrollRequest.from_body({"name": "x", "time": 10**10})
    assert type(request.time) is float and math.isfinite(request.time) and request.time == 1e10
