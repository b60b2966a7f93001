"""The sparse topk codec: round trips, exact counts, and hostile payloads refused with a reason."""

from __future__ import annotations

import math

import numpy as np
import pytest

from protocol import cbor, schemas, tensors
from protocol.errors import BadTensor, LimitExceeded, NonFiniteValues, ProtocolError, SchemaError

RNG = np.random.default_rng(7)
ARRAY = RNG.normal(size=(40, 30)).astype(np.float32)


@pytest.mark.parametrize("shape, density", [((40, 30), 0.1), ((40, 30), 0.05), ((7,), 0.1), ((300,), 0.5),
                                            ((5, 32, 64), 0.1), ((70000,), 0.01), ((3,), 1.0), ((), 0.3)])
def test_topk_round_trip_keeps_the_largest_entries_within_half_a_step(shape, density):
    array = RNG.normal(size=shape).astype(np.float32)
    doc = tensors.encode_tensor("w", array, "topk", density)
    k = tensors.topk_count(array.size, density)
    assert k == min(array.size, max(1, math.ceil(density * array.size - 1e-9)))
    width = tensors.index_dtype(array.size).itemsize
    assert len(doc["index"]) == k * width and len(doc["data"]) == k
    name, out = tensors.decode_tensor(doc)
    assert name == "w" and out.shape == array.shape and out.dtype == np.float32
    sent = np.flatnonzero(out.reshape(-1) != 0)
    assert len(sent) <= k
    chosen = np.frombuffer(doc["index"], tensors.index_dtype(array.size))
    # the chosen entries are the k largest in magnitude
    threshold = np.sort(np.abs(array.reshape(-1)))[-k]
    assert np.all(np.abs(array.reshape(-1)[chosen]) >= threshold)
    np.testing.assert_allclose(out.reshape(-1)[chosen], array.reshape(-1)[chosen], atol=doc["scale"] / 2 + 1e-7)
    rest = np.setdiff1d(np.arange(array.size), chosen)
    assert np.all(out.reshape(-1)[rest] == 0)
    _, wire = tensors.decode_tensor(doc, dequantize=False)
    assert wire.dtype == np.int8 and wire.shape == array.shape


def test_index_width_follows_the_tensor_size():
    assert [tensors.index_dtype(n).itemsize for n in (1, 256, 257, 65536, 65537)] == [1, 1, 2, 2, 4]


def test_a_topk_update_is_a_fraction_of_an_int8_one_and_check_update_agrees_with_decode():
    delta = {"a": ARRAY, "b": RNG.normal(size=(64,)).astype(np.float32)}
    sparse = schemas.encode_update(delta, {"train_loss": 1.0}, "topk", 0.1)
    dense = schemas.encode_update(delta, {"train_loss": 1.0}, "i8")
    assert len(sparse) < 0.4 * len(dense)
    decoded, metrics = schemas.decode_update(sparse)
    checked = schemas.check_update(sparse)
    assert checked.shapes == {"a": (40, 30), "b": (64,)} and metrics == checked.metrics == {"train_loss": 1.0}
    assert {k: v.shape for k, v in decoded.items()} == checked.shapes
    # what admission compares with the task: each tensor's codec and the entries sent (k = ceil(0.1 x size))
    assert checked.encodings == {"a": ("topk", 120), "b": ("topk", 7)}
    assert schemas.check_update(dense).encodings == {"a": ("i8", 1200), "b": ("i8", 64)}


def test_an_all_zero_tensor_still_encodes_and_decodes_to_zeros():
    _, out = tensors.decode_tensor(tensors.encode_tensor("z", np.zeros((10, 10)), "topk", 0.1))
    assert np.all(out == 0)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True])
def test_encoding_refuses_a_density_outside_0_1(density):
    with pytest.raises(BadTensor, match="density"):
        tensors.encode_tensor("w", ARRAY, "topk", density)


def good(size: int = 20, **changes) -> dict:
    doc = tensors.encode_tensor("w", np.arange(1, size + 1, dtype=np.float32), "topk", 0.25)
    return {**doc, **changes}


def u8(*values: int) -> bytes:
    return np.array(values, dtype="<u1").tobytes()


@pytest.mark.parametrize("changes, error, words", [
    ({"index": u8(3, 3, 5, 7, 9)}, BadTensor, "strictly increasing"),  # a duplicate
    ({"index": u8(9, 3, 5, 7, 1)}, BadTensor, "strictly increasing"),  # unsorted
    ({"index": u8(1, 3, 5, 7, 20)}, BadTensor, "out of range"),  # one past the end
    ({"index": u8(1, 3, 5, 7, 255)}, BadTensor, "out of range"),
    ({"index": u8(1, 3, 5, 7)}, BadTensor, "4 indices"),  # 5 values, 4 indices
    ({"data": b"\x01\x02"}, BadTensor, "2 values for 5 indices"),
    ({"index": bytes(range(21)), "data": bytes(21)}, LimitExceeded, "21 entries for 20 elements"),
    ({"scale": float("nan")}, BadTensor, "scale"),
    ({"scale": float("inf")}, BadTensor, "scale"),
    ({"scale": 0.0}, BadTensor, "scale"),
    ({"scale": -1.0}, BadTensor, "scale"),
    ({"scale": 1}, BadTensor, "scale"),  # an int, not a float
    ({"scale": 1e308}, NonFiniteValues, "NaN or infinite"),  # 127 x 1e308 overflows float32
    ({"index": [1, 2, 3, 4, 5]}, SchemaError, "index must be a byte string"),
    ({"data": [1, 2, 3, 4, 5]}, SchemaError, "data must be a byte string"),
    ({"shape": [4, 4]}, BadTensor, "out of range"),  # the indices do not fit the declared shape
    ({"shape": [2_000_000]}, LimitExceeded, "limit"),
])
def test_hostile_topk_tensors_are_refused_with_a_reason(changes, error, words):
    doc = good(**changes)
    with pytest.raises(error, match=words) as caught:
        tensors.decode_tensor(doc)
    assert caught.value.reason in {"bad_tensor", "limits", "schema", "non_finite"}
    with pytest.raises(error):  # the gateway's stage-1 check refuses the very same
        tensors.decode_tensor(doc, dequantize=False)


def test_a_16_bit_index_array_of_odd_length_is_refused():
    doc = tensors.encode_tensor("w", np.arange(1000, dtype=np.float32), "topk", 0.1)
    with pytest.raises(BadTensor, match="whole number of 2-byte indices"):
        tensors.decode_tensor({**doc, "index": doc["index"][:-1]})


@pytest.mark.parametrize("drop, add", [("index", None), ("scale", None), (None, ("extra", 1))])
def test_a_topk_tensor_needs_exactly_its_fields(drop, add):
    doc = good()
    if drop:
        del doc[drop]
    if add:
        doc[add[0]] = add[1]
    with pytest.raises(SchemaError, match="tensor fields"):
        tensors.decode_tensor(doc)


def test_a_dense_tensor_may_not_carry_an_index():
    doc = {**tensors.encode_tensor("w", ARRAY, "i8"), "index": b""}
    with pytest.raises(SchemaError, match="tensor fields"):
        tensors.decode_tensor(doc)


def test_hostile_updates_fail_through_decode_and_check_alike():
    update = cbor.dumps({"tensors": [good(index=u8(3, 3, 5, 7, 9))], "metrics": {}})
    for decode in (schemas.decode_update, schemas.check_update):
        with pytest.raises(ProtocolError) as caught:
            decode(update)
        assert caught.value.reason == "bad_tensor"


def test_a_topk_task_carries_its_density_and_a_dense_one_none():
    config = schemas.TrainConfig()
    sparse = schemas.Task("train", "d", config, "topk", 0.05)
    body = sparse.to_body()
    assert body["density"] == 0.05 and schemas.Task.from_body(body) == sparse
    assert "density" not in schemas.Task("train", "d", config, "i8").to_body()
    assert schemas.Task.from_body(cbor.loads(cbor.dumps(body))) == sparse


@pytest.mark.parametrize("change, match", [
    ({"codec": "topk"}, "missing field"),  # topk without its density
    ({"density": 0.1}, "unknown field"),  # a dense codec with a density
    ({"codec": "topk", "density": 0.0}, "above 0"),
    ({"codec": "topk", "density": 1.5}, "outside"),
    ({"codec": "topk", "density": 1}, "must be a float"),
    ({"codec": "topk", "density": float("nan")}, "density"),
    ({"codec": "zip"}, "unknown codec"),
])
def test_a_task_with_a_bad_codec_or_density_is_refused(change, match):
    body = {**schemas.Task("train", "d").to_body(), **change}
    with pytest.raises(ProtocolError, match=match):
        schemas.Task.from_body(body)


def test_a_task_with_a_bad_density_cannot_be_made():
    with pytest.raises(ValueError, match="density"):
        schemas.Task("train", "d", schemas.TrainConfig(), "topk", 0.0).to_body()
