"""Device and link profiles in a real emulator run: a slow, budgeted, memory-capped device and a
lossy link with an outage still take part, and the report says what each profile and link did."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.config import tomllib  # the stdlib's, or tomli on Python 3.10

ROOT = Path(__file__).resolve().parents[2]

SCENARIO = """
[run]
name = "profiles"
rounds = 3
timeout_s = 200
[fleet]
devices = 3
subjects = [1, 2, 3]
[training]
epochs = 1
lr = 0.2
deadline_s = 40
[[device_profile]]
name = "old-pi"
count = 1
cpu_slowdown = 3.0
max_train_s = 20.0
max_samples = 400
memory_mb = 300
[[link]]
name = "lte"
count = 2
latency_ms = 40.0
jitter_ms = 10.0
bandwidth_kbps = 4000.0
loss = 0.05
outages = [[1.0, 4.0]]
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("profiles")
    (tmp_path / "scenario.toml").write_text(SCENARIO)
    done = subprocess.run(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(tmp_path / "scenario.toml"),
         "--report", str(tmp_path / "report.json"), "--workdir", str(tmp_path / "run")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert (tmp_path / "report.json").exists(), done.stderr[-4000:]
    return tmp_path, done, json.loads((tmp_path / "report.json").read_text())


def test_the_run_completes_with_every_device_taking_part(run):
    _, done, report = run
    assert done.returncode == 0, done.stderr[-4000:]
    assert [r["participants"] for r in report["rounds"][1:]] == [3, 3, 3]


def test_the_slow_device_gets_its_budget_and_the_report_counts_its_replies(run):
    tmp_path, _, report = run
    [profile] = report["device_profiles"]
    assert profile["name"] == "old-pi" and profile["cpu_slowdown"] == 3.0 and len(profile["devices"]) == 1
    assert profile["accepted"] >= 3 and profile["rejected"] == {}
    config = tomllib.loads((tmp_path / "run" / "devices" / profile["devices"][0] / "agent.toml").read_text())
    assert config["budget"] == {"max_train_s": 20.0, "max_samples": 400}


def test_devices_behind_the_link_reconnect_after_its_outage_and_their_traffic_is_counted(run):
    tmp_path, _, report = run
    [link] = report["links"]
    assert len(link["devices"]) == 2 and link["accepted"] >= 2 * 3
    assert link["bytes_up"] > 10_000 and link["bytes_down"] > 10_000
    # The outage (1-4 s after the relay started) cut or refused their connections; they came back: each device
    # connected, and one whose connection was cut connected again (on a loaded machine the devices may first
    # try during the outage, refused, and connect only after it).
    assert link["dropped"] + link["refused"] >= 1
    assert link["connections"] >= len(link["devices"]) + (1 if link["dropped"] else 0)
    for name in link["devices"]:
        config = tomllib.loads((tmp_path / "run" / "devices" / name / "agent.toml").read_text())
        assert config["broker"]["port"] != report_port(tmp_path)
    [outage] = [f for f in report["faults"] if f["kind"] == "link_outage"]
    assert outage["target"] == "lte" and abs((outage["t_end"] - outage["t"]) - 3.0) < 0.01


def report_port(tmp_path: Path) -> int:
    return json.loads((tmp_path / "run" / "run.json").read_text())["broker"]["port"]
