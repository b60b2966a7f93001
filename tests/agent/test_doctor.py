"""`starling-agent doctor` says plainly what is wrong with an installed agent, and exits 1 if anything is."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from required_tools import require

from hw.broker import Broker, find_mosquitto, free_port
from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    with Broker(tmp_path_factory.mktemp("broker")) as running:
        yield running


def setup(tmp_path: Path, port: int, sensor: str = "") -> Path:
    Identity.generate().save(tmp_path / "device.key")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", x_train=rng.normal(size=(4, 128, 6)).astype(np.float32),
             y_train=np.zeros(4, np.int64), x_test=rng.normal(size=(2, 128, 6)).astype(np.float32),
             y_test=np.zeros(2, np.int64))
    (tmp_path / "walk.csv").write_text("ax,ay,az\n0.1,0.2,0.98\n")
    conf = tmp_path / "agent.toml"
    gateway = Identity.generate()
    conf.write_text(
        f'[device]\nname = "d"\nkey = "device.key"\nstate_dir = "state"\n'
        f'[gateway]\nid = "{gateway.id}"\npublic_key = "{gateway.public_key.hex()}"\n'
        f'[broker]\nhost = "127.0.0.1"\nport = {port}\n[data]\nreplay = "data.npz"\n'
        '[[sensor]]\nkind = "replay"\npath = "walk.csv"\n' + sensor
    )
    return conf


def doctor(conf: Path) -> tuple[int, dict[str, dict]]:
    done = subprocess.run([sys.executable, "-m", "agent.cli", "doctor", "--config", str(conf), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    doc = json.loads(done.stdout)
    return done.returncode, {c["name"]: c for c in doc["checks"]}


def test_a_healthy_agent_passes_every_check(broker, tmp_path):
    code, checks = doctor(setup(tmp_path, broker.port))
    assert code == 0, checks
    assert list(checks) == ["config", "key", "state", "interpreter", "model", "data", "sensor[0]", "broker"]
    assert "ax=0.1" in checks["sensor[0]"]["detail"] and "MQTT login accepted" in checks["broker"]["detail"]
    assert "parameters, signatures run" in checks["model"]["detail"]


def test_each_problem_is_named_with_what_to_do(broker, tmp_path):
    conf = setup(tmp_path, free_port(), '[[sensor]]\nkind = "mpu6050"\ni2c_bus = 97\n')
    (tmp_path / "device.key").chmod(0o644)
    code, checks = doctor(conf)
    assert code == 1
    assert not checks["key"]["ok"] and "chmod 600" in checks["key"]["detail"]
    assert not checks["broker"]["ok"] and "cannot reach" in checks["broker"]["detail"]
    assert not checks["sensor[1]"]["ok"] and "/dev/i2c-97" in checks["sensor[1]"]["detail"]
    assert checks["model"]["ok"] and checks["sensor[0]"]["ok"]  # the rest is still checked


@pytest.fixture
def refusing_broker(tmp_path):
    """A Mosquitto that refuses every login: no anonymous access and no password file."""
    require(find_mosquitto() is not None, "needs mosquitto (hw/install-system.sh)")
    with Broker(tmp_path / "refusing", kind="mosquitto", anonymous=False) as broker:
        yield broker.port


def test_a_refused_login_is_named_with_the_broker_s_reason(refusing_broker, tmp_path):
    code, checks = doctor(setup(tmp_path, refusing_broker))
    assert code == 1
    assert not checks["broker"]["ok"]
    assert checks["broker"]["detail"].startswith("the broker refused the login: Not authorized (username -: ")


def test_a_bad_config_is_the_only_thing_reported(tmp_path):
    conf = tmp_path / "agent.toml"
    conf.write_text('[device]\nname = "d"\n[[sensor]]\nkind = "geiger"\n')
    code, checks = doctor(conf)
    assert code == 1 and list(checks) == ["config"] and not checks["config"]["ok"]


@pytest.mark.parametrize("table, message", [
    ('kind = "geiger"', "sensor[0].kind must be one of"),
    ('kind = "bme280"\nrange = 3', "a bme280 sensor takes"),
    ('kind = "mpu6050"\naddress = 200', "not a 7-bit I2C address"),
    ('kind = "replay"', "path is required"),
    ('kind = "mpu6050"\nrate_hz = "fast"', "wrong type"),
])
def test_a_bad_sensor_table_is_a_config_error_naming_it(table, message):
    from agent.config import ConfigError, parse_config

    doc = {"device": {"name": "d", "key": "k", "state_dir": "s"},
           "gateway": {"id": "0" * 32, "public_key": "ab" * 32}, "data": {"replay": "x.npz"},
           "sensor": [tomllib.loads(table)]}
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(doc)


def test_live_sensors_are_checked_against_the_model_and_the_label_file(broker, tmp_path):
    conf = setup(tmp_path, broker.port)
    six = "ax,ay,az,gx,gy,gz\n" + "0.1,0.2,0.98,0,0,0\n" * 3
    (tmp_path / "imu.csv").write_text(six)
    live = conf.read_text().replace('replay = "data.npz"', 'labels = "labels.csv"').replace("walk.csv", "imu.csv")
    conf.write_text(live)
    code, checks = doctor(conf)
    assert code == 0 and "6 channels at 50 Hz" in checks["data"]["detail"]
    assert "not written yet" in checks["data"]["detail"]
    (tmp_path / "labels.csv").write_text("start,end,label\n1,2,99\n")
    code, checks = doctor(conf)
    assert code == 1 and "label 99 is not a class of the model" in checks["data"]["detail"]
    conf.write_text(live.replace("imu.csv", "walk.csv"))  # 3 channels
    code, checks = doctor(conf)
    assert code == 1 and "the sensors give 3 channels (ax, ay, az), model imu_cnn takes (128, 6)" \
        in checks["data"]["detail"]
