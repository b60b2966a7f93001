"""Microcontroller export: a trained model as int8 TFLite + C header for TFLite Micro (TensorFlow).

    starling-models export-mcu --model imu_cnn --weights global.npz --out DIR [--calibration X.npz]

From a built model's manifest (family, options, normalization) and a set of
trained weights (e.g. a global model a gateway released), this builds an
inference-only graph of batch 1 with ordinary ops TFLite Micro has int8
kernels for (CONV_2D, MAX_POOL_2D, MEAN, FULLY_CONNECTED, SOFTMAX,
RESIZE_NEAREST_NEIGHBOR, ...: see `firmware_models.layers`), with the
weights and the input normalization as constants, and writes into DIR:

  * `NAME_float.tflite`: the float32 version, to compare against;
  * `NAME_int8.tflite`: full-integer quantization (int8 input, output, weights
    and activations), calibrated on a representative data set: the
    `--calibration` file's examples (`x`, `X` or `x_train` in an `.npz`), or
    by default the family's reference data (the watch data's training part);
  * `NAME_int8.h`: the int8 model as an `alignas(16)` byte array with its
    length, the input/output scales and zero points, the ops to register
    and an estimate of the tensor arena size (see `arena_estimate`);
  * `NAME_mcu.json`: the same facts, with the digests and the agreement
    of the int8 model with the float one on the test inputs.

The input is in the sensor's own units (the normalization is inside the
graph), so firmware quantizes raw readings with the input scale and zero
point. A classifier's output is its class probabilities (`probs`). A
reconstruction model's output is the `residual` (normalized input minus
its reconstruction); its mean square is the anomaly score, computed by
firmware on the dequantized residual (`anomaly_scores`), because squaring
inside an int8 graph rounds most small errors to zero. Nothing is written if the graph holds an op outside `TFLM_OPS`.
`export_mcu` is the function behind the command; the accuracy bench calls it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from firmware_models import families, tflite_file
from firmware_models.family import CLASSIFICATION
from protocol.atomic import write_atomic

TFLM_OPS = {
    "ADD": "AddAdd", "AVERAGE_POOL_2D": "AddAveragePool2D", "CONCATENATION": "AddConcatenation",
    "CONV_2D": "AddConv2D", "DEPTHWISE_CONV_2D": "AddDepthwiseConv2D", "DEQUANTIZE": "AddDequantize",
    "EXPAND_DIMS": "AddExpandDims", "FULLY_CONNECTED": "AddFullyConnected", "LOGISTIC": "AddLogistic",
    "MAX_POOL_2D": "AddMaxPool2D", "MEAN": "AddMean", "MUL": "AddMul", "PAD": "AddPad",
    "QUANTIZE": "AddQuantize", "RELU": "AddRelu", "RELU6": "AddRelu6", "RESHAPE": "AddReshape",
    "RESIZE_NEAREST_NEIGHBOR": "AddResizeNearestNeighbor", "SOFTMAX": "AddSoftmax",
    "SQUARED_DIFFERENCE": "AddSquaredDifference", "SQUEEZE": "AddSqueeze", "STRIDED_SLICE": "AddStridedSlice",
    "SUB": "AddSub", "SUM": "AddSum", "TANH": "AddTanh", "TRANSPOSE": "AddTranspose",
}
"""Builtin ops an export may use -> the `tflite::MicroMutableOpResolver` method registering each."""

MAX_CALIBRATION = 300
"""Representative examples used for int8 calibration (evenly spread over the given set)."""


# ------------------------------------------------------------------ inputs


def _load_model(model: str | Path) -> tuple[dict[str, Any], Path]:
    """The manifest of a packaged model name or of a folder holding `manifest.json`."""
    folder = Path(model)
    if not (folder / "manifest.json").is_file():
        from firmware_models import model_dir

        folder = model_dir(str(model))
    path = folder / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest for model {model!r} ({path})")
    return json.loads(path.read_text()), folder


def _load_weights(weights: str | Path | Mapping[str, np.ndarray], manifest: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(weights, Mapping):
        arrays = {k: np.asarray(v, np.float32) for k, v in weights.items()}
    else:
        with np.load(weights, allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k], np.float32) for k in npz.files}
    expected = {w["name"]: tuple(w["shape"]) for w in manifest["weights"]}
    if set(arrays) != set(expected):
        raise ValueError(f"weights {sorted(arrays)} do not match {manifest['name']}'s {sorted(expected)}")
    for name, shape in expected.items():
        if arrays[name].shape != shape:
            raise ValueError(f"weight {name!r} is {list(arrays[name].shape)}, {manifest['name']} needs {list(shape)}")
        if not np.all(np.isfinite(arrays[name])):
            raise ValueError(f"weight {name!r} has non-finite values")
    return arrays


def _spread(x: np.ndarray, limit: int) -> np.ndarray:
    """At most `limit` examples evenly spread over `x` (deterministic)."""
    if len(x) <= limit:
        return x
    return x[np.linspace(0, len(x) - 1, limit).round().astype(int)]


# ------------------------------------------------------------------- graph


def _converters(tf: Any, family: Any, opts: Mapping[str, Any], manifest: Mapping[str, Any],
                weights: Mapping[str, np.ndarray]) -> tuple[Any, Any]:
    """Float and int8 converters of the inference graph (the int8 one still needs its dataset)."""
    shape = (1, *manifest["input_shape"])
    mean = np.asarray(manifest["normalization"]["mean"], np.float32)
    std = np.asarray(manifest["normalization"]["std"], np.float32)
    bshape = (1,) * (len(shape) - 1) + (shape[-1],)

    class Export(tf.Module):
        def __init__(self) -> None:
            super().__init__(name=f"{manifest['name']}_mcu")
            self.w = {n: tf.constant(v) for n, v in weights.items()}

        @tf.function(input_signature=[tf.TensorSpec(shape, tf.float32, name="x")])
        def serve(self, x):
            xn = x * tf.constant((1.0 / std).reshape(bshape)) + tf.constant((-mean / std).reshape(bshape))
            out = family.mcu_forward(self.w, xn, opts)
            if family.task == CLASSIFICATION:
                return {"probs": tf.nn.softmax(out, axis=-1)}
            # The residual, not its mean square: squaring in int8 rounds most small errors to zero
            # (the squares' scale is set by the largest one), so firmware squares the dequantized
            # residual instead (see `anomaly_scores`).
            return {"residual": xn - out}

    module = Export()
    concrete = module.serve.get_concrete_function()
    made = []
    for _ in range(2):
        conv = tf.lite.TFLiteConverter.from_concrete_functions([concrete], module)
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        made.append(conv)
    float_conv, int8_conv = made
    int8_conv.optimizations = [tf.lite.Optimize.DEFAULT]
    int8_conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    int8_conv.inference_input_type = tf.int8
    int8_conv.inference_output_type = tf.int8
    return float_conv, int8_conv


# ---------------------------------------------------------------- running


def interpreter_class() -> type:
    """LiteRT, tflite-runtime, or TensorFlow's own interpreter (the build environment has only TF)."""
    from firmware_models.runtime import load_interpreter_class

    try:
        return load_interpreter_class()
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter


def run(model: bytes, x: np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported model on every example of `x` (sensor units); outputs by name, dequantized to float.

    int8 inputs are quantized with the model's input scale and zero point,
    as firmware would do, and int8 outputs dequantized.
    """
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TF's interpreter warns that it is deprecated
        interp = interpreter_class()(model_content=bytes(model), num_threads=1)
    runner = interp.get_signature_runner()
    ins, outs = runner.get_input_details(), runner.get_output_details()
    (in_name, in_d), = ins.items()
    results: dict[str, list[np.ndarray]] = {name: [] for name in outs}
    for example in np.asarray(x, np.float32):
        value = example[None]
        if in_d["dtype"] == np.int8:
            scale, zero = in_d["quantization"]
            value = np.clip(np.round(value / scale) + zero, -128, 127).astype(np.int8)
        got = runner(**{in_name: value})
        for name, d in outs.items():
            out = np.asarray(got[name])
            if d["dtype"] == np.int8:
                scale, zero = d["quantization"]
                out = (out.astype(np.float32) - zero) * scale
            results[name].append(out[0].astype(np.float32))
    return {name: np.stack(v) if v else np.zeros((0,), np.float32) for name, v in results.items()}


# ------------------------------------------------------------ arena estimate


def arena_estimate(model: bytes) -> dict[str, int]:
    """An estimate of the TFLite Micro tensor arena for `model`, in bytes.

    How: walk the main subgraph's operators in order; every non-constant
    tensor lives from the operator that writes it (graph inputs: from the
    start) to the last operator that reads it (graph outputs: to the end).
    The peak over the operators of the live tensors' sizes, each rounded up
    to 16 bytes, is what TFLM's memory planner needs at best for
    activations. On top come TFLM's own records (about 64 bytes per tensor
    and 128 per operator) and the per-channel requantization data of int8
    conv / fully-connected kernels (8 bytes per output channel); then a 25%
    margin for planner fragmentation and kernel scratch buffers (CMSIS-NN),
    rounded up to 1 KiB. Confirm on the target with
    `tflite::RecordingMicroInterpreter`.
    """
    graph = tflite_file.read(model).subgraphs[0]
    last = len(graph.operators) - 1
    start: dict[int, int] = {i: 0 for i in graph.inputs}
    end: dict[int, int] = {i: last for i in graph.outputs}
    requant = 0
    for k, op in enumerate(graph.operators):
        for i in op.outputs:
            start.setdefault(i, k)
            end[i] = max(end.get(i, k), k)
        for i in op.inputs:
            if i >= 0 and not graph.tensors[i].constant:
                start.setdefault(i, k)
                end[i] = max(end.get(i, k), k)
        if op.code in (3, 4, 9) and op.outputs:  # CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED
            requant += 8 * int(graph.tensors[op.outputs[0]].shape[-1])
    live = [i for i in start if not graph.tensors[i].constant and not graph.tensors[i].variable]
    aligned = {i: -(-graph.tensors[i].nbytes // 16) * 16 for i in live}
    peak = max((sum(aligned[i] for i in live if start[i] <= k <= end[i]) for k in range(last + 1)), default=0)
    overhead = 64 * len(graph.tensors) + 128 * len(graph.operators) + requant
    total = -(-int(1.25 * (peak + overhead)) // 1024) * 1024
    return {"arena_bytes": total, "activations_peak_bytes": peak, "overhead_bytes": overhead}


# ------------------------------------------------------------------ header


def _c_name(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", text)


def quantization(model: bytes) -> dict[str, Any]:
    """Input and outputs of an exported model: name, index, shape, dtype, scale, zero point."""
    parsed = tflite_file.read(model)
    sig, graph = parsed.signatures[0], parsed.subgraphs[parsed.signatures[0].subgraph]

    def describe(name: str, index: int, position: int) -> dict[str, Any]:
        t = graph.tensors[index]
        return {"name": name, "index": position, "shape": list(t.shape), "dtype": t.dtype,
                "scale": t.scale[0] if t.scale else None, "zero_point": t.zero_point[0] if t.zero_point else None}

    return {
        "inputs": [describe(n, i, graph.inputs.index(i)) for n, i in sig.inputs.items()],
        "outputs": sorted((describe(n, i, graph.outputs.index(i)) for n, i in sig.outputs.items()),
                          key=lambda d: d["index"]),
    }


def c_header(model: bytes, name: str, manifest: Mapping[str, Any], ops: list[str], arena: Mapping[str, int],
             source: str) -> str:
    """The C/C++ header for TFLite Micro holding the int8 `model` (see the module doc)."""
    var = _c_name(f"{name}_int8_tflite")
    prefix = _c_name(name).upper()
    guard = f"STARLING_{prefix}_INT8_H_"
    q = quantization(model)
    inp = q["inputs"][0]
    primary = q["outputs"][0]
    resolver = "; ".join(f"{TFLM_OPS[op]}()" for op in ops)
    lines = [
        f"// {name}_int8.h: generated by `starling-models export-mcu` ({source}). Do not edit.",
        f"// Family {manifest['family']} v{manifest['version']}, task {manifest['task']}; "
        "int8 weights, activations, input and output.",
        "// Include in ONE translation unit (it defines the model array).",
        f"// Register these ops (tflite::MicroMutableOpResolver<{len(ops)}>): {resolver}",
        f"// Input {inp['name']} {inp['dtype']} {inp['shape']} in sensor units (normalization is in the graph):",
        f"//   q = round(x / {prefix}_INPUT_SCALE) + {prefix}_INPUT_ZERO_POINT, clamped to [-128, 127]",
        "// Outputs (interpreter output index: name shape): value = (q - ZERO_POINT) * SCALE",
    ]
    lines += [f"//   {o['index']}: {o['name']} {o['shape']}" for o in q["outputs"]]
    if manifest["task"] != CLASSIFICATION:
        lines.append("// Anomaly score: the mean over all elements of the squared dequantized residual "
                     "(normalized units; compare with a threshold set on normal data).")
    if manifest.get("classes"):
        lines.append(f"// Classes in output order: {', '.join(manifest['classes'])}")
    lines += [
        f"// Tensor arena: {arena['arena_bytes']} bytes estimated = (peak of live activations "
        f"{arena['activations_peak_bytes']} B, each rounded to 16 B, over the operators in order",
        f"//   + TFLM records and int8 requantization data {arena['overhead_bytes']} B) * 1.25, "
        "rounded up to 1 KiB; confirm with tflite::RecordingMicroInterpreter.",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <stdint.h>",
        "#ifndef __cplusplus",
        "#include <stdalign.h>",
        "#endif",
        "",
        f"#define {prefix}_INPUT_SCALE {inp['scale']!r}f",
        f"#define {prefix}_INPUT_ZERO_POINT ({inp['zero_point']})",
        f"#define {prefix}_OUTPUT_SCALE {primary['scale']!r}f  /* output {primary['name']} */",
        f"#define {prefix}_OUTPUT_ZERO_POINT ({primary['zero_point']})",
    ]
    for o in q["outputs"]:
        out = f"{prefix}_OUTPUT_{_c_name(o['name']).upper()}"
        lines += [f"#define {out}_INDEX {o['index']}",
                  f"#define {out}_SCALE {o['scale']!r}f",
                  f"#define {out}_ZERO_POINT ({o['zero_point']})"]
    if manifest.get("num_classes"):
        lines.append(f"#define {prefix}_NUM_CLASSES {manifest['num_classes']}")
    lines += [
        f"#define {prefix}_TENSOR_ARENA_SIZE {arena['arena_bytes']}",
        "",
        f"alignas(16) const unsigned char {var}[] = {{",
    ]
    for at in range(0, len(model), 12):
        lines.append("  " + ", ".join(f"0x{b:02x}" for b in model[at : at + 12]) + ",")
    lines += [
        "};",
        f"const unsigned int {var}_len = {len(model)};",
        "",
        f"#endif  // {guard}",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------ export


def anomaly_scores(outputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """Per-example anomaly score of a reconstruction export's outputs (from `run`): the mean
    squared residual in normalized units, the same number as the trainable model's `error`."""
    residual = np.asarray(outputs["residual"], np.float64)
    return (residual.reshape(len(residual), -1) ** 2).mean(axis=1)


def _figures(task: str, float_out: dict[str, np.ndarray], int8_out: dict[str, np.ndarray],
             y: np.ndarray | None) -> dict[str, Any]:
    """How the int8 model compares with the float one on the same inputs."""
    if task == CLASSIFICATION:
        fp, qp = float_out["probs"].argmax(axis=1), int8_out["probs"].argmax(axis=1)
        out: dict[str, Any] = {"agreement": float(np.mean(fp == qp)),
                               "max_prob_diff": float(np.abs(float_out["probs"] - int8_out["probs"]).max())}
        if y is not None:
            out["float_acc"] = float(np.mean(fp == y))
            out["int8_acc"] = float(np.mean(qp == y))
        return out
    fe, qe = anomaly_scores(float_out), anomaly_scores(int8_out)
    return {
        "float_error": float(fe.mean()),
        "int8_error": float(qe.mean()),
        "error_rel_diff": float(abs(qe.mean() - fe.mean()) / max(fe.mean(), 1e-12)),
        "error_corr": float(np.corrcoef(fe, qe)[0, 1]) if len(fe) > 1 else 1.0,
    }


def export_mcu(model: str | Path, weights: str | Path | Mapping[str, np.ndarray], out_dir: str | Path,
               calibration: str | Path | np.ndarray | None = None, x_test: np.ndarray | None = None,
               y_test: np.ndarray | None = None, name: str | None = None) -> dict[str, Any]:
    """Export `weights` of `model` (a packaged name or a model folder) for TFLite Micro into `out_dir`.

    `calibration` is the representative data set (an `.npz` path or an array
    of examples in sensor units); default: the family's reference data.
    `x_test`/`y_test` are the inputs to compare the float and int8 models
    on (default: the family's reference test data, when it has one).

    Returns the export's facts: file paths, `float_bytes`, `int8_bytes`,
    quantization, the arena estimate, and on the test inputs `agreement`,
    `float_acc` and `int8_acc` (classifiers; accuracies need labels) or the
    float and int8 mean reconstruction errors (reconstruction models).
    """
    import tensorflow as tf

    from firmware_models.build import _tf_schema, load_array_file
    from firmware_models.runtime import custom_ops, op_names

    manifest, _ = _load_model(model)
    family = families.get(manifest.get("family", manifest["name"]))
    opts = family.options(manifest.get("build", {}).get("options"))
    arrays = _load_weights(weights, manifest)
    name = name or manifest["name"]
    shape = tuple(manifest["input_shape"])

    if calibration is None:
        calib = family.reference_data(opts, "train")[0]
    elif isinstance(calibration, np.ndarray):
        calib = np.asarray(calibration, np.float32)
    else:
        calib = load_array_file(calibration)
    if calib.ndim != 1 + len(shape) or tuple(calib.shape[1:]) != shape or len(calib) == 0:
        raise ValueError(f"calibration examples are {list(calib.shape)}, the model takes [n, {list(shape)}]")
    calib = _spread(calib, MAX_CALIBRATION)
    if x_test is None:
        try:
            x_test, y_test = family.reference_data(opts, "test")
        except ValueError:  # no reference data for these options: compare on the calibration set
            x_test, y_test = calib, None

    float_conv, int8_conv = _converters(tf, family, opts, manifest, arrays)
    int8_conv.representative_dataset = lambda: ([example[None]] for example in calib)
    float_bytes, int8_bytes = float_conv.convert(), int8_conv.convert()
    ops = op_names(int8_bytes, _tf_schema())
    for blob, kind in ((float_bytes, "float"), (int8_bytes, "int8")):
        bad = sorted(set(custom_ops(blob)) | (set(op_names(blob, _tf_schema())) - set(TFLM_OPS)))
        if bad:
            raise RuntimeError(f"refusing to export {name}: the {kind} graph uses {bad}, not in TFLM_OPS")

    task = family.task
    float_out, int8_out = run(float_bytes, x_test), run(int8_bytes, x_test)
    figures = _figures(task, float_out, int8_out, None if y_test is None else np.asarray(y_test))
    arena = arena_estimate(int8_bytes)
    weights_digest = hashlib.sha256(b"".join(arrays[k].tobytes() for k in sorted(arrays))).hexdigest()
    source = f"{manifest['name']} weights sha256 {weights_digest[:16]}, TensorFlow {tf.__version__}"
    header = c_header(int8_bytes, name, manifest, ops, arena, source)

    out_dir = Path(out_dir)
    paths = {"float_file": out_dir / f"{name}_float.tflite", "int8_file": out_dir / f"{name}_int8.tflite",
             "header": out_dir / f"{name}_int8.h", "summary": out_dir / f"{name}_mcu.json"}
    result: dict[str, Any] = {
        "name": name,
        "model": manifest["name"],
        "family": family.name,
        "task": task,
        **{k: str(v) for k, v in paths.items()},
        "float_bytes": len(float_bytes),
        "int8_bytes": len(int8_bytes),
        "float_sha256": hashlib.sha256(float_bytes).hexdigest(),
        "int8_sha256": hashlib.sha256(int8_bytes).hexdigest(),
        "weights_sha256": weights_digest,
        "ops": ops,
        "quantization": quantization(int8_bytes),
        **arena,
        "calibration_examples": int(len(calib)),
        "test_examples": int(len(x_test)),
        **figures,
        "tensorflow": tf.__version__,
    }
    write_atomic(paths["float_file"], float_bytes)
    write_atomic(paths["int8_file"], int8_bytes)
    write_atomic(paths["header"], header.encode())
    write_atomic(paths["summary"], (json.dumps(result, indent=2) + "\n").encode())
    return result
