"""Delta downloads on the wire: the step a release is rebuilt from, its signed message and the task's pointer."""

from __future__ import annotations

import time

import numpy as np
import pytest

from protocol import cbor, schemas
from protocol.errors import BadTensor, LimitExceeded, NonFiniteValues, ProtocolError, SchemaError
from protocol.tensors import apply_delta, decode_tensors, delta_step


def models(seed: int = 0, spread: float = 0.01):
    rng = np.random.default_rng(seed)
    base = {"w": rng.standard_normal((16, 8)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32),
            "zero": np.zeros(3, np.float32)}
    new = {k: (v + rng.standard_normal(v.shape) * spread).astype(np.float32) for k, v in base.items()}
    new["zero"] = base["zero"].copy()  # a tensor the round left alone: its step is all zeros
    return base, new


@pytest.mark.parametrize("codec", ["i8", "f16"])
def test_the_rebuilt_model_is_the_base_plus_the_decoded_step_bit_for_bit(codec):
    base, new = models()
    tensors, rebuilt = delta_step(base, new, codec)
    step = schemas.decode_delta(schemas.encode_delta(tensors), codec)  # what a device decodes from the wire
    again = apply_delta(base, step)
    assert list(rebuilt) == list(base)
    for name in base:
        assert rebuilt[name].dtype == np.float32
        assert rebuilt[name].tobytes() == again[name].tobytes() == (base[name] + step[name]).tobytes()
    assert schemas.encode_model(rebuilt) == schemas.encode_model(again)
    assert np.array_equal(rebuilt["zero"], base["zero"])


def test_i8_rounds_each_element_by_at_most_half_its_tensors_scale_and_f16_closer():
    base, new = models()
    tensors, rebuilt = delta_step(base, new, "i8")
    for doc in tensors:
        name = doc["name"]
        error = np.abs(rebuilt[name].astype(np.float64) - new[name].astype(np.float64))
        assert error.max() <= doc["scale"] / 2 + 1e-6
    _, f16 = delta_step(base, new, "f16")
    assert max(np.abs(f16[k] - new[k]).max() for k in base) < max(np.abs(rebuilt[k] - new[k]).max() for k in base)


def test_the_step_is_deterministic_and_int8_is_a_quarter_of_the_float32_model():
    base, new = models(3)
    first, second = delta_step(base, new, "i8"), delta_step(base, new, "i8")
    assert schemas.encode_delta(first[0]) == schemas.encode_delta(second[0])
    assert all(first[1][k].tobytes() == second[1][k].tobytes() for k in base)
    rng = np.random.default_rng(1)
    big = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    moved = {"w": (big["w"] + 0.01).astype(np.float32)}
    full, delta = len(schemas.encode_model(moved)), len(schemas.encode_delta(delta_step(big, moved, "i8")[0]))
    assert delta < full / 3.9


def test_a_step_f16_cannot_hold_or_other_shapes_are_refused():
    base, new = models()
    with pytest.raises(NonFiniteValues):
        delta_step(base, {**new, "b": new["b"] + 1e6}, "f16")
    with pytest.raises(BadTensor):
        delta_step(base, {**new, "b": np.zeros(9, np.float32)}, "i8")
    with pytest.raises(BadTensor):
        delta_step(base, new, "f32")  # not a delta codec
    with pytest.raises(BadTensor):
        apply_delta(base, {"w": np.zeros((16, 8), np.float32)})
    with pytest.raises(NonFiniteValues):
        apply_delta({"x": np.full(2, 3e38, np.float32)}, {"x": np.full(2, 3e38, np.float32)})


def test_a_delta_attachment_is_decoded_strictly():
    base, new = models()
    tensors, _ = delta_step(base, new, "i8")
    with pytest.raises(SchemaError):  # every tensor in the signed codec
        schemas.decode_delta(schemas.encode_delta(tensors), "f16")
    with pytest.raises(SchemaError):
        schemas.decode_delta(cbor.dumps({"tensors": tensors, "extra": 1}), "i8")
    with pytest.raises(LimitExceeded):
        schemas.decode_delta(b"\0" * (schemas.MAX_DELTA_BYTES + 1), "i8")
    broken = [dict(t) for t in tensors]
    broken[0]["data"] = broken[0]["data"][:-1]
    with pytest.raises(BadTensor):
        schemas.decode_delta(schemas.encode_delta(broken), "i8")
    assert set(decode_tensors(tensors)) == set(base)


def delta_body(**changes):
    body = schemas.ModelDelta(b"d" * 32, b"t" * 32, b"b" * 32, 4, "arch", time.time() + 60, 100, "i8").to_body()
    return {**body, **changes}


def test_a_delta_release_is_read_strictly():
    delta = schemas.ModelDelta.from_body(delta_body())
    assert (delta.target, delta.base, delta.version, delta.codec) == (b"t" * 32, b"b" * 32, 4, "i8")
    release = delta.release()  # what the device's release checks see
    assert (release.digest, release.version, release.architecture, release.expires) == (
        b"t" * 32, 4, "arch", delta.expires)
    for bad in (delta_body(codec="f32"), delta_body(size=schemas.MAX_DELTA_BYTES + 1), delta_body(size=0),
                delta_body(base=b"t" * 32), delta_body(target=b"short"), {**delta_body(), "chunks": 1},
                {k: v for k, v in delta_body().items() if k != "base"}):
        with pytest.raises(ProtocolError):
            schemas.ModelDelta.from_body(bad)
    with pytest.raises(schemas.NoExpiry):
        schemas.ModelDelta.from_body(delta_body(expires=0.0))


def test_a_task_names_a_delta_base_only_when_there_is_one():
    config = schemas.TrainConfig()
    plain = schemas.Task("train", "dev", config).to_body()
    assert schemas.DELTA_BASE not in plain  # the signed bytes of a task without a delta are what they were
    assert schemas.Task.from_body(plain).delta_base == b""
    body = schemas.Task("train", "dev", config, delta_base=b"x" * 32).to_body()
    assert schemas.Task.from_body(body).delta_base == b"x" * 32
    for bad in (b"x" * 31, "x" * 32, b""):
        with pytest.raises(SchemaError):
            schemas.Task.from_body({**body, schemas.DELTA_BASE: bad})
