"""The real agent process with [personalization]: before it runs a model (here the shipped weights, at start)
it tunes the output layer to its own training windows, serves the tuned model's results on its socket marked
`personal`, and `starling-agent predict` gives the same; a model that cannot be personalized stops it at start."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_agent_inference import GATEWAY, Lines

from agent.config import Personalization
from agent.personalize import Personalizer
from firmware_models.runtime import TrainableModel
from hw.broker import Broker, _child_env
from hw.datasets import load_watch_devices, save_device_npz
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
STEPS, LR = 20, 0.1


def agent_toml(tmp_path: Path, broker, model: str = "imu_cnn") -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[device]\nname = "personal"\nkey = "{tmp_path / "device.key"}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'[gateway]\nid = "{GATEWAY.id}"\npublic_key = "{GATEWAY.public_key.hex()}"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n[model]\nname = "{model}"\n'
        f'[data]\nreplay = "{tmp_path / "device.npz"}"\n'
        f'[inference]\nevery_s = 0.5\nwindows = 8\nsocket = "{tmp_path / "inference.sock"}"\n'
        f"[personalization]\nsteps = {STEPS}\nlr = {LR}\n")
    return config


def test_the_agent_runs_and_predicts_with_its_own_tuning_of_the_model(tmp_path):
    device = Identity.generate()
    device.save(tmp_path / "device.key")
    wearer = load_watch_devices([9])[0]
    save_device_npz(wearer, tmp_path / "device.npz")
    recorded = np.concatenate([wearer.x_train, wearer.x_test])  # what a replay device's inference streams
    model = TrainableModel.from_package("imu_cnn")
    shipped = model.get_weights()
    Personalizer(Personalization(STEPS, LR), model, seed=device.node_id % 2**32).fit(
        shipped, wearer.x_train, wearer.y_train)  # what the device must compute: same code, data and seed
    log = tmp_path / "agent.log"
    with Broker(tmp_path / "broker") as broker:
        config = agent_toml(tmp_path, broker)
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                                 env=_child_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)
        try:
            lines = Lines(tmp_path / "inference.sock")
            results = [lines.next() for _ in range(10)]
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
        finally:
            if agent.poll() is None:
                agent.kill()
        assert all(r["personal"] is True and r["model_digest"] is None for r in results)
        x = recorded[[r["index"] for r in results]]
        np.testing.assert_allclose([r["probs"] for r in results], model.predict(x), rtol=1e-4, atol=1e-5)
        untuned = TrainableModel.from_package("imu_cnn")
        assert not np.allclose([r["probs"] for r in results], untuned.predict(x), atol=1e-3)  # it did tune

        done = subprocess.run([sys.executable, "-m", "agent.cli", "predict", "--config", str(config), "--input",
                               str(tmp_path / "device.npz")], cwd=ROOT, env=_child_env(), capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        once = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(once) == len(wearer.x_test) and all(r["personal"] for r in once)
        np.testing.assert_allclose([r["probs"] for r in once], model.predict(wearer.x_test), rtol=1e-4, atol=1e-5)

        refused = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config",
                                  str(agent_toml(tmp_path, broker, "imu_autoencoder"))], cwd=ROOT, env=_child_env(),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert "personalization: personalization tunes a classifier" in refused.stderr
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count(" inference.personalized ") == 1 and "weights=dense_w,dense_b" in text
