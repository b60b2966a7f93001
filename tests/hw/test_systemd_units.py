"""The shipped systemd unit passes `systemd-analyze verify` and has the hardening the issue asks for."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from required_tools import needs

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "hw" / "systemd" / "starling-agent.service"
INSTALLED_AT = "/opt/starling/venv/bin/starling-agent"


def settings(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


@needs(shutil.which("systemd-analyze") is not None, "needs systemd-analyze (hw/install-system.sh)")
def test_the_agent_unit_passes_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart exists: point it at this environment's agent (as install.sh's venv holds it).
    agent = shutil.which("starling-agent") or str(Path(sys.executable).resolve())
    unit = tmp_path / "starling-agent.service"
    unit.write_text(UNIT.read_text().replace(INSTALLED_AT, agent))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.strip() == "", done.stderr  # no warnings either


def test_the_agent_unit_is_a_hardened_notify_service_with_a_watchdog():
    unit = settings(UNIT.read_text())
    assert unit["Type"] == "notify" and int(unit["WatchdogSec"]) > 0 and unit["Restart"] == "on-failure"
    assert unit["StateDirectory"] == "starling" and unit["ProtectSystem"] == "strict"
    assert unit["NoNewPrivileges"] == "true" and unit["MemoryMax"].endswith("M")
    assert unit["CapabilityBoundingSet"] == "" and unit["User"] == "starling"
    assert unit["ExecStart"].startswith(INSTALLED_AT) and "--config /etc/starling/agent.toml" in unit["ExecStart"]
