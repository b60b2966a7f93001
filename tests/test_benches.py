"""The benchmarks run and print the JSON their issues ask for (tiny sizes here; figures come from full runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
    # What the time went on: each process's CPU per reply, and the gateway's own account by stage.
    assert set(figures["cpu_us_per_reply"]) == {"gateway", "broker", "loadgen", "all"}
    profile = figures["profile"]
    assert profile["replies"] == 100 and profile["stages_us"]["stage1.verify"] > 0
    assert abs(sum(profile["share"].values()) - 1.0) < 0.01


def test_gateway_ingest_with_a_worker_profiles_stage_one_there():
    figures = run_bench("bench/gateway_ingest.py", "--replies", "100", "--params", "1000", "--workers", "1")
    assert figures["replies"] == 100 and figures["cpu_us_per_reply"]["ingest_workers"] > 0
    profile = figures["profile"]
    assert profile["stages_us"]["stage1.verify"] == 0  # the gateway trusts the worker's stage 1 ...
    assert profile["replies"] == 100 and profile["stages_us"]["receipt.sign"] > 0  # ... and signs the receipts
    assert profile["workers"]["worker0"]["replies"] == 100 and profile["workers"]["worker0"]["stages_us"]["stage1.verify"] > 0


def test_round_scale_prints_its_figures():
    figures = run_bench("bench/round_scale.py", "--devices", "20", "--params", "1000", "--strategies", "FedAvg,Krum")
    assert set(figures) >= {"devices", "params", "close_s", "peak_rss_mb"}
    assert set(figures["close_s"]) == {"FedAvg", "Krum"} and all(s >= 0 for s in figures["close_s"].values())
    assert figures["peak_rss_mb"] > 10


def test_ledger_append_prints_its_figures():
    figures = run_bench("bench/ledger_append.py", "--records", "400", "--batch", "100", "--devices", "100")
    assert figures["records_per_s"] > 0 and figures["records_per_s_verified"] > 0
    assert 100 < figures["bytes_per_record"] < 1000  # a record is ~135 bytes of vertex plus its index rows


def test_ledger_gossip_prints_its_figures():
    figures = run_bench("bench/ledger_gossip.py", "--sizes", "3", "--vertices", "5", "--partition-s", "1")
    assert set(figures["gateways"]) == {"3"}
    spread = figures["gateways"]["3"]
    assert 0 <= spread["p50_s"] <= spread["p95_s"] < 10
    assert 0 < figures["heal_s"] < 60 and figures["written_during_partition"] > 0


@pytest.mark.parametrize("live", [False, True], ids=["replay", "live"])
def test_agent_footprint_prints_its_figures(live):
    figures = run_bench("bench/agent_footprint.py", "--idle-s", "1", "--skip-install", "--inference-every-s", "1",
                        *(["--live"] if live else []))
    assert figures["data"] == ("live 50 Hz" if live else "replay")
    assert 10 < figures["peak_rss_mb"] < 1000 and figures["cpu_s"] > 0
    assert 0 <= figures["idle_cpu_pct"] < 100 and figures["train_step_ms"] > 0
    assert figures["inference"] == "every 1 s" and figures["inference_runs"] >= 1  # it ran inside the agent ...
    assert figures["inference_lines_read"] >= 1  # ... and a local client read its results
    assert 0 < figures["inference_ms_per_window_at_32"] < figures["inference_ms"]


def test_accuracy_prints_centralized_fedavg_fedprox_and_the_gap():
    figures = run_bench("bench/accuracy.py", "--rounds", "2", "--epochs", "1", "--devices", "2")
    assert len(figures["centralized_per_round"]) == len(figures["fedavg"]) == len(figures["fedprox"]) == 2
    assert all(0 < a <= 1 for a in [figures["centralized"], *figures["fedavg"], *figures["fedprox"]])
    best = max(figures["fedavg"][-1], figures["fedprox"][-1])
    assert figures["gap_pts"] == round((figures["centralized"] - best) * 100, 2)
    assert len(figures["fedadam"]) == 2 and all(0 < a <= 1 for a in figures["fedadam"])  # the extra FedAdam line
    assert figures["gap_pts_fedadam"] == round((figures["centralized"] - figures["fedadam"][-1]) * 100, 2)
    assert "skipped" in figures["mcu"]  # no TensorFlow here: said, not faked


def test_emulator_scale_prints_its_figures():
    figures = run_bench("bench/emulator_scale.py", "--devices-per-gateway", "4", "--rounds", "2")
    assert figures["devices"] == 12 and figures["gateways"] == 3 and figures["rounds"] == 2
    assert figures["participants_per_round"] == {"gw-1": [4, 4], "gw-2": [4, 4], "gw-3": [4, 4]}
    assert figures["ledgers_identical"] is True and figures["every_accepted_update_in_every_ledger"] is True
    # The emulator, its broker, 3 gateways and a device pool at least, each with some memory.
    assert figures["processes"] >= 6 and figures["peak_tree_rss_mb"] > 6 * 10


def test_blob_fetch_prints_its_figures():
    figures = run_bench("bench/blob_fetch.py", "--fetches", "3", "--size-kb", "300")
    assert set(figures["sizes"]) == {"imu_cnn_model", "300k"} and figures["sizes"]["300k"]["bytes"] == 300 * 1024
    for size in figures["sizes"].values():
        assert size["fetches"] == 3 and 0 < size["p50_ms"] <= size["p95_ms"] and size["mb_per_s"] > 0
    assert figures["concurrent"]["fetches"] == 3 and figures["concurrent"]["mb_per_s"] > 0
