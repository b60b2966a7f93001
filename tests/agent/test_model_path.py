"""`[model] path`: the agent runs a built model's folder (`starling-models build ... --out DIR`) exactly as it runs
a model shipped in firmware_models, its manifest driving input shape, classes and task. A copy of the packaged
tabular_mlp, with class names of its own, stands for a built folder (no TensorFlow needed)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import firmware_models
from agent.config import ConfigError, load_config, parse_config
from agent.model_source import model_source
from hw.broker import Broker, _child_env
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = Identity.generate()
CLASSES = [f"mine-{i}" for i in range(7)]  # tabular_mlp has 7 classes; the packaged names are others


def build_folder(where: Path) -> Path:
    """A "built" model folder: tabular_mlp's files, its manifest naming classes of its own."""
    shutil.copytree(firmware_models.model_dir("tabular_mlp"), where)
    manifest = json.loads((where / "manifest.json").read_text())
    assert manifest["classes"] != CLASSES
    manifest.update(name="mine", classes=CLASSES)
    (where / "manifest.json").write_text(json.dumps(manifest))
    return where


def write_config(tmp_path: Path, model: str, port: int = 1883, extra: str = "") -> Path:
    Identity.generate().save(tmp_path / "device.key")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.normal(size=(40, 24)).astype(np.float32),
             y_train=rng.integers(0, 7, 40), x_test=rng.normal(size=(8, 24)).astype(np.float32),
             y_test=rng.integers(0, 7, 8))
    conf = tmp_path / "agent.toml"
    conf.write_text(
        f'[device]\nname = "d"\nkey = "device.key"\nstate_dir = "state"\n'
        f'[gateway]\nid = "{GATEWAY.id}"\npublic_key = "{GATEWAY.public_key.hex()}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\n[data]\nreplay = "data.npz"\n[model]\n{model}\n{extra}')
    return conf


@pytest.fixture
def built(tmp_path):
    return build_folder(tmp_path / "models" / "mine")


def test_a_relative_model_path_is_the_built_folder_next_to_the_config_and_its_manifest_drives_the_model(
        tmp_path, built):
    config = load_config(write_config(tmp_path, 'path = "models/mine"'))
    assert config.model_path == built and config.model == str(built)
    source = model_source(config)
    assert not source.packaged and source.folder == built
    assert source.input_shape == (24,) and source.task == "classification" and source.manifest["classes"] == CLASSES
    model = source.load()
    assert model.input_shape == (24,) and model.num_classes == 7
    assert "mine" in source.describe() and "input [24], classification (7 classes)" in source.describe()


def test_a_named_model_is_still_the_packaged_one():
    config = parse_config({"device": {"name": "d", "key": "k", "state_dir": "s"},
                           "gateway": {"id": GATEWAY.id, "public_key": GATEWAY.public_key.hex()},
                           "data": {"replay": "x.npz"}, "model": {"name": "imu_autoencoder"}})
    source = model_source(config)
    assert config.model_path is None and source.packaged
    assert source.folder == firmware_models.model_dir("imu_autoencoder") and source.task == "reconstruction"


def test_name_and_path_together_are_refused_naming_both(tmp_path, built):
    with pytest.raises(ConfigError, match=r"model\.name and model\.path are both set"):
        load_config(write_config(tmp_path, 'name = "tabular_mlp"\npath = "models/mine"'))


def _no_manifest(folder: Path) -> None:
    (folder / "manifest.json").unlink()


def _manifest_not_json(folder: Path) -> None:
    (folder / "manifest.json").write_text("{ not json")


def _no_model_file(folder: Path) -> None:
    (folder / "model.tflite").unlink()


def _bad_shape(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "input_shape": [0, 6]}))


@pytest.mark.parametrize("spoil, reason", [
    (None, r"models/elsewhere is not a folder holding a built model \(`starling-models build"),
    (_no_manifest, r"has no manifest\.json: not a built model folder"),
    (_manifest_not_json, r"manifest\.json is not valid JSON"),
    (_no_model_file, r"has no model\.tflite \(its manifest names it\)"),
    (_bad_shape, r"input_shape \[0, 6\] is not a list of positive sizes"),
])
def test_a_path_that_is_not_a_built_model_folder_is_refused_at_start(tmp_path, built, spoil, reason):
    if spoil is None:
        conf = write_config(tmp_path, 'path = "models/elsewhere"')
    else:
        spoil(built)
        conf = write_config(tmp_path, 'path = "models/mine"')
    with pytest.raises(ConfigError, match=r"^model\.path: .*" + reason):
        load_config(conf)
    done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "model.path:" in done.stderr and not (tmp_path / "state").exists()


def test_a_model_file_that_is_not_its_manifest_s_is_refused_by_run(tmp_path, built):
    shutil.copyfile(firmware_models.model_dir("imu_cnn") / "model.tflite", built / "model.tflite")
    conf = write_config(tmp_path, 'path = "models/mine"')
    done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "does not match its manifest's sha256: rebuild the folder" in done.stderr


def test_predict_runs_the_built_folder_s_model(tmp_path, built):
    conf = write_config(tmp_path, 'path = "models/mine"')
    np.save(tmp_path / "x.npy", np.random.default_rng(1).normal(size=(5, 24)).astype(np.float32))
    done = subprocess.run([sys.executable, "-m", "agent.cli", "predict", "--config", str(conf),
                           "--input", str(tmp_path / "x.npy")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 5 and all(r["name"] in CLASSES and len(r["probs"]) == 7 for r in results)


def _lines(path: Path, count: int, timeout: float = 60.0) -> list[dict]:
    """The first `count` JSON lines the agent serves on its inference socket."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(str(path))
            break
        except OSError:
            sock.close()
            assert time.monotonic() < deadline, "the agent's inference socket never came up"
            time.sleep(0.2)
    sock.settimeout(timeout)
    buffer = b""
    with sock:
        while buffer.count(b"\n") < count:
            chunk = sock.recv(65536)
            assert chunk, "the agent closed the socket"
            buffer += chunk
    return [json.loads(line) for line in buffer.splitlines()[:count]]


def test_starling_agent_run_loads_the_built_folder_and_runs_it(tmp_path, built):
    sock_path = tmp_path / "inference.sock"
    with Broker(tmp_path / "broker") as broker:
        conf = write_config(tmp_path, 'path = "models/mine"', broker.port,
                            f'[inference]\nevery_s = 0.2\nwindows = 4\nsocket = "{sock_path}"\n')
        log = tmp_path / "agent.log"
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=ROOT,
                                 env=_child_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)
        try:
            results = _lines(sock_path, 4)
        finally:
            agent.terminate()
            code = agent.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    # The training model and inference's own both came from the folder: its input shape, its class names.
    assert f"agent.model model={built} source=path input_shape=24 task=classification" in text
    assert all(r["name"] in CLASSES and len(r["probs"]) == 7 for r in results), results
