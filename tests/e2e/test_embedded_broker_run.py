"""The emulator's fallback broker carries a whole (small) federated run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_run_on_the_embedded_broker_completes_and_learns(tmp_path):
    scenario = tmp_path / "tiny.toml"
    scenario.write_text(
        '[run]\nname = "tiny-embedded"\nrounds = 2\ntimeout_s = 240\n'
        "[fleet]\ndevices = 2\nsubjects = [6, 7]\n"
        "[training]\nepochs = 2\nlr = 0.2\n"
        '[broker]\nkind = "embedded"\n'
    )
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(scenario), "--report", str(report_path)],
        cwd=ROOT, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["broker"] == "embedded"
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["rounds"][-1]["accuracy"] > report["rounds"][0]["accuracy"] + 0.2
    # genesis, enrollments, lineage, then per round its updates, aggregate and contributions
    assert report["ledger"]["verified"] and report["ledger"]["height"] == 1 + 2 + 1 + 2 + 2 + 2
