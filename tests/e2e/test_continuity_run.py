"""The shipped continuity scenario, run for real: one gateway runs 20 rounds as a service would, through
an operator's stop (SIGTERM) that lowers its learning rate after round 10 and a crash (kill -9) after
round 15. Each start goes on from the last release: the rounds, the model versions and the model's
lineage on the ledger continue across both restarts."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

from protocol.config import read_toml

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "hw" / "scenarios" / "continuity.toml"
RELEASED = re.compile(r"model\.released digest=([0-9a-f]{16}) version=(\d+) round=(\d+)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("continuity")
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "hw.emulate", "--scenario", str(SCENARIO), "--report", str(report_path)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert report_path.exists(), done.stderr[-4000:]
    report = json.loads(report_path.read_text())
    log = (tmp_path / "report.run" / "logs" / "gateway.log").read_text()
    return tmp_path, done, report, log


@pytest.fixture(scope="module")
def chain(run):
    """`starling-ledger lineage` on the final model, as an operator would ask it."""
    _, _, report, _ = run
    asked = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "lineage", "--model", report["model"]["digest"],
         "--db", report["gateways"]["gw-1"]["ledger"]["path"]],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
        check=False,
    )
    return asked


def _faults(report):
    return {f["kind"]: f for f in report["faults"]}


def _lives(log: str) -> list[str]:
    """The gateway's log, one part per process (each begins at its gateway.start line)."""
    parts = re.split(r"(?m)^(?=.*gateway\.start )", log)
    return [p for p in parts if "gateway.start " in p]


def test_all_twenty_rounds_are_in_the_report_continuous_across_the_restarts(run):
    _, done, report, _ = run
    assert done.returncode == 0, done.stderr[-4000:]
    assert report["gateway"]["state"] == "done" and report["config"]["rounds"] == 20
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == list(range(21))  # round 0: the first model's evaluation
    assert all(r["accuracy"] is not None and r["participants"] == 5 for r in rounds[1:])
    # Each round's `t` is when its evaluation came in: in order, and no round ends while the gateway is
    # down (the round a stop or a crash interrupted ends after the gateway came back, not when it went down).
    ts = [r["t"] for r in rounds]
    assert ts == sorted(ts) and len(set(ts)) == len(ts)
    for kind, fault in _faults(report).items():
        assert fault["rounds_during"] == {"gw-1": []}, kind
        assert not [r["round"] for r in rounds if fault["t"] <= r["t"] <= fault["t_end"]], kind
        assert fault["next_round_after_s"]["gw-1"] is not None, kind  # and it went on afterwards


def test_the_accuracy_holds_across_the_stop(run):
    _, _, report, _ = run
    accuracy = {r["round"]: r["accuracy"] for r in report["rounds"]}
    assert accuracy[11] >= accuracy[10] - 0.05, accuracy
    assert accuracy[20] > accuracy[0] + 0.3  # and it learned


def test_each_fault_happened_as_asked(run):
    tmp_path, done, report, _ = run
    faults = _faults(report)
    assert set(faults) == {"gateway_stop", "gateway_restart"}
    stop, crash = faults["gateway_stop"]["detail"], faults["gateway_restart"]["detail"]
    assert stop["signal"] == "SIGTERM" and stop["exit"] == "exited" and stop["exit_code"] == 0, stop
    assert stop["overrides"] == {"lr": 0.1} and stop["previous"] == {"lr": 0.2}
    assert crash["signal"] == "SIGKILL" and "error" not in crash
    assert "fault over at" in done.stderr and "gateway_stop gw-1, started again with lr=0.1" in done.stderr
    page = (tmp_path / "report.html").read_text()
    assert "gateway_stop" in page and "gateway_restart" in page and "model lineage" in page


def test_the_log_shows_one_clean_stop_and_two_starts_that_go_on(run):
    _, _, _, log = run
    assert log.count("gateway.start ") == 3
    assert log.count("gateway.stopped") == 1  # the SIGTERM; a kill -9 leaves no last word
    starts = [line for line in log.splitlines() if "gateway.start " in line]
    assert 'lineage="first start"' in starts[0] and all("lineage=continues" in s for s in starts[1:])
    # Each start goes on with the round after its last release (or the one the stop or crash interrupted).
    for before_life, after_life in pairwise(_lives(log)):
        last = RELEASED.findall(before_life)[-1]
        next_round = int(re.search(r"gateway\.start .*next_round=(\d+)", after_life).group(1))
        first_new = next(m for m in RELEASED.findall(after_life) if int(m[1]) > int(last[1]))
        assert next_round == int(last[2]) + 1 == int(first_new[2])
        assert int(first_new[1]) == int(last[1]) + 1  # and the model versions go on


def test_the_lr_override_reached_the_rounds_after_the_stop(run):
    """The gateway records each release's config in its journal (rounds.db `release`)."""
    tmp_path, _, _, log = run
    home = tmp_path / "report.run" / "gateway"
    with sqlite3.connect(f"file:{home / 'rounds.db'}?mode=ro", uri=True) as db:
        lr = {r: json.loads(c).get("lr") for r, c in db.execute("select round, config from release where step = 1")}
    assert sorted(lr) == list(range(21))
    # The round the stop interrupted re-opened after it with the tasks it had sent before (and their lr):
    # the rounds before it were trained with lr 0.2, the ones after it with the override's 0.1.
    resumed = int(re.search(r"gateway\.start .*next_round=(\d+)", _lives(log)[1]).group(1))
    assert resumed in (11, 12)
    assert {lr[r] for r in range(1, resumed)} == {0.2}
    assert {lr[r] for r in range(resumed + 1, 21)} == {0.1}
    # That round records what its updates were trained with: a round the stop interrupted re-opened with the
    # config its tasks had (0.2); one that began after the restart got the override.
    interrupted = f"gateway.resume round={resumed} " in log  # (logged just before its gateway.start)
    assert lr[resumed] == (0.2 if interrupted else 0.1)
    assert read_toml(home / "gateway.toml")["rounds"]["lr"] == 0.1  # the emulator rewrote it, once


def test_the_final_models_lineage_on_the_ledger_runs_through_both_restarts(run, chain):
    _, _, _, log = run
    assert chain.returncode == 0, chain.stderr
    walk = json.loads(chain.stdout)
    assert walk["complete"] and walk["gap"] is None
    assert walk["length"] >= 21  # 20 releases and the lineage's first model
    releases = walk["releases"]
    assert [r["round"] for r in releases] == list(range(20, -1, -1))
    assert releases[-1]["reason"] == "first start" and releases[-1]["base"] is None
    by_prefix = {r["model"][:16]: (i, r) for i, r in enumerate(releases)}
    lives = _lives(log)
    assert len(lives) == 3
    for before_life, after_life in pairwise(lives):
        # The model released last before the gateway went down, and the first new one after it came
        # back (the head is published again at each start: same digest, same version).
        last = RELEASED.findall(before_life)[-1]
        first_new = next(m for m in RELEASED.findall(after_life) if int(m[1]) > int(last[1]))
        assert last[0] in by_prefix and first_new[0] in by_prefix, (last, first_new)
        i_before, before = by_prefix[last[0]]
        i_after, after = by_prefix[first_new[0]]
        assert i_after == i_before - 1 and after["base"] == before["model"]  # the one is built on the other


def test_the_reports_lineage_is_complete_and_matches_the_ledger(run, chain):
    _, _, report, _ = run
    lineage = report["lineage"]
    walk = json.loads(chain.stdout)
    assert lineage == report["gateways"]["gw-1"]["lineage"]
    assert lineage["complete"] and lineage["length"] == walk["length"] and lineage["model"] == walk["model"]
    assert [r["model"] for r in lineage["releases"]] == [r["model"] for r in walk["releases"]]
    assert lineage["version"] == report["model"]["version"] == 20
    crossed = {c["kind"]: c for c in lineage["restarts_crossed"]}
    assert set(crossed) == {"gateway_stop", "gateway_restart"}
    assert all(c["crossed"] for c in crossed.values()), crossed
    assert crossed["gateway_stop"]["before"]["round"] <= 10 < crossed["gateway_stop"]["after"]["round"]
    assert crossed["gateway_restart"]["before"]["round"] <= 15 < crossed["gateway_restart"]["after"]["round"]
