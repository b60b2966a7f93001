"""The fleet model: what a real run's status messages become, and what it refuses without ever raising."""

from __future__ import annotations

import json

from dashboard_helpers import gateway_id, last_status
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboard.fleet import REVOKE_MARK, VERTEX_DOMAIN, Fleet
from protocol import cbor
from protocol.keys import Identity

GW = gateway_id()
STATUS = f"starling/{GW}/status"


def _status(fleet: Fleet, doc: dict, now: float = 2000.0) -> str | None:
    return fleet.apply(STATUS, json.dumps(doc).encode(), now)


def test_a_real_run_becomes_one_gateway_with_its_rounds_accuracy_ledger_and_devices(replayed):
    gw = replayed.gateways[GW]
    assert (gw.name, gw.state, gw.round, gw.num_rounds, gw.enrolled, gw.devices_online) == ("gw-1", "done", 3, 3, 3, 3)
    series = gw.series()
    assert [p.round for p in series] == [0, 1, 2, 3]
    assert all(p.accuracy is not None for p in series) and series[-1].accuracy > series[0].accuracy
    assert [p.participants for p in series] == [0, 3, 3, 3]
    assert gw.ledger is not None and gw.ledger.height == 10 and gw.ledger.lag == 0
    devices = [d for (g, _), d in replayed.devices.items() if g == GW]
    assert len(devices) == 3
    assert all(d.accepted > 0 and d.online and d.rejected == {} and d.last_seen for d in devices)
    assert replayed.malformed == {}


def test_the_gossip_version_vector_keeps_the_ledger_fresher_than_the_status(replayed):
    gw = replayed.gateways[GW]
    assert gw.ledger.source == "gossip"  # the run's last vv came after its last status
    stale = dict(last_status(), ledger={"height": 3, "final": 3, "lag": 0, "time": 1.0})
    assert _status(replayed, stale) is None
    assert replayed.gateways[GW].ledger.height == 10


def test_the_last_will_marks_the_gateway_offline_and_keeps_what_was_known(replayed):
    assert replayed.gateways[GW].online is None  # done: the run ended, the gateway left cleanly
    assert _status(replayed, {"state": "offline"}, now=5000.0) is None
    gw = replayed.gateways[GW]
    assert gw.online is False and gw.state_since == 5000.0
    assert (gw.round, gw.name, len(gw.rounds)) == (3, "gw-1", 4)


def test_a_new_run_restarts_the_accuracy_series_but_a_longer_history_extends_it(replayed):
    doc = last_status()
    doc["history"] = doc["history"][:1]
    doc["round"] = 0
    _status(replayed, doc)
    assert list(replayed.gateways[GW].rounds) == [0]
    doc["history"] = last_status()["history"][:3]
    _status(replayed, doc)
    assert list(replayed.gateways[GW].rounds) == [0, 1, 2]


def test_a_gateway_restart_restarts_the_rejection_samples():
    fleet = Fleet()
    _status(fleet, {"state": "running", "rejections": {"malformed": 5}}, now=1.0)
    _status(fleet, {"state": "running", "rejections": {"malformed": 7}}, now=2.0)
    _status(fleet, {"state": "running", "rejections": {}}, now=3.0)
    assert list(fleet.gateways[GW].rejection_samples) == [(3.0, 0)]


MALFORMED = [
    (STATUS, b"", "not_json"),
    (STATUS, b"\xff\xfe", "not_json"),
    (STATUS, b"[1, 2]", "not_an_object"),
    (STATUS, b'{"gateway": "' + b"b" * 32 + b'"}', "gateway_mismatch"),
    (STATUS, b'{"round": "three"}', "bad_field"),
    (STATUS, b'{"round": true}', "bad_field"),
    (STATUS, b'{"rejections": {"malformed": -1}}', "bad_field"),
    (STATUS, b'{"rejections": {"malformed": true}}', "bad_field"),
    (STATUS, b'{"history": [{"accuracy": 0.5}]}', "bad_field"),
    (STATUS, b'{"history": [{"round": 1, "accuracy": NaN}]}', "bad_field"),
    (STATUS, b'{"time": 1' + b"0" * 400 + b'}', "bad_field"),  # an integer beyond the float range
    (STATUS, b'{"ledger": {"peers": "all"}}', "bad_field"),
    (STATUS, b'{"revoked": {"count": 1, "devices": ["not-an-id"]}}', "bad_field"),
    (STATUS, b'{"name": "' + b"x" * 500 + b'"}', "bad_field"),
    (STATUS, b"[" * 100_000, "not_json"),
    (STATUS, b" " * (9 * 1024 * 1024), "too_large"),
    ("starling/NOT-AN-ID/status", b"{}", "bad_topic"),
    (f"starling/{GW}/status/device/short", b"{}", "bad_topic"),
    (f"starling/{GW}/status/device/{'c' * 32}", b'{"device": "' + b"d" * 32 + b'"}', "device_mismatch"),
    (f"starling/{GW}/status/device/{'c' * 32}", b'{"online": "yes"}', "bad_field"),
    (f"starling/{GW}/status/other", b"{}", "unexpected_topic"),
    (f"starling/ledger/vv/{GW}", b"\x1c", "bad_cbor"),
    (f"starling/ledger/vv/{GW}", cbor.dumps({"height": -1}), "bad_field"),
]


def test_each_kind_of_malformed_message_is_counted_under_its_reason_and_changes_nothing(replayed):
    before = json.dumps(replayed.gateways[GW].__dict__, default=str)
    for topic, payload, reason in MALFORMED:
        assert replayed.apply(topic, payload, 3000.0) == reason, (topic, payload[:80])
    assert sum(replayed.malformed.values()) == len(MALFORMED)
    assert json.dumps(replayed.gateways[GW].__dict__, default=str) == before


def test_ledger_traffic_the_dashboard_does_not_read_is_ignored_not_counted():
    fleet = Fleet()
    for topic in (f"starling/ledger/want/{GW}", f"starling/ledger/give/{GW}", f"starling/ledger/vertex/{GW}"):
        assert fleet.apply(topic, b"\x00 anything", 1.0) is None
    assert fleet.malformed == {}


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([STATUS, f"starling/{GW}/status/device/{'c' * 32}", f"starling/ledger/vv/{GW}",
                        f"starling/ledger/vertex/{GW}", "starling/x/y/z"]),
       st.one_of(st.binary(max_size=300),
                 st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                              lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                                  st.sampled_from(["state", "round", "history", "rejections", "ledger", "accepted",
                                                   "rejected", "online", "peers", "time", "last_seen", "x"]),
                                  inner, max_size=5), max_leaves=20).map(lambda d: json.dumps(d).encode())))
def test_no_payload_on_any_topic_makes_the_model_raise(topic, payload):
    fleet = Fleet()
    fleet.apply(topic, payload, 1.0)  # counted or used; never raised


# --- revocations from gossiped device.revoke vertices ---------------------------------------------


def _revoke_vertex(signer: Identity, device: Identity, reason: str = "stolen"):
    from ledger.vertex import sign

    return sign(signer, "device.revoke", 5, [b"\x01" * 32], {"device": device.public_key, "reason": reason})


def _fleet_knowing(gateway: Identity) -> Fleet:
    fleet = Fleet()
    fleet.apply(f"starling/{gateway.id}/status", b'{"state": "running", "name": "gw-a"}', 1.0)
    return fleet


def test_the_vertex_domain_and_revoke_mark_match_the_ledgers_encoding():
    from ledger.vertex import DOMAIN

    gateway, device = Identity.generate(), Identity.generate()
    assert VERTEX_DOMAIN == DOMAIN
    assert REVOKE_MARK in _revoke_vertex(gateway, device).encode()


def test_a_revocation_signed_by_a_known_gateway_marks_its_device_revoked():
    gateway, device = Identity.generate(), Identity.generate()
    fleet = _fleet_knowing(gateway)
    assert fleet.apply(f"starling/ledger/vertex/{gateway.id}", _revoke_vertex(gateway, device).encode(), 2.0) is None
    revocation = fleet.revocations[device.id]
    assert (revocation.reason, revocation.by) == ("stolen", gateway.id)


def test_a_revocation_from_a_stranger_or_with_a_broken_signature_is_refused():
    gateway, stranger, device = Identity.generate(), Identity.generate(), Identity.generate()
    fleet = _fleet_knowing(gateway)
    assert fleet.apply(f"starling/ledger/vertex/{stranger.id}", _revoke_vertex(stranger, device).encode(),
                       2.0) == "unknown_creator"
    doc = cbor.loads(_revoke_vertex(gateway, device).encode())
    doc["body"]["reason"] = "forged"  # same length class: still canonical, signature no longer matches
    assert fleet.apply(f"starling/ledger/vertex/{gateway.id}", cbor.dumps(doc), 2.0) == "bad_signature"
    assert fleet.apply(f"starling/ledger/vertex/{stranger.id}", _revoke_vertex(gateway, device).encode(),
                       2.0) == "bad_vertex"  # the topic names another creator
    assert fleet.revocations == {}


def test_the_gateways_own_list_of_revoked_devices_marks_them_revoked():
    fleet = Fleet()
    device = "d" * 32
    _status(fleet, {"state": "running", "revoked": {"count": 1, "devices": [device]}, "time": 1500.0})
    assert fleet.revocations[device].by == GW and fleet.revocations[device].time == 1500.0


def test_a_device_shows_the_name_it_enrolled_with():
    from dashboard.view import snapshot

    fleet = Fleet()
    device = "e" * 32
    fleet.apply(f"starling/{GW}/status/device/{device}", json.dumps(
        {"device": device, "name": "pole-17 <b>", "last_seen": 1.0, "online": True, "accepted": 2,
         "rejected": {}}).encode(), 2.0)
    [row] = snapshot(fleet, 3.0)["devices"]
    assert row["name"] == "pole-17 <b>"  # shown as text by the page, never as markup


def test_an_idle_continuous_gateway_shows_its_model_version_lineage_and_next_round():
    fleet = Fleet()
    doc = dict(last_status(), state="idle", num_rounds=None, next_round_at=2030.0, time=2000.0,
               lineage={"id": 2, "model": "ab" * 32, "version": 41, "round": 17})
    assert _status(fleet, doc) is None
    gw = fleet.gateways[GW]
    assert (gw.state, gw.num_rounds, gw.model_version, gw.lineage, gw.next_round_at) == ("idle", None, 41, 2, 2030.0)
    assert _status(fleet, dict(doc, lineage="v41")) == "bad_field"  # refused, counted, nothing half-applied
    assert fleet.gateways[GW].model_version == 41
