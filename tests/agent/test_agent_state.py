"""What the agent keeps across power cuts, and for whom."""

from __future__ import annotations

import json
import os

import pytest

from agent.state import AgentState, StateStore


def test_state_round_trips_for_its_gateway(tmp_path):
    store = StateStore(tmp_path)
    store.save(AgentState("gw-a", enrolled=True, trusted_version=7))
    assert StateStore(tmp_path).load("gw-a") == AgentState("gw-a", True, 7)


def test_a_device_moved_to_another_gateway_starts_over(tmp_path):
    store = StateStore(tmp_path)
    store.save(AgentState("gw-a", enrolled=True, trusted_version=7))
    assert store.load("gw-b") == AgentState("gw-b", False, -1)


def test_the_trusted_digest_and_newest_expiry_round_trip(tmp_path):
    state = AgentState("gw-a", True, 7, ["000001-t"], "ab" * 32, 1.9e9)
    StateStore(tmp_path).save(state)
    assert StateStore(tmp_path).load("gw-a") == state


def test_a_state_file_from_before_digests_and_expiries_still_loads(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps(
        {"gateway": "gw-a", "enrolled": True, "trusted_version": 7, "answered": ["000001-t"]}))
    assert StateStore(tmp_path).load("gw-a") == AgentState("gw-a", True, 7, ["000001-t"], "", 0.0)


@pytest.mark.parametrize("field, value", [("trusted_digest", "xyz"), ("trusted_digest", "AB" * 32),
                                          ("trusted_digest", 5), ("newest_expires", "soon"),
                                          ("newest_expires", float("inf"))])
def test_a_hand_mangled_digest_or_expiry_starts_over(tmp_path, field, value):
    doc = {"gateway": "gw-a", "enrolled": True, "trusted_version": 7, field: value}
    (tmp_path / "state.json").write_text(json.dumps(doc))
    assert StateStore(tmp_path).load("gw-a") == AgentState("gw-a")


def test_a_hand_mangled_state_file_starts_over_instead_of_crashing(tmp_path):
    (tmp_path / "state.json").write_text("{not json")
    assert StateStore(tmp_path).load("gw-a") == AgentState("gw-a")


def test_pending_replies_are_private_and_survive_a_new_store(tmp_path):
    StateStore(tmp_path).put_pending("000001-train-1-ab", b"\x01\x02")
    assert StateStore(tmp_path).pending() == {"000001-train-1-ab": b"\x01\x02"}
    assert os.stat(tmp_path / "pending" / "000001-train-1-ab.reply").st_mode & 0o777 == 0o600


def test_a_pending_reply_removed_while_listing_is_skipped(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.put_pending("a", b"1")
    store.put_pending("b", b"2")
    real_read = type(tmp_path).read_bytes

    def racing_read(path):
        if path.stem == "a":
            os.unlink(path)  # the receipt arrived between glob and read
        return real_read(path)

    monkeypatch.setattr(type(tmp_path), "read_bytes", racing_read)
    assert store.pending() == {"b": b"2"}
