"""The agent process on live sensors: it samples while the broker is away, refuses a data config it
cannot use before connecting anywhere, and trains a real round on what it sampled."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hw.broker import _child_env, free_port
from hw.datasets import load_watch_devices
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
RATE_HZ = 1000  # replayed ten times faster than recorded: enough windows within seconds


def rows(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from samples").fetchone()[0]
    except sqlite3.OperationalError:  # the agent has created the file but not yet its table
        return 0


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def agent_config(tmp_path: Path, gateway: Identity, port: int, labels: bool = True, model: str = "imu_cnn") -> Path:
    recording = tmp_path / "imu.npz"
    if not recording.exists():
        np.savez(recording, X=load_watch_devices([2])[0].x_train)  # replayed window by window, as a stream
    text = (
        f'[device]\nname = "live"\nkey = "{tmp_path / "device.key"}"\nstate_dir = "{tmp_path / "agent"}"\n'
        "resend_s = 1.0\nenroll_retry_s = 0.5\n"
        f'[gateway]\nid = "{gateway.id}"\npublic_key = "{gateway.public_key.hex()}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\n[model]\nname = "{model}"\n'
        f"[data]\nrate_hz = {RATE_HZ}\n" + (f'labels = "{tmp_path / "labels.csv"}"\n' if labels else "")
        + f'[[sensor]]\nkind = "replay"\npath = "{recording}"\nrate_hz = {RATE_HZ}\n'
    )
    (tmp_path / "agent.toml").write_text(text)
    return tmp_path / "agent.toml"


def start_agent(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                            env=_child_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_it_samples_while_no_broker_answers_and_stops_cleanly(tmp_path):
    config = agent_config(tmp_path, Identity.generate(), free_port())  # nobody listens there
    agent = start_agent(config, tmp_path / "agent.log")
    try:
        db = tmp_path / "agent" / "samples.db"
        wait_for(lambda: rows(db) > 2000, 30, "samples while offline")
        before = rows(db)
        wait_for(lambda: rows(db) > before + 300, 10, "sampling to go on while offline")  # (1 s at 1000 Hz)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
    log = (tmp_path / "agent.log").read_text()
    assert "sampler.start" in log and "sampler.stop" in log and "Traceback" not in log


def test_a_classifier_without_a_label_source_is_refused_at_start(tmp_path):
    config = agent_config(tmp_path, Identity.generate(), free_port(), labels=False)
    done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                          env=_child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "data.labels is required: imu_cnn is a classifier" in done.stderr
    assert not (tmp_path / "agent" / "samples.db").exists()


def test_sensors_that_do_not_fit_the_model_are_refused_at_start(tmp_path):
    config = agent_config(tmp_path, Identity.generate(), free_port())
    np.savez(tmp_path / "imu.npz", samples=np.zeros((100, 3), np.float32))  # 3 channels, the model takes 6
    done = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(config)], cwd=ROOT,
                          env=_child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "the model takes (128, 6), the sensors give 3 channels" in done.stderr


@pytest.mark.parametrize("model", ["imu_cnn", "imu_autoencoder"])
def test_a_round_trains_on_samples_taken_before_the_broker_came_up(tmp_path, model):
    """The classifier learns from labelled windows; the self-supervised autoencoder from raw ones."""
    pytest.importorskip("sqlite_utils", reason="the gateway side (ledger) is not in the agent-only environment")
    import firmware_models
    from hw.broker import Broker
    from ledger.store import Ledger

    gateway = Identity.generate()
    gateway.save(tmp_path / "gw.key")
    port = free_port()
    labelled = model == "imu_cnn"
    config = agent_config(tmp_path, gateway, port, labels=labelled, model=model)
    now = time.time()
    if labelled:
        (tmp_path / "labels.csv").write_text(f"start,end,label\n{now - 3600},{now + 3600},3\n")
    agent = start_agent(config, tmp_path / "agent.log")
    gw = None
    try:
        wait_for(lambda: rows(tmp_path / "agent" / "samples.db") > 4000, 60, "samples before the broker")
        with Broker(tmp_path / "broker", kind="mosquitto", port=port):
            (tmp_path / "gw.toml").write_text(
                f'[gateway]\nname = "gw"\nkey = "gw.key"\nstate_dir = "gw"\n'
                f'[broker]\nhost = "127.0.0.1"\nport = {port}\n'
                f'[model]\nmanifest = "{firmware_models.model_dir(model) / "manifest.json"}"\n'
                '[strategy]\nname = "FedAvg"\nparams = { min_available_nodes = 1, min_train_nodes = 1, '
                "min_evaluate_nodes = 1 }\n"
                "[rounds]\nnum_rounds = 2\ndeadline_s = 60\nepochs = 1\nmin_devices = 1\nwait_devices_s = 60\n"
                '[enrollment]\npolicy = "open"\n[ledger]\ngossip = false\n'
            )
            gw = subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(tmp_path / "gw.toml")],
                                  cwd=ROOT, env=_child_env(), stdout=(tmp_path / "gw.log").open("wb"),
                                  stderr=subprocess.STDOUT)
            assert gw.wait(180) == 0, (tmp_path / "gw.log").read_text()[-3000:]
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(30) == 0
    finally:
        for process in (agent, gw):
            if process is not None and process.poll() is None:
                process.kill()
    result = json.loads((tmp_path / "gw" / "result.json").read_text())
    assert result["state"] == "done", result.get("failure")
    rounds = [r for r in result["rounds"] if r["round"] > 0]
    assert [r["participants"] for r in rounds] == [1, 1] and not result["rejections"]
    assert all(r["loss"] is not None for r in rounds)  # the devices' evaluations were accepted
    assert all((r["accuracy"] is not None) == labelled for r in rounds)  # an autoencoder has no accuracy
    with Ledger.open(tmp_path / "gw" / "ledger.db", read_only=True) as ledger:
        records = [r for v in ledger.vertices() if v.kind == "updates" for r in v.body["records"]]
    assert len(records) == 2 and all(examples >= 32 for _, _, examples, _ in records)  # trained on samples
    assert "Traceback" not in (tmp_path / "agent.log").read_text()
