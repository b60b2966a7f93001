"""What the page shows, as one JSON document: `snapshot(fleet, now)`.

The page renders this document and nothing else, so `/api/fleet` is also
what scripts and tests read. Every text in it that came from the network is
plain data the page sets with `textContent`; only `accuracy_svg` is markup,
and chart.py builds it from numbers.
"""

from __future__ import annotations

from typing import Any

from . import alerts
from .chart import accuracy_svg
from .fleet import DeviceView, Fleet, GatewayView

MAX_DEVICE_ROWS = 1000  # the rest are counted, not listed; troubled devices are listed first


def _gateway(view: GatewayView) -> dict[str, Any]:
    series = view.series()
    evaluated = [(p.round, p.accuracy) for p in series if p.accuracy is not None]
    trained = [p for p in series if p.participants]
    ledger = view.ledger
    return {
        "id": view.id,
        "name": view.name,
        "state": view.state,
        "online": view.online,
        "round": view.round,
        "num_rounds": view.num_rounds,
        "model_version": view.model_version,
        "lineage": view.lineage,
        "next_round_at": view.next_round_at,
        "enrolled": view.enrolled,
        "devices_online": view.devices_online,
        "participants": trained[-1].participants if trained else None,
        "accuracy": evaluated[-1][1] if evaluated else None,
        "accuracy_series": evaluated,
        "accuracy_svg": accuracy_svg(evaluated),
        "rejections": dict(sorted(view.rejections.items(), key=lambda kv: -kv[1])),
        "rejected_total": view.rejected_total,
        "ledger": None if ledger is None else {
            "height": ledger.height, "final": ledger.final, "lag": ledger.lag,
            "oldest_pending_s": ledger.oldest_pending_s, "pending": ledger.pending, "peers": list(ledger.peers),
            "equivocators": list(ledger.equivocators), "source": ledger.source,
        },
        "flagged": list(view.flagged),  # gateways it holds mismatch evidence against (the city tier)
        "city_epoch": view.city_epoch,
        "city_model": view.city_model,
        "status_time": view.status_time,
        "received": view.received,
    }


def _device(view: DeviceView, fleet: Fleet) -> dict[str, Any]:
    revocation = fleet.revocations.get(view.device)
    revoked = revocation.reason if revocation is not None else ("revoked" if view.rejected.get("revoked") else None)
    return {
        "gateway": view.gateway,
        "device": view.device,
        "name": view.name,
        "last_seen": view.last_seen,
        "online": view.online,
        "accepted": view.accepted,
        "rejected": dict(view.rejected),
        "rejected_total": sum(view.rejected.values()),
        "skipped": dict(view.skipped),
        "revoked": revoked,
    }


def _trouble(row: dict[str, Any]) -> tuple:
    return (row["revoked"] is None, row["rejected_total"] == 0, row["gateway"], row["device"])


def snapshot(fleet: Fleet, now: float) -> dict[str, Any]:
    """The whole page's data at `now`."""
    with fleet.lock:
        gateways = [_gateway(v) for v in sorted(fleet.gateways.values(), key=lambda g: (g.name, g.id)) if v.has_status]
        devices = sorted((_device(v, fleet) for v in fleet.devices.values()), key=_trouble)
        found = alerts.evaluate(fleet, now)
        doc = {
            "now": now,
            "version": fleet.version,
            "broker": {"connected": fleet.connected, "since": fleet.connection_since,
                       "detail": fleet.connection_detail},
            "messages": fleet.messages,
            "malformed": {"total": sum(fleet.malformed.values()), "by_reason": dict(fleet.malformed)},
            "gateways": gateways,
            "devices": devices[:MAX_DEVICE_ROWS],
            "devices_total": len(devices),
            "alerts": [a.to_json() for a in found],
        }
    return doc
