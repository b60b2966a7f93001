"""MCU exports of each release: signed, retained, runnable int8 models; a failing export never stops a gateway."""

from __future__ import annotations

import os
import stat
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from required_tools import missing

import firmware_models
from gateway.config import ConfigError
from gateway.mcu import McuExporter
from protocol import envelope, schemas, topics
from protocol.digest import sha256
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = Identity.from_seed(b"m" * 32)


def tf_python() -> str | None:
    """A Python with TensorFlow: $STARLING_TF_PYTHON, or the `make test` build environment."""
    for candidate in (os.environ.get("STARLING_TF_PYTHON"), str(ROOT / ".venv-build" / "bin" / "python")):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_each_release_becomes_a_signed_int8_model_that_agrees_with_the_float_one():
    python = tf_python()
    if python is None:
        missing("needs a Python with TensorFlow: set STARLING_TF_PYTHON, or run `make test` (it makes .venv-build)")
    from firmware_models.runtime import TrainableModel, load_interpreter_class
    from hw.datasets import load_watch_devices

    device = load_watch_devices([1])[0]
    model = TrainableModel.from_package("imu_cnn")
    model.train_epochs(device.x_train, device.y_train, epochs=3, batch_size=model.batch_size, lr=0.2, rng=0)
    weights = model.get_weights()
    digest = sha256(schemas.encode_model(weights))
    published: list[tuple[str, bytes, bool]] = []
    exporter = McuExporter(Path(python), firmware_models.model_dir("imu_cnn"), GATEWAY, GATEWAY.id,
                           lambda topic, payload, retain=False: published.append((topic, payload, retain)))
    exporter.submit(digest, 7, weights)
    exporter.close(timeout=600)
    assert exporter.exported == 1 and exporter.failed == 0
    [(topic, wire, retain)] = published
    assert topic == topics.mcu(GATEWAY.id) and retain
    env = envelope.decode(wire)
    env.verify()
    assert env.type == "mcu" and env.ctx.sender == GATEWAY.public_key and env.ctx.base == digest
    release = schemas.McuRelease.from_body(env.body)
    assert release.model == digest and release.version == 7 and release.arena_bytes > 0
    assert sha256(env.attachment) == release.digest and len(env.attachment) == release.size

    # Run the int8 model as firmware would: quantize sensor units in, read int8 scores out.
    interpreter = load_interpreter_class()(model_content=env.attachment)
    interpreter.allocate_tensors()
    runner = interpreter.get_signature_runner()
    (in_name,) = runner.get_input_details()
    x = device.x_test[:64]
    q = np.clip(np.round(x / release.input_scale) + release.input_zero_point, -128, 127).astype(np.int8)
    int8_class = [int(np.argmax(next(iter(runner(**{in_name: q[i:i + 1]}).values())))) for i in range(len(q))]
    float_class = np.argmax(model.predict(x), axis=1)
    assert np.mean(np.array(int8_class) == float_class) >= 0.9


def test_a_failing_export_is_counted_and_the_next_release_is_still_exported(tmp_path):
    calls = tmp_path / "calls"
    failing = script(tmp_path / "fake-python", f"open({str(calls)!r}, 'a').write('x'); raise SystemExit(3)")
    published: list = []
    exporter = McuExporter(failing, tmp_path, GATEWAY, GATEWAY.id, lambda *a, **k: published.append(a))
    weights = {"w": np.zeros(3, np.float32)}
    exporter.submit(bytes(32), 1, weights)
    deadline = time.monotonic() + 30
    while exporter.failed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    exporter.submit(bytes([1]) * 32, 2, weights)
    exporter.close(timeout=30)
    assert exporter.failed == 2 and exporter.exported == 0 and not published
    assert calls.read_text() == "xx"


def test_a_stopping_gateway_kills_a_running_export(tmp_path):
    slow = script(tmp_path / "slow-python", "import time; time.sleep(60)")
    exporter = McuExporter(slow, tmp_path, GATEWAY, GATEWAY.id, lambda *a, **k: None)
    exporter.submit(bytes(32), 1, {"w": np.zeros(3, np.float32)})
    time.sleep(0.5)
    started = time.monotonic()
    exporter.close(timeout=10, abort=True)
    assert time.monotonic() - started < 5 and exporter.failed == 1


def test_mcu_python_must_be_an_executable(tmp_path):
    from gateway.config import parse_config

    (tmp_path / "not-exec").write_text("")
    doc = {"gateway": {"name": "g", "key": "k", "state_dir": "s"}, "enrollment": {"policy": "open"},
           "model": {"mcu_python": "not-exec"}}
    with pytest.raises(ConfigError, match="model.mcu_python: .* is not an executable file"):
        parse_config(doc, tmp_path)
