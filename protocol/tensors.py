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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import BadTensor, LimitExceeded, NonFiniteValues, SchemaError, _brief
from .fields import is_int

CODECS = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "i8": np.dtype("i1")}
NAME_MAX = 64


@dataclass(frozen=True)
class TensorLimits:
    """What a decoder accepts. Defaults fit the shipped models with room to spare."""

    max_tensors: int = 64
    max_rank: int = 4
    max_elements: int = 1 << 20  # per tensor
    max_total_elements: int = 4 << 20


DEFAULT_LIMITS = TensorLimits()


def encode_tensor(name: str, array: np.ndarray, codec: str = "f32") -> dict[str, Any]:
    """Encode one array. Raises `NonFiniteValues` for NaN/inf, `BadTensor` for an unknown codec."""
    if codec not in CODECS:
        raise BadTensor(f"unknown codec {codec!r}")
    values = np.asarray(array, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise NonFiniteValues(f"tensor {name!r} has NaN or infinite values")
    doc: dict[str, Any] = {"name": name, "codec": codec, "shape": list(values.shape)}
    if codec == "i8":
        peak = float(np.max(np.abs(values))) if values.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        quantized = np.clip(np.rint(values.astype(np.float64) / scale), -127, 127).astype(CODECS["i8"])
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
    expected = {"name", "codec", "shape", "data"} | ({"scale"} if doc.get("codec") == "i8" else set())
    if set(doc) != expected:
        raise SchemaError(f"tensor fields are {sorted(map(_brief, doc))}, expected {sorted(expected)}")
    name, codec, shape, data = doc["name"], doc["codec"], doc["shape"], doc["data"]
    if not isinstance(name, str) or not 0 < len(name) <= NAME_MAX:
        raise SchemaError("tensor name must be a string of 1 to 64 characters")
    if not isinstance(codec, str) or codec not in CODECS:
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


def encode_tensors(arrays: Mapping[str, np.ndarray], codec: str = "f32") -> list[dict[str, Any]]:
    """Encode named arrays, in the mapping's order."""
    return [encode_tensor(name, array, codec) for name, array in arrays.items()]


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
