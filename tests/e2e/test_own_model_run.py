"""Bring your own data: a folder of per-device .npz with 6 classes, a model built for them with
`starling-models build --family imu_cnn --classes 6 --normalization data.npz --out DIR` (TensorFlow, in
.venv-build), and a scenario with `model = "DIR"`: the real emulator trains it; a model the data do not fit is
refused at load, naming both shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from emulation import ROOT, emulate, env
from required_tools import require

from hw.datasets import load_watch_devices
from hw.scenario import ScenarioError, load_scenario

BUILD = ROOT / ".venv-build" / "bin" / "starling-models"  # the venv with TensorFlow (`make test` makes it)
CLASSES = 6
WINDOWS_PER_DEVICE = 60  # tiny data: the run is about the plumbing, a round takes about a second


def _write_devices(folder: Path, channels: slice = slice(None), classes: int = CLASSES) -> np.ndarray:
    """Three devices' X and y (watch subjects 1-3, only labels below `classes`); returns every window."""
    folder.mkdir()
    every = []
    for device in load_watch_devices([1, 2, 3], stride=64):
        x = np.concatenate([device.x_train, device.x_test])[..., channels]
        y = np.concatenate([device.y_train, device.y_test])
        keep = np.flatnonzero(y < classes)
        keep = keep[np.linspace(0, len(keep) - 1, WINDOWS_PER_DEVICE).astype(int)]  # every class, spread out
        np.savez(folder / f"{device.name}.npz", X=x[keep], y=y[keep])
        every.append(x[keep])
    return np.concatenate(every)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The data folder, its normalization file and the 6-class model built from it."""
    require(BUILD.exists(), f"needs TensorFlow: {BUILD} is missing (`make test` makes .venv-build)")
    tmp = tmp_path_factory.mktemp("own")
    windows = _write_devices(tmp / "data")
    np.savez(tmp / "data.npz", X=windows)
    done = subprocess.run([str(BUILD), "build", "--family", "imu_cnn", "--classes", str(CLASSES),
                           "--normalization", str(tmp / "data.npz"), "--out", str(tmp / "six")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=240)
    require(not (done.returncode == 2 and "needs TensorFlow" in done.stderr),
            f"needs TensorFlow in .venv-build (`make test` installs it): {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp


def test_the_built_folder_has_six_classes_and_the_datas_normalization(built):
    manifest = json.loads((built / "six" / "manifest.json").read_text())
    assert manifest["num_classes"] == CLASSES and manifest["input_shape"] == [128, 6]
    assert manifest["build"]["normalization"]["file"] == "data.npz"
    windows = np.load(built / "data.npz")["X"].reshape(-1, 6)
    assert np.allclose(manifest["normalization"]["mean"], windows.mean(axis=0), atol=1e-4)


def test_a_scenario_naming_the_folder_trains_it_on_the_devices_own_data(built):
    done, report = emulate(built, """
[run]
name = "own-data"
rounds = 2
timeout_s = 150
[fleet]
devices = 3
[dataset]
source = "data"
test_fraction = 0.25
[training]
model = "six"
epochs = 1
lr = 0.2
deadline_s = 40
""")
    assert done.returncode == 0, done.stderr[-4000:]
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    # every device trained the 6-class model the gateway sent (one built for 7 classes would refuse its release)
    assert [r["participants"] for r in rounds[1:]] == [3, 3] and not report["rejections"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rounds)
    assert report["config"]["model"] == str(built / "six")
    with np.load(built / "run" / "gateway" / "model.npz") as final:
        assert final["dense_w"].shape == (64, CLASSES) and final["dense_b"].shape == (CLASSES,)
    for log in sorted((built / "run" / "logs").glob("subject-*.log")):  # each on its own 45 + 15 windows
        text = log.read_text()
        assert "train_windows=45 test_windows=15" in text and text.count("kind=train examples=45") == 2


def test_the_folders_model_runs_in_device_pools_and_in_attackers_too(built, tmp_path):
    for name in ("data", "six"):
        (tmp_path / name).symlink_to(built / name)
    done, report = emulate(tmp_path, """
[run]
name = "own-data-pool"
rounds = 1
timeout_s = 120
[fleet]
devices = 3
runner = "pool"
[dataset]
source = "data"
test_fraction = 0.25
[training]
model = "six"
epochs = 1
lr = 0.2
deadline_s = 40
[[adversary]]
attack = "sign_flip"
count = 1
""")
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["rounds"][1]["participants"] == 3 and not report["rejections"]
    (attack,) = report["attacks"]
    assert attack["accepted"] >= 1 and not attack["rejected"] and attack["as_expected"]  # it ran the 6-class model
    assert json.loads((tmp_path / "run" / "pools" / "pool-1.json").read_text())["model"] == str((built / "six"))


def test_data_the_built_model_does_not_fit_is_refused_naming_both_shapes(built, tmp_path):
    _write_devices(tmp_path / "three", channels=slice(0, 3))  # the accelerometer alone: [128, 3] windows
    (tmp_path / "bad.toml").write_text(f'[fleet]\ndevices = 3\n[dataset]\nsource = "three"\n'
                                       f'[training]\nmodel = "{built / "six"}"\n')
    done = subprocess.run([sys.executable, "-m", "hw.emulate", "--scenario", str(tmp_path / "bad.toml"),
                           "--report", str(tmp_path / "r.json")], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and not (tmp_path / "r.json").exists()
    assert (f"the data's windows are [128, 3], the model (imu_cnn, 6 classes, from {built / 'six'}) takes [128, 6]"
            in done.stderr), done.stderr
    _write_devices(tmp_path / "seven", classes=7)  # every exercise: labels 0 to 6
    (tmp_path / "seven.toml").write_text(f'[dataset]\nsource = "seven"\n[fleet]\ndevices = 3\n'
                                         f'[training]\nmodel = "{built / "six"}"\n')
    with pytest.raises(ScenarioError, match=r"the data's labels are 0 to 6 \(7 classes\), the model .* has 6 "
                                            r"classes \(0 to 5\)"):
        load_scenario(tmp_path / "seven.toml")

