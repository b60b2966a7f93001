"""`starling-models inspect FILE`: what a `.tflite` file holds, without TensorFlow.

Reports its size and digest, every signature with its inputs and outputs
(shape, dtype, and the int8 scale / zero point where quantized), the
operator names, and the parameter count:
  * a trainable Starling model: the elements of its `set_weights` inputs
    (the weights federated training moves);
  * any other model (an MCU export): the elements of the constant weights and
    biases of its CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED,
    TRANSPOSE_CONV and BATCH_MATMUL operators, which for an export equals the
    trained model's count.
Everything is read from the flatbuffer (`firmware_models.tflite_file`), so
it works the same under LiteRT, tflite-runtime or with no interpreter.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from firmware_models import tflite_file
from firmware_models.runtime import op_names

# builtin code -> input positions that hold weights / biases
_WEIGHT_INPUTS = {3: (1, 2), 4: (1, 2), 9: (1, 2), 67: (1, 3), 126: (1,)}


def _tensor(t: tflite_file.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(t.shape), "dtype": t.dtype}
    if t.dtype in ("int8", "uint8", "int16") and t.scale:
        out["scale"] = t.scale[0] if len(t.scale) == 1 else t.scale
        out["zero_point"] = t.zero_point[0] if len(t.zero_point) == 1 else t.zero_point
    return out


def parameter_count(model: tflite_file.ModelFile) -> tuple[int, str]:
    """(count, how it was counted); see the module doc."""
    for sig in model.signatures:
        if sig.key == "set_weights":
            tensors = model.subgraphs[sig.subgraph].tensors
            return sum(tensors[i].size for i in sig.inputs.values()), "set_weights signature inputs"
    seen: set[tuple[int, int]] = set()
    total = 0
    for g, sg in enumerate(model.subgraphs):
        for op in sg.operators:
            for pos in _WEIGHT_INPUTS.get(op.code, ()):
                if pos < len(op.inputs) and op.inputs[pos] >= 0:
                    t = sg.tensors[op.inputs[pos]]
                    if t.constant and (g, op.inputs[pos]) not in seen:
                        seen.add((g, op.inputs[pos]))
                        total += t.size
    return total, "constant weights and biases of conv / fully-connected / matmul ops"


def inspect_file(path: str | Path) -> dict[str, Any]:
    """The inspection report of one `.tflite` file, JSON-ready."""
    data = Path(path).read_bytes()
    model = tflite_file.read(data)
    signatures: dict[str, Any] = {}
    for sig in model.signatures:
        tensors = model.subgraphs[sig.subgraph].tensors
        signatures[sig.key] = {
            "inputs": {n: _tensor(tensors[i]) for n, i in sorted(sig.inputs.items())},
            "outputs": {n: _tensor(tensors[i]) for n, i in sorted(sig.outputs.items())},
        }
    if not signatures and model.subgraphs:  # a bare graph: describe the main subgraph's inputs/outputs
        main = model.subgraphs[0]
        signatures["(main graph)"] = {
            "inputs": {main.tensors[i].name: _tensor(main.tensors[i]) for i in main.inputs},
            "outputs": {main.tensors[i].name: _tensor(main.tensors[i]) for i in main.outputs},
        }
    params, counted = parameter_count(model)
    return {
        "file": str(path),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "trainable": {"train", "get_weights", "set_weights"} <= {s.key for s in model.signatures},
        "signatures": signatures,
        "ops": op_names(data),
        "operators": sum(len(sg.operators) for sg in model.subgraphs),
        "subgraphs": len(model.subgraphs),
        "parameter_count": params,
        "parameters_counted_from": counted,
    }
