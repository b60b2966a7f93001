"""The shipped fault scenario, run for real: a city keeps learning through a gateway crash, a
partition, a broker restart and device churn, and ends with identical, complete ledgers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from required_tools import needs

from hw.broker import find_mosquitto

ROOT = Path(__file__).resolve().parents[2]

pytestmark = needs(find_mosquitto() is not None, "the fault scenario runs on Mosquitto (hw/install-system.sh)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("faults")
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(ROOT / "hw" / "scenarios" / "faults.toml"),
         "--report", str(report_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600,
    )
    assert report_path.exists(), done.stderr[-4000:]
    return tmp_path, done, json.loads(report_path.read_text())


def test_every_gateway_finishes_its_rounds_through_the_faults(run):
    _, done, report = run
    assert done.returncode == 0, done.stderr[-4000:]
    rounds = report["config"]["rounds"]
    for name, section in report["gateways"].items():
        assert section["state"] == "done", (name, section["failure"])
        assert [r["round"] for r in section["rounds"]] == list(range(rounds + 1)), name


def test_the_ledgers_end_identical_with_every_accepted_update(run):
    _, _, report = run
    check = report["ledger_check"]
    assert check["identical"] and check["every_accepted_update_in_every_ledger"], check
    assert all(section["ledger"]["verified"] for section in report["gateways"].values())


def test_each_fault_happened_and_is_in_the_report_with_its_span(run):
    tmp_path, done, report = run
    faults = {f["kind"]: f for f in report["faults"]}
    assert set(faults) == {"gateway_restart", "partition", "broker_restart", "device_churn"}
    for f in faults.values():
        assert "error" not in f["detail"] and "skipped" not in f["detail"], f
        assert 0 < f["t"] < f["t_end"] < report["seconds"], f
        assert set(f["rounds_during"]) == set(report["gateways"])
    assert faults["device_churn"]["detail"]["devices"] == 3
    # The crashed gateway really died and came back: two starts in its log.
    log = (tmp_path / "report.run" / "logs" / "gw-2.log").read_text()
    assert log.count("gateway.start ") == 2
    assert "fault at" in done.stderr and "fault over at" in done.stderr  # live progress


def test_the_faults_are_drawn_on_the_plots(run):
    tmp_path, _, report = run
    page = (tmp_path / "report.html").read_text()
    for kind in ("gateway_restart", "partition", "broker_restart", "device_churn"):
        assert kind in page
    plots = tmp_path / "report_plots"
    assert (plots / "accuracy.png").stat().st_size > 10_000 and (plots / "ledger.png").stat().st_size > 10_000
