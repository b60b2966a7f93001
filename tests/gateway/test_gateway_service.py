"""The gateway process: refuses to run rounds without devices, stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hw.broker import Broker

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker")) as running:
        yield running


def write_config(tmp_path: Path, broker: Broker, wait_s: float) -> Path:
    conf = tmp_path / "gateway.toml"
    conf.write_text(
        f'[gateway]\nname = "gw-test"\nkey = "gw.key"\nstate_dir = "state"\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
        f"[rounds]\nnum_rounds = 1\nmin_devices = 3\nwait_devices_s = {wait_s}\n"
        '[enrollment]\npolicy = "open"\n'
    )
    init = subprocess.run([sys.executable, "-m", "gateway.cli", "init", "--config", str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert init.returncode == 0, init.stderr
    return conf


def start(conf: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigterm_stops_a_waiting_gateway_cleanly(broker, tmp_path):
    gateway = start(write_config(tmp_path, broker, wait_s=120))
    time.sleep(3)
    gateway.send_signal(signal.SIGTERM)
    out, _ = gateway.communicate(timeout=30)
    assert gateway.returncode == 0, out
    assert "gateway.stopped" in out and "Traceback" not in out
    result = json.loads((tmp_path / "state" / "result.json").read_text())
    assert result["state"] == "stopped"
    assert result["ledger"]["height"] == 1  # genesis only
    assert result["training"] == {"mode": "sync", "codec": "i8", "download": "i8"}  # the defaults


def test_run_refuses_a_missing_key_instead_of_inventing_one(broker, tmp_path):
    conf = tmp_path / "gw.toml"
    conf.write_text('[gateway]\nname = "gw"\nkey = "typo.key"\nstate_dir = "s"\n[enrollment]\npolicy = "open"\n')
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--config", str(conf)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "starling-gateway init" in done.stderr
    assert not (tmp_path / "typo.key").exists()


def test_too_few_devices_fails_after_a_bounded_wait(broker, tmp_path):
    gateway = start(write_config(tmp_path, broker, wait_s=1))
    out, _ = gateway.communicate(timeout=60)
    assert gateway.returncode == 1
    assert "gateway.failed" in out and "only 0 of 3 devices" in out
