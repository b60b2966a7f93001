"""The reply path's per-stage profile (STARLING_INGEST_PROFILE): it measures, and changes no outcome."""

from __future__ import annotations

import json

import pytest
from test_admission import DEVICE, Harness, reply, topic

from gateway import ingest_profile
from gateway.ingest import Accepted, Rejected


@pytest.fixture
def profile(tmp_path, monkeypatch):
    profile = ingest_profile.StageProfile(tmp_path / "profile.json")
    monkeypatch.setattr(ingest_profile, "PROFILE", profile)
    return profile


def test_off_unless_the_variable_names_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv(ingest_profile.PROFILE_ENV, raising=False)
    assert ingest_profile.from_env() is None
    monkeypatch.setenv(ingest_profile.PROFILE_ENV, str(tmp_path / "p.json"))
    assert ingest_profile.from_env().path == tmp_path / "p.json"


def test_each_stage_is_counted_per_reply_and_outcomes_and_receipts_do_not_change(profile):
    harness = Harness()
    harness.open("train", 3)
    outcomes = harness.intake.handle([(topic(), reply(), None), (topic(), b"\xff garbage", None)])
    assert isinstance(outcomes[0], Accepted) and isinstance(outcomes[1], Rejected)
    assert [r.accepted for _, r in harness.receipts(DEVICE)] == [True]  # garbage gets no receipt
    profile.write()
    report = json.loads(profile.path.read_text())
    assert report["replies"] == 2
    assert set(report["stages_us"]) == set(ingest_profile.STAGES)
    assert all(v >= 0 for v in report["stages_us"].values())
    for stage in ("stage1.decode", "stage1.verify", "stage1.update_check", "receipt.sign"):  # tens of us each
        assert report["stages_us"][stage] > 0, stage
    assert report["stages_total_us"] <= report["process_us"] + 1.0
    assert "gateway-worker" not in report["threads_us"] or report["threads_us"]["gateway-worker"] >= 0
