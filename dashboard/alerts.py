"""The alert rules: one function each, all listed in `RULES`, all evaluated on the fleet model.

A rule reads the model (`fleet.Fleet`, under its lock) and the time, and
yields the alerts that hold now; nothing is stored, so an alert goes away by
itself once its condition does. Thresholds are module constants, next to
the rule that uses them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .fleet import Fleet

CRITICAL, WARNING = "critical", "warning"
SPIKE_WINDOW_S = 120.0
SPIKE_MIN_REJECTIONS = 3
FINALITY_STALL_S = 300.0


@dataclass(frozen=True)
class Alert:
    rule: str  # the rule function's name
    severity: str  # CRITICAL or WARNING
    gateway: str | None  # the gateway it is about (or that reported it)
    subject: str  # what it is about: a gateway, device or creator id, or "broker"
    message: str
    since: float | None  # when the condition started, as far as the dashboard knows

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _name(fleet: Fleet, gateway_id: str) -> str:
    view = fleet.gateways.get(gateway_id)
    return view.name if view is not None and view.name else gateway_id[:8]


def equivocation(fleet: Fleet, now: float) -> Iterable[Alert]:
    """A gateway's ledger holds proof that some creator signed two different vertices with one sequence
    number (`ledger.equivocators` in its status or version vector). Critical: that creator's gateway
    is lying or its key is stolen; the operators must remove it from the gateway set."""
    reported: dict[str, list[str]] = {}
    for view in fleet.gateways.values():
        for creator in view.ledger.equivocators if view.ledger is not None else ():
            reported.setdefault(creator, []).append(view.id)
    for creator, witnesses in sorted(reported.items()):
        who = ", ".join(_name(fleet, w) for w in witnesses)
        yield Alert("equivocation", CRITICAL, witnesses[0], creator,
                    f"gateway {_name(fleet, creator)} equivocated (signed two vertices with one seq); seen by {who}",
                    None)


def mismatch(fleet: Fleet, now: float) -> Iterable[Alert]:
    """A gateway recomputed another's aggregate or city merge from its recorded inputs and got another model
    (`city.flagged` in its status: mismatch evidence on the ledger). Critical: that gateway's models stay out
    of the city merges until an operator looks and runs `starling-ledger clear-mismatch` (or removes it)."""
    reported: dict[str, list[str]] = {}
    for view in fleet.gateways.values():
        for accused in view.flagged:
            reported.setdefault(accused, []).append(view.id)
    for accused, witnesses in sorted(reported.items()):
        who = ", ".join(_name(fleet, w) for w in witnesses)
        yield Alert("mismatch", CRITICAL, witnesses[0], accused,
                    f"gateway {_name(fleet, accused)}'s aggregates do not recompute from their inputs; flagged by {who}",
                    None)


def revocation(fleet: Fleet, now: float) -> Iterable[Alert]:
    """A device's key was revoked. Seen three ways: a signed `device.revoke` vertex gossiped by a known
    gateway (with the reason), a device whose status counts replies refused as `revoked`, or a
    gateway that refused replies as `revoked` (without gossip, the only trace of a revocation made
    before the dashboard started). Warning: expected after an operator's decision, alarming otherwise."""
    for device, rev in sorted(fleet.revocations.items()):
        yield Alert("revocation", WARNING, rev.by, device,
                    f"device {device[:8]} revoked by {_name(fleet, rev.by)}: {rev.reason}", rev.time)
    for (gateway, device), view in sorted(fleet.devices.items()):
        if view.rejected.get("revoked") and device not in fleet.revocations:
            yield Alert("revocation", WARNING, gateway, device,
                        f"device {device[:8]} is revoked: {view.rejected['revoked']} replies refused", view.received)
    for view in sorted(fleet.gateways.values(), key=lambda g: g.id):
        count = view.rejections.get("revoked", 0)
        if count:
            yield Alert("revocation", WARNING, view.id, view.id,
                        f"{_name(fleet, view.id)} refused {count} replies from revoked devices", None)


def rejection_spike(fleet: Fleet, now: float) -> Iterable[Alert]:
    """A gateway refused at least SPIKE_MIN_REJECTIONS more replies within the last SPIKE_WINDOW_S
    seconds, measured between the status messages the dashboard received (so refusals made before it
    started do not count). Warning: garbage, replays, forged or stale replies are arriving; the reasons
    say which."""
    for view in sorted(fleet.gateways.values(), key=lambda g: g.id):
        samples = list(view.rejection_samples)
        if len(samples) < 2:
            continue
        start = now - SPIKE_WINDOW_S
        before = [s for s in samples if s[0] <= start]
        baseline = before[-1] if before else samples[0]
        latest = samples[-1]
        grown = latest[1] - baseline[1]
        if grown >= SPIKE_MIN_REJECTIONS and latest[0] >= start:
            since = next(t for t, total in samples if t >= baseline[0] and total > baseline[1])
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(view.rejections.items(), key=lambda kv: -kv[1]))
            yield Alert("rejection_spike", WARNING, view.id, view.id,
                        f"{_name(fleet, view.id)} refused {grown} replies in the last {SPIKE_WINDOW_S:.0f} s "
                        f"(since start: {reasons})", since)


def gateway_offline(fleet: Fleet, now: float) -> Iterable[Alert]:
    """The broker published a gateway's last will (`{"state": "offline"}`): its MQTT connection broke
    without a goodbye (crash, power, network). Critical: its devices get no tasks. A gateway that
    stopped cleanly says `done` or `stopped` instead and raises nothing."""
    for view in sorted(fleet.gateways.values(), key=lambda g: g.id):
        if view.has_status and view.online is False:
            yield Alert("gateway_offline", CRITICAL, view.id, view.id, f"gateway {_name(fleet, view.id)} is offline",
                        view.state_since)


def gateway_failed(fleet: Fleet, now: float) -> Iterable[Alert]:
    """A gateway's state is `failed`: its run ended on an error (too few devices, a strategy error);
    `result.json` in its state folder and its log say why. Critical."""
    for view in sorted(fleet.gateways.values(), key=lambda g: g.id):
        if view.state == "failed":
            yield Alert("gateway_failed", CRITICAL, view.id, view.id, f"gateway {_name(fleet, view.id)} failed",
                        view.state_since)


def finality_stalled(fleet: Fleet, now: float) -> Iterable[Alert]:
    """A gateway's oldest non-final ledger vertex is older than FINALITY_STALL_S: more than a third of
    the gateways are not acknowledging its vertices (partition, dead peers). Warning."""
    for view in sorted(fleet.gateways.values(), key=lambda g: g.id):
        ledger = view.ledger
        if ledger is not None and ledger.lag and (ledger.oldest_pending_s or 0.0) > FINALITY_STALL_S:
            yield Alert("finality_stalled", WARNING, view.id, view.id,
                        f"{_name(fleet, view.id)}: {ledger.lag} ledger vertices not final, oldest "
                        f"{ledger.oldest_pending_s:.0f} s", None)


def dashboard_disconnected(fleet: Fleet, now: float) -> Iterable[Alert]:
    """The dashboard itself has no broker connection: everything on the page is as of `since`.
    Critical, because every other rule is blind meanwhile."""
    if not fleet.connected:
        yield Alert("dashboard_disconnected", CRITICAL, None, "broker",
                    f"no broker connection ({fleet.connection_detail}); values may be stale", fleet.connection_since)


RULES: tuple[Callable[[Fleet, float], Iterable[Alert]], ...] = (
    dashboard_disconnected, gateway_offline, gateway_failed, equivocation, mismatch, revocation, rejection_spike,
    finality_stalled,
)


def evaluate(fleet: Fleet, now: float) -> list[Alert]:
    """Every rule's alerts, critical first."""
    with fleet.lock:
        found = [alert for rule in RULES for alert in rule(fleet, now)]
    return sorted(found, key=lambda a: a.severity != CRITICAL)  # stable: in RULES order within a severity
