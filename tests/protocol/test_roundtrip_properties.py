"""Property tests: whatever a Starling party encodes, every other party decodes back.

decode(encode(x)) == x for canonical CBOR, the tensor codecs (exact for f32,
f16 rounding for f16, scale/2 for int8), signed envelopes and every schema.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol import cbor, envelope, schemas, tensors
from protocol.digest import sha256
from protocol.envelope import Context
from protocol.keys import Identity
from protocol_helpers import strict_equal

settings.register_profile(
    "protocol", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("protocol")

INT64 = st.integers(min_value=-(2**64), max_value=2**64 - 1)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.none() | st.booleans() | INT64 | FINITE | st.text(max_size=20) | st.binary(max_size=20)
VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=25,
)


# --- canonical CBOR --------------------------------------------------------------------


@given(VALUES)
def test_cbor_loads_of_dumps_gives_the_value_back(value):
    assert strict_equal(cbor.loads(cbor.dumps(value)), value)


@given(VALUES)
def test_cbor_encoding_is_a_fixed_point(value):
    encoded = cbor.dumps(value)
    assert cbor.dumps(cbor.loads(encoded)) == encoded
    assert strict_equal(cbor.loads(encoded, canonical=False), cbor.loads(encoded))


@given(st.dictionaries(st.text(max_size=8) | INT64, VALUES, max_size=8))
def test_cbor_map_encoding_does_not_depend_on_insertion_order(value):
    reordered = dict(reversed(list(value.items())))
    assert cbor.dumps(reordered) == cbor.dumps(value)


@given(st.integers(min_value=-(2**200), max_value=2**200))
def test_cbor_integers_of_any_size_round_trip(value):
    decoded = cbor.loads(cbor.dumps(value))
    assert type(decoded) is int and decoded == value


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_cbor_floats_keep_their_exact_value_and_use_the_shortest_form(value):
    encoded = cbor.dumps(value)
    assert strict_equal(cbor.loads(encoded), value)
    # preferred serialization: the shortest of f16/f32/f64 that is exact
    # (compare as Python floats: under NEP 50 `np.float16(x) == x` compares in float16)
    with np.errstate(over="ignore"):
        as_f16, as_f32 = float(np.float16(value)), float(np.float32(value))
    if as_f16 == value:
        assert len(encoded) == 3
    elif as_f32 == value:
        assert len(encoded) == 5
    else:
        assert len(encoded) == 9


def _nest(depth):
    """`depth` containers around 0, alternating lists and maps."""
    value = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [1, 16, cbor.MAX_DEPTH - 1, cbor.MAX_DEPTH])
def test_cbor_round_trips_nesting_up_to_the_depth_limit(depth):
    value = _nest(depth)
    assert cbor.loads(cbor.dumps(value)) == value


# --- tensor codecs ---------------------------------------------------------------------

SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
F32_ELEMENTS = st.floats(width=32, allow_nan=False, allow_infinity=False)
F16_ELEMENTS = st.floats(width=32, min_value=-65504.0, max_value=65504.0, allow_nan=False)


def _wire(docs):
    """Send tensor docs through canonical CBOR, as they travel."""
    return cbor.loads(cbor.dumps(docs))


@pytest.mark.parametrize("codec", sorted(tensors.CODECS))
@pytest.mark.parametrize(
    "shape", [(), (0,), (3,), (2, 0, 3), (1, 1, 1, 1), (0, 0, 0, 0), (2, 3, 4, 5)], ids=str
)
def test_every_rank_up_to_four_and_zero_size_dims_round_trip(shape, codec):
    array = (np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape) - 7) / 3
    (_, out), = tensors.decode_tensors(_wire([tensors.encode_tensor("w", array, codec)])).items()
    assert out.shape == shape and out.dtype == np.float32
    tolerance = {
        "f32": np.zeros_like(array),
        "f16": np.abs(array) * 2.0**-11,  # half an f16 step: 10 fraction bits
        # scale/2, plus the float32 rounding of the decoded value
        "i8": float(np.max(np.abs(array), initial=0.0)) / 254 + np.spacing(np.abs(out)),
    }[codec]
    assert np.all(np.abs(out - array) <= tolerance)


@given(hnp.arrays(np.float32, SHAPES, elements=F32_ELEMENTS))
def test_f32_tensors_round_trip_bit_exactly(array):
    (name, out), = tensors.decode_tensors(_wire([tensors.encode_tensor("w", array, "f32")])).items()
    assert name == "w"
    assert out.dtype == np.float32 and out.shape == array.shape
    assert out.tobytes() == array.tobytes()


@given(hnp.arrays(np.float32, SHAPES, elements=F16_ELEMENTS))
def test_f16_tensors_round_trip_to_the_nearest_f16(array):
    (_, out), = tensors.decode_tensors(_wire([tensors.encode_tensor("w", array, "f16")])).items()
    assert out.dtype == np.float32 and out.shape == array.shape
    assert out.tobytes() == array.astype(np.float16).astype(np.float32).tobytes()
    # and that is within half an f16 step of the input (the step above 65504 is inf)
    with np.errstate(over="ignore"):
        half_step = np.spacing(np.abs(out).astype(np.float16)).astype(np.float64) / 2
    assert np.all(np.abs(out.astype(np.float64) - array) <= half_step + 2.0**-25)


@given(hnp.arrays(np.float32, SHAPES, elements=F32_ELEMENTS))
def test_i8_tensors_round_trip_within_half_a_scale_step(array):
    doc = tensors.encode_tensor("w", array, "i8")
    (_, out), = tensors.decode_tensors(_wire([doc])).items()
    scale = doc["scale"]
    assert out.dtype == np.float32 and out.shape == array.shape
    assert isinstance(scale, float) and scale > 0
    q = np.frombuffer(doc["data"], np.int8)
    assert q.size == array.size and (q.size == 0 or q.min() >= -127)
    x = array.astype(np.float64)
    # scale/2 from quantizing, plus the float32 rounding of the decoded value
    with np.errstate(over="ignore"):  # the float32 step above the largest float32 is inf
        bound = scale / 2 + np.spacing(np.abs(out)).astype(np.float64)
    assert np.all(np.abs(out.astype(np.float64) - x) <= bound)
    assert np.all(out[array == 0] == 0)  # zero stays exactly zero
    if array.size and np.any(array != 0):
        assert scale == pytest.approx(float(np.max(np.abs(x))) / 127.0, rel=1e-12)


@given(
    st.dictionaries(
        st.text(min_size=1, max_size=tensors.NAME_MAX),
        hnp.arrays(np.float32, SHAPES, elements=st.floats(-6e4, 6e4, width=32)),
        max_size=6,
    ),
    st.sampled_from(sorted(tensors.CODECS)),
)
def test_tensor_lists_keep_names_order_and_shapes(arrays, codec):
    out = tensors.decode_tensors(_wire(tensors.encode_tensors(arrays, codec)))
    assert list(out) == list(arrays)
    assert [a.shape for a in out.values()] == [a.shape for a in arrays.values()]


# --- envelopes -------------------------------------------------------------------------

SEEDS = st.binary(min_size=32, max_size=32)
IDS = st.text(min_size=1, max_size=envelope.ID_MAX)
CONTEXT_FIELDS = st.fixed_dictionaries(
    {
        "gateway": IDS,
        "round": st.integers(0, 2**31 - 1),
        "task": st.from_regex(envelope.TASK_ID, fullmatch=True),  # ids become file names on devices
        "base": st.just(b"") | st.binary(min_size=32, max_size=32),
    }
)
BODIES = st.dictionaries(st.text(max_size=8), VALUES, max_size=6)


@given(
    SEEDS,
    st.sampled_from(sorted(envelope.TYPES)),
    CONTEXT_FIELDS,
    BODIES,
    st.none() | st.binary(max_size=300),
)
def test_sealed_envelopes_decode_and_verify_to_what_was_sealed(seed, msg_type, fields, body, attachment):
    identity = Identity.from_seed(seed)
    ctx = Context(sender=identity.public_key, **fields)
    data = envelope.seal(identity, msg_type, ctx, body, attachment)
    decoded = envelope.decode(data)
    decoded.verify()
    assert decoded.type == msg_type
    assert decoded.ctx == ctx
    assert decoded.ctx.sender_id == identity.id
    expected_body = body if attachment is None else {**body, "digest": sha256(attachment)}
    assert strict_equal(decoded.body, expected_body)
    assert decoded.attachment == attachment
    assert envelope.open_verified(data, msg_type) == decoded
    # sealing is deterministic: the same message gives the same bytes and digest
    assert envelope.seal(identity, msg_type, ctx, body, attachment) == data
    assert envelope.decode(data).digest == decoded.digest


# --- schemas ---------------------------------------------------------------------------

SHORT_TEXT = st.text(max_size=64)
DIGESTS = st.binary(min_size=32, max_size=32)
CONFIGS = st.builds(
    schemas.TrainConfig,
    epochs=st.integers(0, 100),
    batch_size=st.integers(1, 4096),
    lr=st.floats(0.0, 10.0),
    deadline=st.floats(0.0, 1e11),
)
SCHEMA_VALUES = {
    "Task": st.builds(
        schemas.Task,
        kind=st.sampled_from(schemas.TASK_KINDS),
        device=SHORT_TEXT,
        config=CONFIGS,
        codec=st.sampled_from(["f32", "f16", "i8"]),
    ),
    "Reply": st.builds(schemas.Reply, digest=DIGESTS, examples=st.integers(0, schemas.MAX_EXAMPLES)),
    "Receipt": st.builds(
        schemas.Receipt,
        device=SHORT_TEXT,
        reply=st.just(b"") | DIGESTS,
        accepted=st.booleans(),
        reason=SHORT_TEXT,
    ),
    "ModelRelease": st.builds(
        schemas.ModelRelease, digest=DIGESTS, version=st.integers(0, 2**31 - 1), architecture=SHORT_TEXT,
        expires=st.floats(1e-3, 1e11),
    ),
    "EnrollRequest": st.builds(schemas.EnrollRequest, name=SHORT_TEXT, time=st.floats(0.0, 1e11)),
}


@pytest.mark.parametrize("schema", sorted(SCHEMA_VALUES))
@settings(max_examples=40)
@given(data=st.data())
def test_every_schema_round_trips_through_its_body(schema, data):
    value = data.draw(SCHEMA_VALUES[schema])
    body = value.to_body()
    cls = type(value)
    assert cls.from_body(body) == value
    # and through the wire, as decoded CBOR
    wire_body = cbor.loads(cbor.dumps(body))
    again = cls.from_body(wire_body)
    assert again == value
    assert [type(getattr(again, f.name)) for f in dataclasses.fields(again)] == [
        type(getattr(value, f.name)) for f in dataclasses.fields(value)
    ]


@given(CONFIGS)
def test_train_config_round_trips_through_the_wire(config):
    assert schemas.TrainConfig.from_wire(cbor.loads(cbor.dumps(config.to_wire()))) == config


@given(SCHEMA_VALUES["Task"], SEEDS, CONTEXT_FIELDS)
def test_a_task_survives_a_sealed_envelope(task, seed, fields):
    identity = Identity.from_seed(seed)
    data = envelope.seal(identity, "task", Context(identity.public_key, **fields), task.to_body())
    assert schemas.Task.from_body(envelope.open_verified(data, "task").body) == task


METRICS = st.dictionaries(
    st.text(min_size=1, max_size=64), st.floats(-1e30, 1e30), max_size=schemas.MAX_METRICS
)
DELTAS = st.dictionaries(
    st.text(min_size=1, max_size=tensors.NAME_MAX),
    hnp.arrays(np.float32, SHAPES, elements=st.floats(-1e3, 1e3, width=32)),
    max_size=5,
)


@given(DELTAS, METRICS, st.sampled_from(["f32", "f16", "i8"]))
def test_updates_round_trip_with_their_codec_and_metrics(delta, metrics, codec):
    data = schemas.encode_update(delta, metrics, codec)
    out, out_metrics = schemas.decode_update(data)
    assert out_metrics == metrics
    assert all(type(v) is float for v in out_metrics.values())
    assert list(out) == list(delta)
    for name, array in delta.items():
        assert out[name].shape == array.shape and out[name].dtype == np.float32
        if codec == "f32":
            assert out[name].tobytes() == array.tobytes()
        elif codec == "f16":
            assert out[name].tobytes() == array.astype(np.float16).astype(np.float32).tobytes()
        else:
            peak = float(np.max(np.abs(array))) if array.size else 0.0
            bound = peak / 254 * (1 + 1e-6) + np.spacing(np.abs(out[name]))
            assert np.all(np.abs(out[name] - array) <= bound)


@given(DELTAS)
def test_models_round_trip_exactly(weights):
    out = schemas.decode_model(schemas.encode_model(weights))
    assert list(out) == list(weights)
    assert all(out[k].shape == v.shape and out[k].tobytes() == v.tobytes() for k, v in weights.items())


@given(DELTAS, METRICS, SEEDS, CONTEXT_FIELDS, st.integers(0, schemas.MAX_EXAMPLES))
@settings(max_examples=25)
def test_a_reply_with_its_update_attachment_survives_the_wire(delta, metrics, seed, fields, examples):
    identity = Identity.from_seed(seed)
    payload = schemas.encode_update(delta, metrics, "i8")
    reply = schemas.Reply(digest=sha256(payload), examples=examples)
    data = envelope.seal(identity, "reply", Context(identity.public_key, **fields), reply.to_body(), payload)
    opened = envelope.open_verified(data, "reply")
    assert schemas.Reply.from_body(opened.body) == reply
    out, out_metrics = schemas.decode_update(opened.attachment)
    assert list(out) == list(delta) and out_metrics == metrics


def _outcome(fn, data):
    try:
        return fn(data)
    except Exception as exc:  # the class and reason are what must agree
        return type(exc), getattr(exc, "reason", None)


@given(
    codec=st.sampled_from(sorted(tensors.CODECS)),
    raw=st.binary(min_size=0, max_size=64),
    scale=st.floats(min_value=1e-300, max_value=1e300) | st.sampled_from([0.0, -1.0, float("nan"), float("inf")]),
)
def test_check_update_refuses_exactly_what_decode_update_refuses(codec, raw, scale):
    """The gateway's fast check (no float arrays) and the full decode agree, NaN, huge scales and all."""
    itemsize = tensors.CODECS[codec].itemsize
    count = len(raw) // itemsize
    doc = {"name": "w", "codec": codec, "shape": [count], "data": raw[: count * itemsize]}
    if codec == "i8":
        doc["scale"] = scale
    data = cbor.dumps({"tensors": [doc], "metrics": {"steps": 1.0}})
    decoded, checked = _outcome(schemas.decode_update, data), _outcome(schemas.check_update, data)
    if isinstance(decoded, tuple) and isinstance(decoded[0], type):
        assert checked == decoded
    else:
        delta, metrics = decoded
        assert (checked.shapes, checked.metrics) == ({"w": delta["w"].shape}, metrics)
        assert checked.encodings == {"w": (codec, count)}
