"""The layout's promises: console scripts answer --help, the agent stays small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import firmware_models
from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "starling-agent": "agent.cli",
    "starling-gateway": "gateway.cli",
    "starling-ledger": "ledger.cli",
    "starling-emulate": "hw.emulate",
    "starling-models": "firmware_models.cli",
    "starling-dashboard": "dashboard.cli",
}


def test_pyproject_declares_every_console_script_and_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {name: target.split(":")[0] for name, target in project["scripts"].items()} == SCRIPTS
    assert {"agent", "gateway", "emulator", "dashboard", "build", "dev"} <= set(project["optional-dependencies"])
    agent_extra = " ".join(project["optional-dependencies"]["agent"])
    assert "flwr" not in agent_extra and "sqlite" not in agent_extra and "tensorflow" not in agent_extra


def test_the_pins_the_tests_depend_on():
    """The build extra pins the TensorFlow the committed models were built with (the byte-for-byte rebuild is
    compared under it), the gateway pins Flower to the range it is tested with (it uses Flower's internals), and
    Python 3.10, which has no tomllib, gets tomli for the configs."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: [d.replace(" ", "") for d in deps] for name, deps in project["optional-dependencies"].items()}
    (built,) = {firmware_models.load_manifest(name)["build"]["tensorflow"] for name in firmware_models.MODELS}
    assert f"tensorflow-cpu=={built}" in extras["build"]
    (flwr,) = [d for d in extras["gateway"] if d.startswith("flwr")]
    assert ">=" in flwr and "<" in flwr.replace("<=", "")
    assert "tomli>=1.1;python_version<'3.11'" in [d.replace(" ", "").replace('"', "'") for d in project["dependencies"]]


@pytest.mark.parametrize("module", sorted(SCRIPTS.values()))
def test_each_command_answers_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_agent_imports_neither_flwr_nor_sqlite_utils_nor_tensorflow():
    code = (
        "import sys, agent.cli, agent.service, agent.learner, agent.samples, agent.state, firmware_models.runtime\n"
        "import agent.sensors.replay, agent.sensors.mpu6050, agent.sensors.bme280, agent.inference, agent.local_out\n"
        "import agent.inference_state, agent.predict\n"
        "from firmware_models.runtime import TrainableModel\n"
        "TrainableModel.from_package().get_weights()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in {'flwr', 'sqlite_utils', 'tensorflow', 'gateway', 'ledger', 'hw', 'dashboard'})\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_protocol_imports_only_numpy_cbor2_and_pynacl():
    code = (
        "import sys; before = set(sys.modules)\n"
        "import protocol, protocol.cbor, protocol.envelope, protocol.schemas, protocol.tensors, protocol.keys, protocol.topics\n"
        "import protocol.transport, protocol.logs, protocol.config\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(','.join(sorted(new - set(sys.stdlib_module_names) - {'protocol', 'numpy', 'cbor2', '_cbor2', 'nacl', '_cffi_backend', 'cffi', '_sodium', 'tomli'})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
