"""Running the real emulator from a test: a scenario text in, its process and report out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    """This checkout on the path, OpenBLAS on one thread (a 2-core machine runs several processes)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}


def emulate(tmp_path: Path, scenario: str, timeout: float = 150) -> tuple[subprocess.CompletedProcess, dict]:
    """Write `scenario` to tmp_path, run `hw.emulate` on it (bounded by `timeout`), return it and its report."""
    path = tmp_path / "scenario.toml"
    path.write_text(scenario)
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(path), "--report", str(report_path),
         "--workdir", str(tmp_path / "run")],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert report_path.exists(), done.stderr[-4000:]
    return done, json.loads(report_path.read_text())
