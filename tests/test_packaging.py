"""The layout's promises: console scripts answer --help, the agent stays small."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {name: target.split(":")[0] for name, target in project["scripts"].items()} == SCRIPTS
    assert {"agent", "gateway", "emulator", "dashboard", "build", "dev"} <= set(project["optional-dependencies"])
    agent_extra = " ".join(project["optional-dependencies"]["agent"])
    assert "flwr" not in agent_extra and "sqlite" not in agent_extra and "tensorflow" not in agent_extra


@pytest.mark.parametrize("module", sorted(SCRIPTS.values()))
def test_each_command_answers_help(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_the_agent_imports_neither_flwr_nor_sqlite_utils_nor_tensorflow():
    code = (
        "import sys, agent.cli, agent.service, agent.learner, agent.samples, agent.state, firmware_models.runtime\n"
        "import agent.sensors.replay, agent.sensors.mpu6050, agent.sensors.bme280, agent.inference, agent.local_out\n"
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
        "print(','.join(sorted(new - set(sys.stdlib_module_names) - {'protocol', 'numpy', 'cbor2', '_cbor2', 'nacl', '_cffi_backend', 'cffi', '_sodium'})))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
