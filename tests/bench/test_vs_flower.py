"""bench/vs_flower.py, smoke size (one seed): every side really trains, the JSON has its keys, nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
FLOWER_CLIS = ("flower-superlink", "flower-supernode", "flower-superexec", "flwr")
SIDES = ("flower", "flower_process", "starling")


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/environ", "rb") as fh:
                environ = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (text in cmdline or text in environ) and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(240)
def test_vs_flower_smoke(tmp_path):
    bindir = Path(sys.executable).parent
    missing = [c for c in FLOWER_CLIS if not (bindir / c).exists()]
    if missing:
        pytest.skip(f"Flower's CLIs are not installed next to {sys.executable}: {missing}")
    workdir = tmp_path / "run"
    bench = subprocess.Popen(
        [sys.executable, "bench/vs_flower.py", "--devices", "2", "--rounds", "1", "--seeds", "1", "--timeout-s", "60",
         "--idle-s", "1", "--broker", "auto", "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    try:
        out, err = bench.communicate(timeout=200)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops what it started on SIGTERM
        out, err = bench.communicate(timeout=30)
        pytest.fail(f"bench/vs_flower.py took more than 200 s: {err[-4000:]}")
    assert bench.returncode == 0, err[-4000:]
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures) >= {"config", *SIDES, "ratio", "goals", "runs"}
    assert set(figures["ratio"]) == {"flower", "flower_process"}
    for baseline in ("flower", "flower_process"):
        assert set(figures["ratio"][baseline]) >= {"bytes_per_round", "seconds_per_round"}
        assert figures["ratio"][baseline]["bytes_per_round"] > 0 and figures["ratio"][baseline]["seconds_per_round"] > 0
    assert set(figures["goals"]) >= {"accuracy_gap_points", "equal_accuracy_on_means", "bytes_per_round_le_0_15x",
                                     "seconds_per_round_le_0_5x_flower_process"}
    for side in SIDES:
        got = figures[side]
        assert set(got) >= {"bytes_per_round", "seconds_per_round", "server_cpu_s", "server_peak_rss_mb",
                            "final_accuracy", "spread", "seeds"}, side
        assert got["seeds"] == [1] and got["failed_runs"] == 0
        for key in ("bytes_per_round", "seconds_per_round", "final_accuracy"):
            assert set(got["spread"][key]) == {"mean", "min", "max", "std", "values"}
        assert set(got["bytes_per_round"]) == {"up", "down", "total"}
        [run] = figures["runs"][side]
        assert run["seed"] == 1 and len(run["rounds"]) >= 1
        # Every side really trained: the model went down (Flower: float32, ~47 KB a device; Starling: the
        # int8 delta from the initial model the devices hold, ~12 KB), an update came up, the devices evaluated it.
        model_down = 20_000 if side == "starling" else 40_000
        assert got["bytes_per_round"]["up"] > 10_000 and got["bytes_per_round"]["down"] > model_down, (side, got)
        up, down, total = (got["bytes_per_round"][k] for k in ("up", "down", "total"))
        assert abs(total - up - down) <= 1  # each rounded on its own
        assert 0 < got["final_accuracy"] <= 1, (side, got["final_accuracy"])
        assert got["seconds_per_round"] > 0 and got["server_cpu_s"] > 0 and got["server_peak_rss_mb"] > 10
    for side in ("flower", "flower_process"):
        run = figures["runs"][side][0]
        assert "flwr-serverapp" in run["server_processes"]
        # A ClientApp process per message on both: 2 devices x (train + evaluate) x 1 round.
        assert run["devices_processes"]["flwr-clientapp"]["count"] >= 4, run["devices_processes"]
    # With process isolation the bench started the SuperExecs itself: one for the ServerApp, one per SuperNode.
    assert "--isolation process" in figures["flower_process"]["runtime"]
    # Mosquitto counts in Starling's server figures.
    assert {"mosquitto", "hw.embedded_broker"} & set(figures["runs"]["starling"][0]["server_processes"])
    # Every process the bench started is gone (they all name the run folder in their command line, configs and
    # data files, or in their environment: FLWR_HOME, which the SuperExecs and ClientApps inherit).
    assert _processes_mentioning(str(workdir)) == []
