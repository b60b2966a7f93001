"""Many devices in one process: each a real agent with its own key and MQTT connection, in one round."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.config import GatewayConfig
from gateway.service import Gateway
from hw.broker import Broker, _child_env
from hw.device_pool import load_pool
from hw.synthetic import write_manifest
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
SHAPES = {"w": (8, 4), "b": (4,)}
DEVICES = 24


def write_pool(tmp_path: Path, gateway: Identity, port: int, manifest: Path) -> Path:
    devices = []
    for i in range(DEVICES):
        home = tmp_path / "devices" / f"d{i:03d}"
        home.mkdir(parents=True)
        (home / "agent.toml").write_text(
            f'[device]\nname = "d{i:03d}"\nkey = "device.key"\nstate_dir = "state"\nenroll_retry_s = 0.5\n'
            f'[gateway]\nid = "{gateway.id}"\npublic_key = "{gateway.public_key.hex()}"\n'
            f'[broker]\nhost = "127.0.0.1"\nport = {port}\n[data]\nreplay = "unused.npz"\n')
        devices.append({"config": str(home.relative_to(tmp_path) / "agent.toml"), "seed": i + 1})
    pool = tmp_path / "pool.json"
    pool.write_text(json.dumps({"model": "synthetic", "manifest": str(manifest), "devices": devices}))
    return pool


def test_a_pool_of_synthetic_devices_takes_part_in_a_round_and_stops_cleanly(tmp_path):
    gateway = Identity.generate()
    gateway.save(tmp_path / "gw.key")
    manifest = write_manifest(tmp_path / "model", SHAPES)
    with Broker(tmp_path / "broker", kind="mosquitto") as broker:
        pool = subprocess.Popen([sys.executable, "-m", "hw.device_pool", "--pool",
                                 str(write_pool(tmp_path, gateway, broker.port, manifest))],
                                cwd=ROOT, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            config = GatewayConfig(
                name="gw", key=tmp_path / "gw.key", state_dir=tmp_path / "gw", broker_host=broker.host,
                broker_port=broker.port, manifest=manifest, num_rounds=1, deadline_s=60, min_devices=DEVICES,
                wait_devices_s=60, policy="open", gossip=False,
                strategy_params={"min_available_nodes": DEVICES, "min_train_nodes": DEVICES,
                                 "fraction_evaluate": 0.0})
            result: dict = {}
            thread = threading.Thread(target=lambda: result.update(Gateway(config, gateway).run(threading.Event())))
            thread.start()
            thread.join(120)
            pool.send_signal(signal.SIGTERM)
            output = pool.communicate(timeout=60)[0].decode()
        finally:
            if pool.poll() is None:
                pool.kill()
    assert pool.returncode == 0, output[-2000:]
    assert result["state"] == "done" and result["rounds"][-1]["participants"] == DEVICES
    assert "pool.start" in output and "pool.stop" in output and "Traceback" not in output
    keys = {(tmp_path / "devices" / f"d{i:03d}" / "device.key").read_bytes() for i in range(DEVICES)}
    assert len(keys) == DEVICES  # each device its own identity


@pytest.mark.parametrize("doc, message", [
    ({"model": "synthetic", "devices": []}, "non-empty `devices`"),
    ({"devices": [{"config": "a"}]}, "needs `model`"),
    ({"model": "synthetic", "devices": [{"config": "a"}]}, "needs the gateway's `manifest`"),
    ({"model": "imu_cnn", "devices": [{"seed": 1}]}, r"devices\[0\] needs a `config`"),
])
def test_a_bad_pool_file_is_refused_with_the_reason(tmp_path, doc, message):
    (tmp_path / "pool.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=message):
        load_pool(tmp_path / "pool.json")
