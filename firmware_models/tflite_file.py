"""Read a `.tflite` file's structure straight from its flatbuffer (stdlib + numpy, no interpreter).

`starling-models inspect` and the MCU export's tensor-arena estimate need
the graph itself: tensors (shape, type, constant or not, quantization),
operators with their inputs and outputs, and the signature table. Reading
the flatbuffer directly works the same without TensorFlow, under LiteRT,
under tflite-runtime (which ships no schema module), and for models an
interpreter could not even load.

Only the fields used here are read; field numbers follow the TFLite schema
(`schema.fbs`): Model, SubGraph, Tensor, Operator, Buffer, SignatureDef,
TensorMap and QuantizationParameters.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from firmware_models.runtime import _field, _indirect, operator_codes

TYPES: dict[int, tuple[str, float]] = {
    0: ("float32", 4), 1: ("float16", 2), 2: ("int32", 4), 3: ("uint8", 1), 4: ("int64", 8),
    5: ("string", 0), 6: ("bool", 1), 7: ("int16", 2), 8: ("complex64", 8), 9: ("int8", 1),
    10: ("float64", 8), 11: ("complex128", 16), 12: ("uint64", 8), 13: ("resource", 0),
    14: ("variant", 0), 15: ("uint32", 4), 16: ("uint16", 2), 17: ("int4", 0.5),
}
"""TensorType code -> (numpy-style name, bytes per element)."""


@dataclass
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str
    itemsize: float
    constant: bool
    """Its values are stored in the file (a weight or another constant), not computed."""
    variable: bool
    scale: list[float] = field(default_factory=list)
    zero_point: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= max(int(d), 0)
        return n

    @property
    def nbytes(self) -> int:
        return int(self.size * self.itemsize + 0.5)


@dataclass
class Operator:
    code: int
    custom: str | None
    inputs: list[int]
    outputs: list[int]


@dataclass
class Subgraph:
    name: str
    tensors: list[Tensor]
    inputs: list[int]
    outputs: list[int]
    operators: list[Operator]


@dataclass
class Signature:
    key: str
    subgraph: int
    inputs: dict[str, int]
    outputs: dict[str, int]


@dataclass
class ModelFile:
    subgraphs: list[Subgraph]
    signatures: list[Signature]


def _u8(buf: bytes, at: int | None, default: int = 0) -> int:
    return struct.unpack_from("<B", buf, at)[0] if at is not None else default


def _u32(buf: bytes, at: int | None, default: int = 0) -> int:
    return struct.unpack_from("<I", buf, at)[0] if at is not None else default


def _vector(buf: bytes, at: int | None) -> tuple[int, int]:
    """(start of elements, count) of the vector referenced at `at`; (0, 0) if absent."""
    if at is None:
        return 0, 0
    vec = _indirect(buf, at)
    return vec + 4, struct.unpack_from("<I", buf, vec)[0]


def _ints(buf: bytes, at: int | None, fmt: str = "<i") -> list[int]:
    start, count = _vector(buf, at)
    size = struct.calcsize(fmt)
    return [struct.unpack_from(fmt, buf, start + size * i)[0] for i in range(count)]


def _tables(buf: bytes, at: int | None) -> list[int]:
    start, count = _vector(buf, at)
    return [_indirect(buf, start + 4 * i) for i in range(count)]


def _string(buf: bytes, at: int | None) -> str:
    if at is None:
        return ""
    start = _indirect(buf, at)
    length = struct.unpack_from("<I", buf, start)[0]
    return buf[start + 4 : start + 4 + length].decode("utf-8", "replace")


def read(model: bytes) -> ModelFile:
    """Subgraphs (tensors, operators, inputs, outputs) and signatures of a `.tflite` model."""
    buf = bytes(model)
    codes = operator_codes(buf)  # also checks the TFL3 identifier
    root = _indirect(buf, 0)
    constant_buffers = set()
    for index, table in enumerate(_tables(buf, _field(buf, root, 4))):  # Model.buffers
        _, data_len = _vector(buf, _field(buf, table, 0))
        size_at = _field(buf, table, 2)
        if data_len or (size_at is not None and struct.unpack_from("<Q", buf, size_at)[0]):
            constant_buffers.add(index)
    subgraphs = []
    for sg in _tables(buf, _field(buf, root, 2)):  # Model.subgraphs
        tensors = []
        for t in _tables(buf, _field(buf, sg, 0)):
            dtype, itemsize = TYPES.get(_u8(buf, _field(buf, t, 1)), ("unknown", 0))
            quant = _field(buf, t, 4)
            qtable = _indirect(buf, quant) if quant is not None else None
            tensors.append(Tensor(
                name=_string(buf, _field(buf, t, 3)),
                shape=tuple(_ints(buf, _field(buf, t, 0))),
                dtype=dtype,
                itemsize=itemsize,
                constant=_u32(buf, _field(buf, t, 2)) in constant_buffers,
                variable=bool(_u8(buf, _field(buf, t, 5))),
                scale=[float(v) for v in _ints(buf, _field(buf, qtable, 2), "<f")] if qtable else [],
                zero_point=_ints(buf, _field(buf, qtable, 3), "<q") if qtable else [],
            ))
        operators = []
        for op in _tables(buf, _field(buf, sg, 3)):
            code, custom = codes[_u32(buf, _field(buf, op, 0))]
            operators.append(Operator(code, custom, _ints(buf, _field(buf, op, 1)), _ints(buf, _field(buf, op, 2))))
        subgraphs.append(Subgraph(_string(buf, _field(buf, sg, 4)), tensors,
                                  _ints(buf, _field(buf, sg, 1)), _ints(buf, _field(buf, sg, 2)), operators))
    signatures = []
    for sig in _tables(buf, _field(buf, root, 7)):  # Model.signature_defs

        def names(at: int | None) -> dict[str, int]:
            return {_string(buf, _field(buf, m, 0)): _u32(buf, _field(buf, m, 1)) for m in _tables(buf, at)}

        signatures.append(Signature(_string(buf, _field(buf, sig, 2)), _u32(buf, _field(buf, sig, 4)),
                                    names(_field(buf, sig, 0)), names(_field(buf, sig, 1))))
    return ModelFile(subgraphs, signatures)
