"""The alert rules, each from the status shapes that trigger it, and the healthy run that triggers none."""

from __future__ import annotations

import json

from dashboard_helpers import gateway_id, last_status

from dashboard import alerts
from dashboard.fleet import Fleet
from protocol import cbor

GW = gateway_id()
STATUS = f"starling/{GW}/status"


def _rules(fleet: Fleet, now: float) -> list[str]:
    return [a.rule for a in alerts.evaluate(fleet, now)]


def _status(fleet: Fleet, now: float, **fields) -> None:
    assert fleet.apply(STATUS, json.dumps(dict(last_status(), **fields)).encode(), now) is None


def test_a_healthy_finished_run_raises_no_alert(replayed):
    assert alerts.evaluate(replayed, 2000.0) == []


def test_every_rule_is_documented_and_named_as_it_reports():
    for rule in alerts.RULES:
        assert rule.__doc__ and len(rule.__doc__) > 80, rule.__name__


def test_a_gateway_whose_last_will_fired_is_a_critical_offline_alert(replayed):
    replayed.apply(STATUS, b'{"state": "offline"}', 3000.0)
    [alert] = alerts.evaluate(replayed, 3010.0)
    assert (alert.rule, alert.severity, alert.subject, alert.since) == ("gateway_offline", "critical", GW, 3000.0)
    assert "gw-1" in alert.message


def test_a_failed_gateway_is_a_critical_alert(replayed):
    _status(replayed, 3000.0, state="failed")
    assert _rules(replayed, 3000.0) == ["gateway_failed"]


def test_an_equivocator_reported_by_the_ledger_is_one_critical_alert_per_creator(replayed):
    cheat = "e" * 32
    vv = dict(cbor.loads(cbor.dumps({"height": 12, "final": 10, "lag": 2, "equivocators": [cheat],
                                     "time": 9e9})))
    assert replayed.apply(f"starling/ledger/vv/{GW}", cbor.dumps(vv), 3000.0) is None
    [alert] = alerts.evaluate(replayed, 3000.0)
    assert (alert.rule, alert.severity, alert.subject) == ("equivocation", "critical", cheat)


def test_a_gateway_flagged_by_mismatch_evidence_is_one_critical_alert_and_shows_on_its_view(replayed):
    cheat = "c" * 32
    city = {"every": 3, "rule": "weighted", "epochs": [{"epoch": 2, "model": "ab" * 32}],
            "flagged": {cheat: {"vertex": "00" * 32, "kind": "aggregate", "reason": "differs", "accusers": [GW]}}}
    _status(replayed, 3000.0, city=city)
    [alert] = alerts.evaluate(replayed, 3000.0)
    assert (alert.rule, alert.severity, alert.subject, alert.gateway) == ("mismatch", "critical", cheat, GW)
    view = replayed.gateways[GW]
    assert (view.flagged, view.city_epoch, view.city_model) == ([cheat], 2, "ab" * 32)
    # A malformed city section is refused whole, and changes nothing.
    assert replayed.apply(STATUS, json.dumps(dict(last_status(), city={"flagged": [cheat]})).encode(), 3001.0)
    assert replayed.gateways[GW].flagged == [cheat]
    _status(replayed, 3002.0, city=None)  # a gateway without the tier (or restarted without it)
    assert alerts.evaluate(replayed, 3002.0) == []


def test_replies_refused_as_revoked_raise_a_revocation_warning(replayed):
    device = "d" * 32
    replayed.apply(f"starling/{GW}/status/device/{device}", b'{"accepted": 4, "rejected": {"revoked": 2}}', 3000.0)
    _status(replayed, 3001.0, rejections={"revoked": 2})
    found = [(a.rule, a.severity, a.subject) for a in alerts.evaluate(replayed, 3001.0)]
    assert ("revocation", "warning", device) in found and ("revocation", "warning", GW) in found


def test_a_burst_of_refused_replies_is_a_spike_that_ages_out_of_its_window():
    fleet = Fleet()
    fleet.set_connection(True, 0.0)
    _status(fleet, 100.0, rejections={})
    _status(fleet, 110.0, rejections={"malformed": 2})
    assert _rules(fleet, 110.0) == []  # under the threshold
    _status(fleet, 120.0, rejections={"malformed": 3, "replay": 1})
    [alert] = alerts.evaluate(fleet, 121.0)
    assert (alert.rule, alert.severity, alert.since) == ("rejection_spike", "warning", 110.0)
    assert "4 replies" in alert.message and "malformed 3" in alert.message
    assert _rules(fleet, 120.0 + alerts.SPIKE_WINDOW_S + 1) == []  # nothing new since: it ages out


def test_refusals_made_before_the_dashboard_started_are_no_spike():
    fleet = Fleet()
    fleet.set_connection(True, 0.0)
    _status(fleet, 100.0, rejections={"malformed": 500})  # the retained status: history, not news
    _status(fleet, 101.0, rejections={"malformed": 500})
    assert _rules(fleet, 101.0) == []


def test_a_ledger_not_final_for_too_long_is_a_finality_warning(replayed):
    ledger = {"height": 30, "final": 20, "lag": 10, "oldest_pending_s": alerts.FINALITY_STALL_S + 1, "time": 9e9}
    _status(replayed, 3000.0, ledger=ledger)
    assert _rules(replayed, 3000.0) == ["finality_stalled"]


def test_losing_the_broker_is_a_critical_alert_listed_first(replayed):
    replayed.apply(STATUS, b'{"state": "offline"}', 3000.0)
    replayed.set_connection(False, 3005.0, "disconnected: keepalive timeout")
    found = alerts.evaluate(replayed, 3010.0)
    assert [a.rule for a in found] == ["dashboard_disconnected", "gateway_offline"]
    assert found[0].since == 3005.0 and "keepalive" in found[0].message
