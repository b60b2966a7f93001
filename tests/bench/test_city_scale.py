"""bench/city_scale.py, smoke size: real gateways and device pools over Mosquitto merge every epoch into one
model, the JSON has its figures, and nothing the bench started is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from required_tools import require

from hw.broker import find_mosquitto

ROOT = Path(__file__).resolve().parent.parent.parent


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(200)
def test_city_scale_smoke(tmp_path):
    require(find_mosquitto() is not None, "the bench measures over a real Mosquitto (hw/install-system.sh)")
    workdir = tmp_path / "run"
    bench = subprocess.Popen(
        [sys.executable, "bench/city_scale.py", "--gateways", "2", "--devices-per-gateway", "2", "--rounds", "2",
         "--every", "1", "--timeout-s", "120", "--keep", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    try:
        out, err = bench.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops what it started on SIGTERM
        out, err = bench.communicate(timeout=60)
        pytest.fail(f"bench/city_scale.py took more than 180 s: {err[-4000:]}")
    assert bench.returncode == 0, err[-4000:]
    figures = json.loads(out.strip().splitlines()[-1])
    assert figures["gateways"] == 2 and figures["devices"] == 4 and figures["epochs"] == 2
    assert figures["rounds"] == 3  # the two epoch rounds and the trailing one
    assert figures["epochs_merged"] == 2 and figures["one_model_per_epoch"] is True
    assert set(figures["gateway_states"].values()) == {"done"} and figures["ledgers_agree"] is True
    latency = figures["epoch_latency_s"]
    assert latency["from_last_aggregate"]["n"] == 2
    assert 0 < latency["from_last_offer"]["p95"] <= latency["from_last_aggregate"]["p95"] < 60
    for row in latency["per_epoch"]:
        assert row["offers"] == row["merged_by"] == 2 and row["models"] == 1
    # The IMU CNN's shapes: a 47 KB model; each gateway fetched the other's once per epoch, no more.
    assert figures["model"]["params"] == 11751 and 47_000 < figures["model_bytes"] < 48_000
    assert figures["city_bytes_per_epoch"] == figures["mesh_bytes_per_epoch"] == 2 * figures["model_bytes"]
    assert figures["city_sent_bytes_per_epoch"] == 2 * figures["model_bytes"]  # each of the 2 offers, pushed once
    assert figures["goal_bytes"] == 4 * figures["model_bytes"] and figures["bytes_goal_met"] is True
    assert figures["audit_bytes_per_epoch"] > 0 and figures["audits"]["mismatch"] == 0
    offline = figures["recompute_s_per_aggregate"]["offline"]
    assert offline["aggregates"]["verdicts"] == {"match": offline["aggregates"]["count"]}
    # every = 1: the trailing round is an epoch too (merged, counted in the bytes, not in the latencies)
    assert figures["epochs_in_run"] == 3
    assert offline["aggregates"]["count"] == 2 * 3 and offline["cities"]["count"] == 2 * 3
    assert offline["aggregates"]["mean_s"] > 0 and figures["recompute_s_per_aggregate"]["in_run"]["mean_s"] > 0
    assert _processes_mentioning(str(workdir)) == []
