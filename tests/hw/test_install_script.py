"""hw/install.sh into a scratch root (STARLING_ROOT): what it makes, and that a second run changes nothing."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10

ROOT = Path(__file__).resolve().parents[2]
GATEWAY_ID = "0123456789abcdef0123456789abcdef"
GATEWAY_KEY = "ab" * 32


def install(target: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "STARLING_ROOT": str(target)}
    return subprocess.run(["bash", str(ROOT / "hw" / "install.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    work = tmp_path_factory.mktemp("install")
    replay = work / "replay.npz"
    np.savez(replay, x_train=np.zeros((2, 128, 6), np.float32), y_train=np.zeros(2, np.int64),
             x_test=np.zeros((1, 128, 6), np.float32), y_test=np.zeros(1, np.int64))
    (work / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    (work / "pw").write_text("secret\n")
    args = ("--gateway-id", GATEWAY_ID, "--gateway-key", GATEWAY_KEY, "--broker", "broker.city:8883",
            "--name", "pole-17", "--ca", str(work / "ca.crt"), "--password-file", str(work / "pw"),
            "--replay", str(replay), "--no-start")
    first = install(work / "root", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    return work / "root", args, first


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_it_makes_the_venv_config_state_key_and_unit(installed):
    root, _, first = installed
    assert (root / "opt/starling/venv/bin/starling-agent").is_file()
    config = tomllib.loads((root / "etc/starling/agent.toml").read_text())
    device = json.loads((root / "var/lib/starling/device.json").read_text())
    assert config["gateway"] == {"id": GATEWAY_ID, "public_key": GATEWAY_KEY}
    assert config["broker"]["host"] == "broker.city" and config["broker"]["port"] == 8883
    assert config["broker"]["username"] == device["id"] and config["device"]["name"] == "pole-17"
    assert mode(root / "etc/starling/agent.toml") == 0o640 and mode(root / "var/lib/starling") == 0o700
    assert mode(root / "var/lib/starling/device.key") == 0o600 and mode(root / "etc/starling/mqtt.password") == 0o600
    assert (root / "etc/systemd/system/starling-agent.service").read_text() == \
        (ROOT / "hw/systemd/starling-agent.service").read_text()
    assert device["id"] in first.stdout


def test_the_venv_holds_the_agent_extra_only(installed):
    root, _, _ = installed
    listed = subprocess.run([str(root / "opt/starling/venv/bin/python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, timeout=120)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"paho-mqtt", "smbus2", "pynacl", "cbor2", "numpy"} <= names
    assert not names & {"flwr", "sqlite-utils", "tensorflow", "tensorflow-cpu"}


def test_a_second_run_keeps_the_key_and_the_config(installed):
    root, args, _ = installed
    key = (root / "var/lib/starling/device.key").read_bytes()
    config = (root / "etc/starling/agent.toml").read_text()
    again = install(root, *args)
    assert again.returncode == 0, again.stderr
    assert (root / "var/lib/starling/device.key").read_bytes() == key
    assert (root / "etc/starling/agent.toml").read_text() == config


@pytest.mark.parametrize("args, message", [
    (("--gateway-id", "xyz", "--gateway-key", GATEWAY_KEY, "--broker", "b"), "--gateway-id must be 32"),
    (("--gateway-id", GATEWAY_ID, "--gateway-key", "12", "--broker", "b"), "--gateway-key must be"),
    (("--gateway-id", GATEWAY_ID, "--gateway-key", GATEWAY_KEY), "--broker HOST"),
    (("--gateway-id", GATEWAY_ID, "--gateway-key", GATEWAY_KEY, "--broker", "b", "--bogus"), "unknown option"),
])
def test_bad_arguments_are_refused_with_the_reason(tmp_path, args, message):
    done = install(tmp_path / "root", *args)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("args, message", [
    (("--sensor", "dht22"), "--sensor dht22: known sensors are mpu6050 and bme280"),
    ((), "give --sensor KIND (mpu6050, bme280) or --replay FILE"),
    (("--sensor", "mpu6050", "--replay", "x.npz"), "--replay and --sensor exclude each other"),
    (("--sensor", "mpu6050", "--model", "../evil"), "--model must be a model name"),
])
def test_the_data_source_must_be_sensors_or_a_replay_file(tmp_path, args, message):
    done = install(tmp_path / "root", "--gateway-id", GATEWAY_ID, "--gateway-key", GATEWAY_KEY, "--broker", "b",
                   *args)
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "root").exists()


def test_with_sensors_it_writes_a_live_sampling_config_the_agent_accepts(tmp_path):
    from agent.config import parse_config

    done = install(tmp_path / "root", "--gateway-id", GATEWAY_ID, "--gateway-key", GATEWAY_KEY, "--broker",
                   "10.0.0.2", "--sensor", "mpu6050", "--no-start")
    assert done.returncode == 0, done.stdout + done.stderr
    doc = tomllib.loads((tmp_path / "root/etc/starling/agent.toml").read_text())
    config = parse_config(doc)
    assert config.replay is None and [s["kind"] for s in config.sensors] == ["mpu6050"]
    assert config.sampling.labels == Path("/var/lib/starling/labels.csv") and config.sampling.rate_hz == 50.0
