"""bench/vs_flower.py, smoke size: both sides really train, the JSON has its keys, nothing is left running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
FLOWER_CLIS = ("flower-superlink", "flower-supernode", "flwr")


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


@pytest.mark.timeout(150)
def test_vs_flower_smoke(tmp_path):
    bindir = Path(sys.executable).parent
    missing = [c for c in FLOWER_CLIS if not (bindir / c).exists()]
    if missing:
        pytest.skip(f"Flower's CLIs are not installed next to {sys.executable}: {missing}")
    workdir = tmp_path / "run"
    bench = subprocess.Popen(
        [sys.executable, "bench/vs_flower.py", "--devices", "2", "--rounds", "1", "--timeout-s", "60",
         "--idle-s", "1", "--broker", "auto", "--workdir", str(workdir)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    try:
        out, err = bench.communicate(timeout=135)
    except subprocess.TimeoutExpired:
        bench.terminate()  # the bench stops what it started on SIGTERM
        out, err = bench.communicate(timeout=30)
        pytest.fail(f"bench/vs_flower.py took more than 135 s: {err[-4000:]}")
    assert bench.returncode == 0, err[-4000:]
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures) >= {"config", "flower", "starling", "ratio", "goals"}
    assert set(figures["ratio"]) >= {"bytes_per_round", "seconds_per_round"}
    for side in ("flower", "starling"):
        got = figures[side]
        assert set(got) >= {"bytes_per_round", "seconds_per_round", "server_cpu_s", "server_peak_rss_mb",
                            "final_accuracy", "rounds"}, side
        assert set(got["bytes_per_round"]) == {"up", "down", "total"}
        # Both sides really trained: the model went down, an update came up, the devices evaluated it.
        assert got["bytes_per_round"]["up"] > 10_000 and got["bytes_per_round"]["down"] > 40_000, (side, got)
        up, down, total = (got["bytes_per_round"][k] for k in ("up", "down", "total"))
        assert abs(total - up - down) <= 1  # each rounded on its own
        assert 0 < got["final_accuracy"] <= 1, (side, got["final_accuracy"])
        assert got["seconds_per_round"] > 0 and got["server_cpu_s"] > 0 and got["server_peak_rss_mb"] > 10
    assert figures["ratio"]["bytes_per_round"] > 0 and figures["ratio"]["seconds_per_round"] > 0
    assert "flwr-serverapp" in figures["flower"]["server_processes"]
    # Every process the bench started is gone (they all name the run folder: configs, data files).
    assert _processes_mentioning(str(workdir)) == []
