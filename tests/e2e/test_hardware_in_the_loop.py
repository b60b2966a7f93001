"""`starling-emulate --listen`: a "real" device joins an emulated fleet with nothing but the join kit.

The real device here is `starling-agent run` in its own process, configured from the kit's
agent.toml (paths moved into the test folder, recorded windows in place of the MPU-6050), that
connects to the broker's second listener (127.0.0.2: another loopback address, standing in for
the laptop's LAN address) and enrolls with the voucher the emulator minted for its key.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from required_tools import needs

from hw.broker import find_mosquitto, free_port
from ledger.store import Ledger
from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10
from protocol.keys import Identity

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}

pytestmark = needs(find_mosquitto() is not None, "--listen needs Mosquitto (hw/install-system.sh)")

SCENARIO = """
[run]
name = "hil"
rounds = 2
timeout_s = 240
[fleet]
devices = 2
subjects = [1, 2]
[training]
epochs = 1
lr = 0.2
deadline_s = 30
[broker]
kind = "mosquitto"
"""


def _toml(doc: dict) -> str:
    lines = []
    for section, table in doc.items():
        tables = table if isinstance(table, list) else [table]
        for t in tables:
            lines.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def test_a_device_with_the_join_kit_enrolls_by_voucher_and_trains_in_the_emulated_fleet(tmp_path: Path):
    device = Identity.generate()  # made "on the device": the emulator only ever sees the public key
    device.save(tmp_path / "pi" / "device.key")
    (tmp_path / "scenario.toml").write_text(SCENARIO)
    port = free_port()
    run_dir = tmp_path / "run"
    emulator = subprocess.Popen(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(tmp_path / "scenario.toml"),
         "--report", str(tmp_path / "report.json"), "--workdir", str(run_dir),
         "--listen", f"127.0.0.2:{port}", "--hil-device", device.public_key.hex()],
        cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    agent = None
    try:
        kit = run_dir / "hil" / "kit"
        end = time.monotonic() + 60
        while not (kit / "agent.toml").exists() or not (run_dir / "devices" / "subject-01" / "agent.toml").exists():
            assert emulator.poll() is None and time.monotonic() < end, emulator.communicate()[1][-3000:]
            time.sleep(0.2)
        time.sleep(0.3)  # (written atomically? the kit is small; give the writer a moment)
        config = tomllib.loads((kit / "agent.toml").read_text())
        assert config["broker"] == {"host": "127.0.0.2", "port": port}
        assert (kit / "voucher.cbor").exists() and (kit / "JOIN.txt").exists()
        # On the Pi the kit's paths are /etc/starling and /var/lib/starling; here, the test folder.
        replay = tomllib.loads((run_dir / "devices" / "subject-01" / "agent.toml").read_text())["data"]["replay"]
        config["device"].update(key=str(tmp_path / "pi" / "device.key"), state_dir=str(tmp_path / "pi" / "state"),
                                voucher=str(kit / "voucher.cbor"), name="real-pi")
        config.pop("sensor", None)
        config["data"] = {"replay": replay}
        (tmp_path / "pi" / "agent.toml").write_text(_toml(config))
        with open(tmp_path / "pi" / "agent.log", "wb") as log:
            agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config",
                                      str(tmp_path / "pi" / "agent.toml")], cwd=ROOT, env=ENV,
                                     stdout=log, stderr=subprocess.STDOUT)
        _, stderr = emulator.communicate(timeout=300)
    finally:
        for process in (emulator, agent):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(20)
    assert emulator.returncode == 0, stderr[-4000:]
    assert "hardware in the loop: real devices connect to 127.0.0.2:" in stderr
    report = json.loads((tmp_path / "report.json").read_text())
    real = report["real_devices"][device.id]
    assert real["accepted"] >= 2, real  # round 1's training and evaluations, like any emulated device
    assert not real.get("rejected"), real
    assert [r["participants"] for r in report["rounds"]][1:] == [3, 3]  # two emulated + the real one
    with Ledger.open(run_dir / "gateway" / "ledger.db", read_only=True) as ledger:
        assert device.public_key in ledger.enrolled_devices()
