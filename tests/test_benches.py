"""The benchmarks run and print the JSON their issues ask for (tiny sizes here; figures come from full runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_bench(*args: str) -> dict:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_gateway_ingest_prints_its_figures():
    figures = run_bench("bench/gateway_ingest.py", "--replies", "100", "--params", "1000")
    assert figures["replies"] == 100 and figures["rejected"] == {}
    assert figures["verified_per_s"] > 0 and figures["verify_limit_per_s"] > 0
    assert abs(figures["ratio"] - figures["verified_per_s"] / figures["verify_limit_per_s"]) < 0.002


def test_round_scale_prints_its_figures():
    figures = run_bench("bench/round_scale.py", "--devices", "20", "--params", "1000", "--strategies", "FedAvg,Krum")
    assert set(figures) >= {"devices", "params", "close_s", "peak_rss_mb"}
    assert set(figures["close_s"]) == {"FedAvg", "Krum"} and all(s >= 0 for s in figures["close_s"].values())
    assert figures["peak_rss_mb"] > 10
