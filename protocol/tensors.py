"""Tensor codecs: f32, f16 and int8 with a per-tensor scale, as raw bytes.

A tensor on the wire is a small map
`{"name": str, "codec": "f32"|"f16"|"i8", "shape": [int], "data": bytes}`
plus `"scale": float` for int8. Data is little-endian `ndarray.tobytes()`,
never a list of floats (about 100x cheaper to encode and decode).

int8 is symmetric: q = round(x / scale) clipped to [-127, 127], with
scale = max|x| / 127, so zero stays exactly zero and the error per element
is at most scale / 2 (plus the float32 rounding of the result). Quantizing
and dequantizing are done in float64 with the scale exactly as sent: in
float32 a scale below the normal range loses its precision or becomes 0, and
127 * scale can round up past the largest float32 to infinity.

f16 holds magnitudes up to 65504; encoding a larger value is refused rather
than sent as an infinity that every decoder rejects.

topk is sparse: per tensor, only the k = ceil(density x size) entries of
largest magnitude are sent (at least 1 of a non-empty tensor), as
`{"name", "codec": "topk", "shape", "index": bytes, "data": bytes, "scale": float}`:
`index` holds their flat (row-major) positions, strictly increasing, as
little-endian unsigned integers of the narrowest width that addresses the
tensor (u8 up to 256 elements, u16 up to 65536, else u32: `index_dtype`);
`data` their values in int8 with one symmetric per-tensor scale, as for i8
(the scale from the largest sent magnitude). Every other entry decodes to 0.
At density 0.1 that is about 3 bytes per sent entry, 0.3 bytes per weight
against i8's 1. The decoder refuses indices out of range, unsorted or
repeated, an index array whose length is not a whole number of entries, a
value count unlike the index count, more entries than the tensor has, and a
scale that is not finite and positive. What the entries left out would have
added is the sender's to keep (agent/error_feedback.py): the decoded tensor
is exactly `topk_dense` of what was sent.

A release's step from its parent (`delta_step`, `apply_delta`) travels to devices that hold the parent
as the dense difference in `DELTA_CODECS` (i8 or f16, encoded as above). The released model is
defined as what a device rebuilds, `parent + decode(encode(new - parent))` in float32, so the gateway,
every device and an auditor's recompute compute the same bits from the same wire tensors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadTensor, LimitExceeded, NonFiniteValues, SchemaError, _brief
from .fields import is_int, is_number

CODECS = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i8": np.dtype("i1")}  # dense codecs
TOPK = "topk"  # the sparse codec
UPLOAD_CODECS = ("i8", "f16", "f32", TOPK)  # what a task may ask a device to encode its update in
DEFAULT_DENSITY = 0.1  # topk: the share of each tensor's entries sent, in (0, 1]
DELTA_CODECS = ("i8", "f16")  # how a release's step from its parent may travel (a delta download)
NAME_MAX = 64


@dataclass(frozen=True)
class TensorLimits:
    """What a decoder accepts. Defaults fit the shipped models with room to spare."""

    max_tensors: int = 64
    max_rank: int = 4
    max_elements: int = 1 << 20  # per tensor
    max_total_elements: int = 4 << 20


DEFAULT_LIMITS = TensorLimits()


def check_density(density: Any) -> float:
    """A topk density: a number in (0, 1] (ValueError otherwise)."""
    if not is_number(density) or not 0.0 < density <= 1.0:
        raise ValueError(f"density must be a number in (0, 1], got {_brief(density)}")
    return float(density)


def topk_count(size: int, density: float) -> int:
    """Entries topk sends of a tensor of `size` elements: ceil(density x size), at least 1 (0 of an empty one)."""
    if size == 0:
        return 0
    return min(size, max(1, math.ceil(density * size - 1e-9)))


def index_dtype(size: int) -> np.dtype:
    """The index width for a tensor of `size` elements: the narrowest unsigned type that addresses it."""
    return np.dtype("<u1") if size <= 1 << 8 else np.dtype("<u2") if size <= 1 << 16 else np.dtype("<u4")


def _quantize_i8(values: np.ndarray) -> tuple[np.ndarray, float]:
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    return np.clip(np.rint(values.astype(np.float64) / scale), -127, 127).astype(CODECS["i8"]), scale


def topk_select(values: np.ndarray, density: float) -> tuple[np.ndarray, np.ndarray, float]:
    """(sorted flat indices, int8 values, scale) of the `topk_count` largest-magnitude entries of a finite array."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    k = topk_count(flat.size, density)
    if k == flat.size:
        index = np.arange(k)
    else:
        index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
    quantized, scale = _quantize_i8(flat[index])
    return index.astype(index_dtype(flat.size)), quantized, scale


def topk_dense(shape: tuple[int, ...] | list[int], index: np.ndarray, quantized: np.ndarray, scale: float,
               dequantize: bool = True) -> np.ndarray:
    """The dense tensor a topk encoding stands for: float32 (or, `dequantize=False`, int8) zeros but at `index`."""
    out = np.zeros(math.prod(shape), dtype=np.float32 if dequantize else CODECS["i8"])
    with np.errstate(over="ignore"):  # a huge scale gives inf, which the decoder refuses
        out[index] = (quantized.astype(np.float64) * scale).astype(np.float32) if dequantize else quantized
    return out.reshape(shape)


def encode_tensor(name: str, array: np.ndarray, codec: str = "f32", density: float = DEFAULT_DENSITY) -> dict[str, Any]:
    """Encode one array (`density`: topk's share of entries sent). Raises `NonFiniteValues` for NaN/inf,
    `BadTensor` for an unknown codec or a density outside (0, 1]."""
    if codec not in CODECS and codec != TOPK:
        raise BadTensor(f"unknown codec {codec!r}")
    values = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise NonFiniteValues(f"tensor {name!r} has NaN or infinite values")
    doc: dict[str, Any] = {"name": name, "codec": codec, "shape": list(values.shape)}
    if codec == TOPK:
        try:
            density = check_density(density)
        except ValueError as exc:
            raise BadTensor(str(exc)) from None
        index, quantized, scale = topk_select(values, density)
        doc.update(index=index.tobytes(), data=quantized.tobytes(), scale=scale)
        return doc
    if codec == "i8":
        quantized, scale = _quantize_i8(values)
        doc["scale"] = scale
        doc["data"] = quantized.tobytes()
    else:
        with np.errstate(over="ignore"):
            converted = values.astype(CODECS[codec])
        if not np.all(np.isfinite(converted)):
            raise NonFiniteValues(f"tensor {name!r} has values outside the {codec} range")
        doc["data"] = converted.tobytes()
    return doc


def decode_tensor(doc: Any, limits: TensorLimits = DEFAULT_LIMITS, dequantize: bool = True) -> tuple[str, np.ndarray]:
    """Decode one wire tensor into (name, float32 array), checking every field.

    With `dequantize=False` the same checks run but the array comes back in its wire dtype
    (int8, float16 ...): a gateway checking thousands of replies need not build floats yet.
    """
    if not isinstance(doc, dict):
        raise SchemaError("a tensor must be a map")
    codec = doc.get("codec")
    expected = ({"name", "codec", "shape", "data"} | ({"scale"} if codec in ("i8", TOPK) else set())
                | ({"index"} if codec == TOPK else set()))
    if set(doc) != expected:
        raise SchemaError(f"tensor fields are {sorted(map(_brief, doc))}, expected {sorted(expected)}")
    name, codec, shape, data = doc["name"], doc["codec"], doc["shape"], doc["data"]
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX:
        raise SchemaError("tensor name must be a string of 1 to 64 characters")
    if not isinstance(codec, str) or (codec not in CODECS and codec != TOPK):
        raise BadTensor(f"unknown codec {_brief(codec)}")
    if not isinstance(shape, list) or len(shape) > limits.max_rank:
        raise LimitExceeded(f"tensor {name!r}: shape must be a list of at most {limits.max_rank} dims")
    if not all(is_int(d) and d >= 0 for d in shape):
        raise BadTensor(f"tensor {name!r}: dimensions must be non-negative integers")
    # Each dimension on its own too: with a zero dimension the product stays 0
    # however large the others are, and numpy cannot build such a shape.
    if any(d > limits.max_elements for d in shape):
        raise LimitExceeded(f"tensor {name!r}: a dimension is over {limits.max_elements}")
    count = math.prod(shape)
    if count > limits.max_elements:
        raise LimitExceeded(f"tensor {name!r}: {count} elements, limit {limits.max_elements}")
    if not isinstance(data, bytes):
        raise SchemaError(f"tensor {name!r}: data must be a byte string")
    if codec == TOPK:
        return name, _decode_topk(name, shape, count, doc["index"], data, doc["scale"], dequantize)
    dtype = CODECS[codec]
    if len(data) != count * dtype.itemsize:
        raise BadTensor(f"tensor {name!r}: {len(data)} bytes for {count} {codec} values")
    values = np.frombuffer(data, dtype=dtype).reshape(shape)
    if codec == "i8":
        scale = doc["scale"]
        if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
            raise BadTensor(f"tensor {name!r}: int8 scale must be a finite positive float")
        if not dequantize:
            # value * scale grows with |value|: if the largest one stays finite in float32, all do.
            peak = max(-int(values.min()), int(values.max())) if values.size else 0
            with np.errstate(over="ignore"):
                if not np.isfinite(np.float32(peak * scale)):
                    raise NonFiniteValues(f"tensor {name!r} has NaN or infinite values")
            return name, values
        with np.errstate(over="ignore"):  # a huge scale gives inf, refused just below
            out = (values.astype(np.float64) * scale).astype(np.float32)
    elif not dequantize:
        out = values
    else:
        out = values.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise NonFiniteValues(f"tensor {name!r} has NaN or infinite values")
    return name, out


def _decode_topk(name: str, shape: list[int], count: int, index: Any, data: bytes, scale: Any,
                 dequantize: bool) -> np.ndarray:
    """A topk tensor's dense array (float32, or int8 with `dequantize=False`), every field checked."""
    if not isinstance(index, bytes):
        raise SchemaError(f"tensor {name!r}: index must be a byte string")
    dtype = index_dtype(count)
    if len(index) % dtype.itemsize:
        raise BadTensor(f"tensor {name!r}: {len(index)} index bytes are not a whole number of {dtype.itemsize}-byte "
                        f"indices")
    entries = len(index) // dtype.itemsize
    if entries > count:
        raise LimitExceeded(f"tensor {name!r}: {entries} entries for {count} elements")
    if len(data) != entries:
        raise BadTensor(f"tensor {name!r}: {len(data)} values for {entries} indices")
    if not isinstance(scale, float) or not math.isfinite(scale) or scale <= 0:
        raise BadTensor(f"tensor {name!r}: topk scale must be a finite positive float")
    positions = np.frombuffer(index, dtype=dtype)
    if entries and int(positions[-1]) >= count:
        raise BadTensor(f"tensor {name!r}: index {int(positions[-1])} out of range for {count} elements")
    if entries > 1 and not np.all(positions[1:] > positions[:-1]):
        raise BadTensor(f"tensor {name!r}: indices must be strictly increasing (sorted, none repeated)")
    quantized = np.frombuffer(data, dtype=CODECS["i8"])
    peak = max(-int(quantized.min()), int(quantized.max())) if entries else 0
    with np.errstate(over="ignore"):  # value * scale grows with |value|: if the largest stays finite, all do
        if not np.isfinite(np.float32(peak * scale)):
            raise NonFiniteValues(f"tensor {name!r} has NaN or infinite values")
    return topk_dense(shape, positions, quantized, scale, dequantize)


def encode_tensors(arrays: Mapping[str, np.ndarray], codec: str = "f32",
                   density: float = DEFAULT_DENSITY) -> list[dict[str, Any]]:
    """Encode named arrays, in the mapping's order (`density`: topk's share of each tensor's entries)."""
    return [encode_tensor(name, array, codec, density) for name, array in arrays.items()]


def decode_tensors(docs: Any, limits: TensorLimits = DEFAULT_LIMITS, dequantize: bool = True) -> dict[str, np.ndarray]:
    """Decode a list of wire tensors into an ordered name -> float32 array map (see decode_tensor)."""
    if not isinstance(docs, list):
        raise SchemaError("tensors must be a list")
    if len(docs) > limits.max_tensors:
        raise LimitExceeded(f"{len(docs)} tensors, limit {limits.max_tensors}")
    out: dict[str, np.ndarray] = {}
    total = 0
    for doc in docs:
        name, array = decode_tensor(doc, limits, dequantize)
        if name in out:
            raise SchemaError(f"tensor {name!r} appears twice")
        total += array.size
        if total > limits.max_total_elements:
            raise LimitExceeded(f"more than {limits.max_total_elements} elements in all")
        out[name] = array
    return out


def delta_step(base: Mapping[str, np.ndarray], new: Mapping[str, np.ndarray],
               codec: str) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    """(the wire tensors of `new - base` in `codec`, the model a device rebuilds from them: `apply_delta`),
    both in the base's tensor order.

    The rebuilt model, not `new`, is what a gateway releases: it is the only one devices can have. Raises
    `NonFiniteValues` for a step f16 cannot hold (or non-finite weights), `BadTensor` for a codec outside
    `DELTA_CODECS` or weights whose names or shapes differ."""
    if codec not in DELTA_CODECS:
        raise BadTensor(f"a delta's codec must be one of {DELTA_CODECS}, got {codec!r}")
    if set(base) != set(new) or any(np.shape(base[k]) != np.shape(new[k]) for k in base):
        raise BadTensor("a delta needs the same tensors, names and shapes, on both sides")
    step = {k: np.asarray(new[k], dtype=np.float32) - np.asarray(base[k], dtype=np.float32) for k in base}
    docs = encode_tensors(step, codec)
    return docs, apply_delta(base, decode_tensors(docs))


def apply_delta(base: Mapping[str, np.ndarray], step: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`base + step`, tensor by tensor in float32 (one IEEE addition per element: the same bits everywhere).
    Raises `NonFiniteValues` when a sum overflows, `BadTensor` when the names or shapes differ."""
    if list(base) != list(step) or any(np.shape(base[k]) != np.shape(step[k]) for k in base):
        raise BadTensor("a delta's tensors must be the base model's, names and shapes")
    with np.errstate(over="ignore"):
        out = {k: np.asarray(base[k], dtype=np.float32) + np.asarray(step[k], dtype=np.float32) for k in base}
    if not all(np.all(np.isfinite(v)) for v in out.values()):
        raise NonFiniteValues("the base model plus the delta is not finite")
    return out
