"""Inference on feature rows: the inference thread and `starling-agent predict` give the model the same
window_stats rows the rounds train on (agent/features.py)."""

from __future__ import annotations

import json
import time

import numpy as np

import firmware_models
from agent import cli
from agent.config import InferenceSettings
from agent.data_source import windows_of
from agent.features import WindowStats
from agent.inference import Inference
from agent.labels import LabelSource
from agent.live_data import LiveData
from agent.sample_store import SampleStore
from firmware_models import watch
from firmware_models.runtime import TrainableModel


def imu_rows(store: SampleStore, seconds: float) -> np.ndarray:
    x, _ = watch.windows("test")
    rows = x.reshape(-1, 6)[: int(seconds * 50)]
    times = time.time() - seconds + np.arange(len(rows)) / 50.0
    store.append_many(times, rows)
    return times


def test_inference_runs_the_tabular_model_on_the_rows_the_rounds_train_on(tmp_path):
    (tmp_path / "labels.csv").write_text(f"start,end,label\n{time.time() - 1000!r},{time.time() + 10!r},2\n")
    manifest = firmware_models.load_manifest("tabular_mlp")
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        imu_rows(store, 120)
        live = LiveData(store, (24,), LabelSource(tmp_path / "labels.csv", 7), stride=25,
                        features=WindowStats(50, 6), input_channels=manifest["input_channels"])
        data = live.snapshot()
        source = windows_of(live)
        assert (source.length, source.stride) == (50, 25)
        x, where = source.latest(len(data.x_test))
        np.testing.assert_array_equal(x, data.x_test)  # the same rows, the same windows
        assert x.shape == (len(data.x_test), 24) and source.recent(4).shape == (4, 24)
        model = TrainableModel.from_package("tabular_mlp")
        results = Inference(InferenceSettings(windows=8, socket=None), model, manifest, tmp_path, "d", source).run()
    assert len(results) == 8 and all(len(r["probs"]) == 7 for r in results)
    np.testing.assert_allclose([r["probs"] for r in results], model.predict(data.x_test[-8:]), rtol=1e-6)


def test_predict_reads_a_feature_devices_store_and_gives_results_on_its_rows(tmp_path, capsys):
    state = tmp_path / "state"
    state.mkdir()
    with SampleStore(state / "samples.db", channels=6) as store:
        imu_rows(store, 60)
    np.savez(tmp_path / "rows.npz", samples=np.zeros((10, 6), np.float32))
    (tmp_path / "agent.toml").write_text(
        f'[device]\nname = "d"\nkey = "{tmp_path / "k"}"\nstate_dir = "{state}"\n'
        f'[gateway]\nid = "{"0" * 32}"\npublic_key = "{"ab" * 32}"\n[model]\nname = "tabular_mlp"\n'
        '[data]\nrate_hz = 50.0\nfeatures = "window_stats"\nfeature_window = 50\n'
        f'[[sensor]]\nkind = "replay"\npath = "{tmp_path / "rows.npz"}"\n')
    assert cli.main(["predict", "--config", str(tmp_path / "agent.toml"), "--windows", "3"]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(results) == 3 and all(len(r["probs"]) == 7 for r in results)
    np.testing.assert_allclose([r["end"] - r["start"] for r in results], 49 / 50, atol=1e-4)  # 50-row windows
