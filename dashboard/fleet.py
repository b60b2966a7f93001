"""The fleet as the dashboard sees it: a bounded in-memory model built from MQTT status messages.

Every message goes through `Fleet.apply(topic, payload, now)`, which never
raises: whatever is not what a gateway publishes is counted in `malformed`
by reason and otherwise ignored, so one bad publisher cannot blank the page.

What is read (the shapes are the README's "Status topics" and ledger/gossip.py):

    starling/<gw>/status              gateway JSON; `{"state": "offline"}` alone is its MQTT last will
    starling/<gw>/status/device/<id>  per-device JSON: last seen, online, accepted, rejected and skipped by reason
    starling/ledger/vv/<gw>           CBOR, about every second with gossip on: height, finality, peers,
                                      equivocators (fresher than the ledger part of the status)
    starling/ledger/vertex/<gw>       gossiped vertices: a `device.revoke` one, signed by a gateway whose
                                      status we have seen, marks its device revoked

Kept on the dashboard's side, because the status only carries the present:
the per-round series survives a gateway restart that shortens its history
(a new run resets it), and the gateway's total of refused replies is
sampled on arrival so alert rules can see how fast it grows.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from protocol import cbor
from protocol.errors import ProtocolError
from protocol.fields import is_finite_number, is_int
from protocol.keys import identity_id, verify

ROOT = "starling"
LEDGER_ROOT = "starling/ledger"
ID_LENGTH = 32  # protocol.keys.identity_id: 32 lowercase hex characters
MAX_STATUS_BYTES = 8 * 1024 * 1024  # a gateway status carries its whole round history
MAX_DEVICE_STATUS_BYTES = 64 * 1024
MAX_VV_BYTES = 64 * 1024  # ledger.gossip.MAX_CONTROL_BYTES
MAX_VERTEX_BYTES = 4 * 1024 * 1024  # ledger.vertex.MAX_VERTEX_BYTES
MAX_GATEWAYS = 512
MAX_DEVICES = 50_000
MAX_ROUNDS_KEPT = 5_000
MAX_REASONS = 64  # distinct reasons in one counts table
MAX_TEXT = 128
ENDED_STATES = frozenset({"done", "stopped", "failed"})
REJECTION_SAMPLES = 512  # (time, total refused) per gateway, for the spike rule
# ledger.vertex.DOMAIN: what a vertex signature is prefixed with (tests check the two stay equal).
VERTEX_DOMAIN = b"starling/vertex/v1\x00"
# A canonical vertex of kind device.revoke holds these bytes (text "kind", then text "device.revoke"):
# anything without them is skipped before decoding, so multi-megabyte `updates` vertices cost a scan.
REVOKE_MARK = b"\x64kind\x6ddevice.revoke"
MAX_STATUS_REVOKED = 1000  # as many revoked ids as a gateway lists in its status


class Malformed(ValueError):
    """A message that is not what a gateway publishes; `reason` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RoundPoint:
    """One round of a gateway's history (its `history` records)."""

    round: int
    accuracy: float | None
    loss: float | None
    participants: int
    rejected: int
    skipped: int


@dataclass
class LedgerView:
    """A gateway's ledger as last reported, by its status or by its gossip version vector."""

    height: int | None = None
    final: int | None = None
    lag: int | None = None  # vertices not final yet
    oldest_pending_s: float | None = None
    pending: int | None = None  # vertices waiting for parents
    peers: list[str] = field(default_factory=list)
    equivocators: list[str] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    time: float = 0.0  # the gateway's clock when it reported this
    source: str = "status"  # or "gossip"


@dataclass
class GatewayView:
    id: str
    has_status: bool = False  # a vv or vertex may name a gateway before its status arrived
    name: str = ""
    state: str = "unknown"
    round: int | None = None
    num_rounds: int | None = None  # None: a gateway whose rounds go on until it is stopped
    model_version: int | None = None  # its current model release (its lineage's head)
    lineage: int | None = None  # which lineage of models (a new one after reset-model or a new model family)
    next_round_at: float | None = None  # while idle: when its next round starts (its clock)
    enrolled: int | None = None
    devices_online: int | None = None
    rejections: dict[str, int] = field(default_factory=dict)
    ledger: LedgerView | None = None
    flagged: list[str] = field(default_factory=list)  # gateways it holds mismatch evidence against (city tier)
    city_epoch: int | None = None  # its newest city epoch merged
    city_model: str | None = None  # ... and that epoch's model digest
    rounds: dict[int, RoundPoint] = field(default_factory=dict)
    rejection_samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=REJECTION_SAMPLES))
    status_time: float | None = None  # the gateway's clock
    received: float | None = None  # ours
    state_since: float | None = None  # ours: when `state` last changed

    @property
    def online(self) -> bool | None:
        """True while it runs; False once the broker delivered its last will (it vanished without a
        goodbye); None once its run ended (`done`, `stopped`, `failed`: it disconnects cleanly, no will)."""
        if self.state == "offline":
            return False
        return None if self.state in ENDED_STATES else True

    @property
    def rejected_total(self) -> int:
        return sum(self.rejections.values())

    def series(self) -> list[RoundPoint]:
        return [self.rounds[r] for r in sorted(self.rounds)]


@dataclass
class DeviceView:
    gateway: str
    device: str
    name: str = ""  # as it enrolled (gateway status), free text shown escaped
    last_seen: float | None = None
    online: bool | None = None
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    received: float | None = None


@dataclass(frozen=True)
class Revocation:
    device: str
    reason: str
    by: str  # the gateway that signed the device.revoke vertex
    time: float  # the vertex's own time


class Fleet:
    """Gateways, devices, revocations and counters; thread-safe (paho's thread writes, HTTP threads read).

    Readers take `lock` (or wait on `changed`) and read the fields; `version` grows with every change.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.version = 0
        self.gateways: dict[str, GatewayView] = {}
        self.devices: dict[tuple[str, str], DeviceView] = {}
        self.revocations: dict[str, Revocation] = {}
        self.malformed: dict[str, int] = {}
        self.messages = 0
        self.connected = False
        self.connection_since: float | None = None
        self.connection_detail = "not connected yet"

    # --- input -------------------------------------------------------------------------

    def apply(self, topic: str, payload: bytes, now: float) -> str | None:
        """Take one message; return None if it was used or ignorable, else the malformed reason it was counted under."""
        with self.lock:
            self.messages += 1
            try:
                self._route(topic, bytes(payload), now)
            except Malformed as exc:
                reason = exc.reason
            except Exception as exc:  # a gap in the checks below: still only a count, never a dead feed
                reason = f"unexpected_{type(exc).__name__}"
            else:
                self._touch()
                return None
            self.malformed[reason] = self.malformed.get(reason, 0) + 1
            self._touch()
            return reason

    def set_connection(self, connected: bool, now: float, detail: str = "") -> None:
        with self.lock:
            if connected != self.connected or self.connection_since is None:
                self.connection_since = now
            self.connected, self.connection_detail = connected, detail
            self._touch()

    def _touch(self) -> None:
        self.version += 1
        self.changed.notify_all()

    def _route(self, topic: str, payload: bytes, now: float) -> None:
        parts = topic.split("/")
        if topic.startswith(LEDGER_ROOT + "/"):
            if len(parts) == 4 and parts[2] == "vv":
                self._apply_vv(_id(parts[3]), payload)
            elif len(parts) == 4 and parts[2] == "vertex":
                self._apply_vertex(_id(parts[3]), payload)
            return  # other gossip traffic is none of the dashboard's business
        if parts[0] != ROOT or len(parts) < 3 or parts[2] != "status":
            raise Malformed("unexpected_topic", topic[:200])
        if len(parts) == 3:
            self._apply_status(_id(parts[1]), payload, now)
        elif len(parts) == 5 and parts[3] == "device":
            self._apply_device(_id(parts[1]), _id(parts[4]), payload, now)
        else:
            raise Malformed("unexpected_topic", topic[:200])

    def _gateway(self, gateway_id: str) -> GatewayView:
        view = self.gateways.get(gateway_id)
        if view is None:
            if len(self.gateways) >= MAX_GATEWAYS:
                raise Malformed("over_capacity", "too many gateways")
            view = self.gateways[gateway_id] = GatewayView(gateway_id)
        return view

    def _apply_status(self, gateway_id: str, payload: bytes, now: float) -> None:
        doc = _json_object(payload, MAX_STATUS_BYTES)
        if doc.get("gateway", gateway_id) != gateway_id:
            raise Malformed("gateway_mismatch", "the status names another gateway than its topic")
        # Check everything before changing anything: a bad message leaves no half-applied trace.
        state = _text(doc, "state", "unknown")
        name = _text(doc, "name", None)
        round_ = _int(doc, "round")
        num_rounds = _int(doc, "num_rounds")
        lineage = doc.get("lineage")
        if lineage is not None and not isinstance(lineage, dict):
            raise Malformed("bad_field", "lineage must be an object")
        model_version, lineage_id = (_int(lineage, "version"), _int(lineage, "id")) if lineage else (None, None)
        next_round_at = _number(doc, "next_round_at")
        enrolled = _int(doc, "enrolled")
        online = _int(doc, "online")
        rejections = _counts(doc.get("rejections"), "rejections") if "rejections" in doc else None
        ledger = _ledger(doc["ledger"], "status") if doc.get("ledger") is not None else None
        flagged, city_epoch, city_model = _city(doc.get("city"))
        history = _history(doc["history"]) if "history" in doc else None
        revoked = _revoked(doc["revoked"]) if "revoked" in doc else []
        status_time = _number(doc, "time")
        if ledger is not None and status_time is not None and not ledger.time:
            ledger.time = status_time
        view = self._gateway(gateway_id)
        view.has_status = True
        if state != view.state or view.state_since is None:
            view.state_since = now
        view.state, view.received = state, now
        if set(doc) <= {"state"}:  # the last will: nothing else is known to have changed
            return
        view.name = name if name is not None else view.name
        view.round, view.num_rounds = round_, num_rounds
        view.model_version, view.lineage, view.next_round_at = model_version, lineage_id, next_round_at
        view.enrolled, view.devices_online = enrolled, online
        view.flagged, view.city_epoch, view.city_model = flagged, city_epoch, city_model
        view.status_time = status_time
        if ledger is not None and (view.ledger is None or ledger.time >= view.ledger.time):
            view.ledger = ledger
        if history is not None:
            if history and view.rounds and max(p.round for p in history) < max(view.rounds):
                view.rounds.clear()  # a new run started from round 0: its series is another one
            for point in history:
                view.rounds[point.round] = point
            while len(view.rounds) > MAX_ROUNDS_KEPT:
                del view.rounds[min(view.rounds)]
        for device_id in revoked:  # the gateway's own list: revocations made before the dashboard started too
            if device_id not in self.revocations:
                self.revocations[device_id] = Revocation(device_id, "revoked", gateway_id, status_time or now)
        if rejections is not None:
            view.rejections = rejections
            total = sum(rejections.values())
            samples = view.rejection_samples
            if samples and total < samples[-1][1]:
                samples.clear()  # the gateway restarted: its counters started again from zero
            samples.append((now, total))

    def _apply_device(self, gateway_id: str, device_id: str, payload: bytes, now: float) -> None:
        doc = _json_object(payload, MAX_DEVICE_STATUS_BYTES)
        if doc.get("device", device_id) != device_id:
            raise Malformed("device_mismatch", "the device status names another device than its topic")
        last_seen = _number(doc, "last_seen")
        online = doc.get("online")
        if online is not None and not isinstance(online, bool):
            raise Malformed("bad_field", "online must be true or false")
        accepted = _int(doc, "accepted") or 0
        rejected = _counts(doc.get("rejected", {}), "rejected")
        skipped = _counts(doc.get("skipped", {}), "skipped")
        name = _text(doc, "name", "")
        key = (gateway_id, device_id)
        view = self.devices.get(key)
        if view is None:
            if len(self.devices) >= MAX_DEVICES:
                raise Malformed("over_capacity", "too many devices")
            self._gateway(gateway_id)  # a device status may arrive before its gateway's
            view = self.devices[key] = DeviceView(gateway_id, device_id)
        view.last_seen, view.online, view.accepted = last_seen, online, accepted
        view.rejected, view.skipped, view.received = rejected, skipped, now
        view.name = name

    def _apply_vv(self, gateway_id: str, payload: bytes) -> None:
        try:
            doc = cbor.loads(payload, max_bytes=MAX_VV_BYTES)
        except ProtocolError as exc:
            raise Malformed("bad_cbor", str(exc)) from exc
        ledger = _ledger(doc, "gossip")
        view = self._gateway(gateway_id)
        if view.ledger is None or ledger.time >= view.ledger.time:
            view.ledger = ledger

    def _apply_vertex(self, creator_id: str, payload: bytes) -> None:
        if REVOKE_MARK not in payload:
            return  # not a revocation: updates, aggregates, enrollments ... are the ledger's business
        try:
            doc = cbor.loads(payload, max_bytes=MAX_VERTEX_BYTES)
        except ProtocolError as exc:
            raise Malformed("bad_cbor", str(exc)) from exc
        if not isinstance(doc, dict) or doc.get("kind") != "device.revoke":
            return
        creator, sig, body = doc.get("creator"), doc.get("sig"), doc.get("body")
        if not isinstance(creator, bytes) or not isinstance(sig, bytes) or not isinstance(body, dict):
            raise Malformed("bad_vertex", "creator, sig or body missing")
        if identity_id(creator) != creator_id:
            raise Malformed("bad_vertex", "creator does not match the topic")
        known = self.gateways.get(creator_id)
        if known is None or not known.has_status:
            raise Malformed("unknown_creator", "a revocation signed by no gateway we know")
        unsigned = cbor.dumps({k: v for k, v in doc.items() if k != "sig"})
        try:
            verify(creator, VERTEX_DOMAIN + unsigned, sig)
        except ProtocolError as exc:
            raise Malformed("bad_signature", str(exc)) from exc
        device, reason, when = body.get("device"), body.get("reason"), doc.get("time")
        if not isinstance(device, bytes) or not isinstance(reason, str) or not is_finite_number(when):
            raise Malformed("bad_vertex", "device.revoke body")
        device_id = identity_id(device)
        if device_id not in self.revocations:
            self.revocations[device_id] = Revocation(device_id, reason[:MAX_TEXT], creator_id, float(when))


# --- field checks: each raises Malformed naming the field --------------------------------


def _id(text: str) -> str:
    if len(text) != ID_LENGTH or any(c not in "0123456789abcdef" for c in text):
        raise Malformed("bad_topic", f"{text[:40]!r} is not an id")
    return text


def _revoked(value: Any) -> list[str]:
    """The status's `revoked` section: {"count": n, "devices": [ids]} -> the ids."""
    devices = value.get("devices", []) if isinstance(value, dict) else None
    if not isinstance(devices, list) or not all(
            isinstance(d, str) and len(d) == ID_LENGTH and all(c in "0123456789abcdef" for c in d) for d in devices):
        raise Malformed("bad_field", "revoked")
    return devices[:MAX_STATUS_REVOKED]


def _json_object(payload: bytes, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise Malformed("too_large", f"{len(payload)} bytes")
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise Malformed("not_json", str(exc)[:200]) from exc
    if not isinstance(doc, dict):
        raise Malformed("not_an_object", type(doc).__name__)
    return doc


def _number(doc: dict[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if not is_finite_number(value):  # (a JSON integer beyond the float range too)
        raise Malformed("bad_field", f"{key} must be a finite number")
    return float(value)


def _int(doc: dict[str, Any], key: str) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise Malformed("bad_field", f"{key} must be a non-negative integer")
    return value


def _text(doc: dict[str, Any], key: str, default: str | None) -> str | None:
    value = doc.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise Malformed("bad_field", f"{key} must be text of at most {MAX_TEXT} characters")
    return value


def _counts(value: Any, key: str) -> dict[str, int]:
    if not isinstance(value, dict) or len(value) > MAX_REASONS:
        raise Malformed("bad_field", f"{key} must be a table of at most {MAX_REASONS} counts")
    for reason, count in value.items():
        if not isinstance(reason, str) or len(reason) > MAX_TEXT:
            raise Malformed("bad_field", f"{key}: a reason must be short text")
        if not is_int(count) or count < 0:
            raise Malformed("bad_field", f"{key}[{reason[:40]}] must be a non-negative integer")
    return dict(value)


def _ids(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or len(value) > MAX_GATEWAYS:
        raise Malformed("bad_field", f"{key} must be a list of ids")
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_TEXT:
            raise Malformed("bad_field", f"{key} must be a list of ids")
    return list(value)


def _city(doc: Any) -> tuple[list[str], int | None, str | None]:
    """The status's `city` section (gateway/city.py): the gateways flagged by mismatch evidence, and the newest
    epoch merged with its model digest. None (no city tier): nothing."""
    if doc is None:
        return [], None, None
    if not isinstance(doc, dict):
        raise Malformed("bad_field", "city must be an object")
    flagged = doc.get("flagged", {})
    if not isinstance(flagged, dict):
        raise Malformed("bad_field", "city.flagged must be an object")
    epochs = doc.get("epochs", [])
    if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
        raise Malformed("bad_field", "city.epochs must be a list of objects")
    last = epochs[-1] if epochs else {}
    model = last.get("model")
    if model is not None and (not isinstance(model, str) or len(model) > MAX_TEXT):
        raise Malformed("bad_field", "city.epochs[].model must be a digest")
    return _ids(list(flagged), "city.flagged"), _int(last, "epoch") if last else None, model


def _ledger(doc: Any, source: str) -> LedgerView:
    if not isinstance(doc, dict):
        raise Malformed("bad_field", "ledger must be an object")
    oldest = _number(doc, "oldest_pending_s")
    return LedgerView(
        height=_int(doc, "height"), final=_int(doc, "final"), lag=_int(doc, "lag"), oldest_pending_s=oldest,
        pending=_int(doc, "pending"), peers=_ids(doc.get("peers", []), "ledger.peers"),
        equivocators=_ids(doc.get("equivocators", []), "ledger.equivocators"),
        refused=_counts(doc.get("refused", {}), "ledger.refused"), time=_number(doc, "time") or 0.0, source=source,
    )


def _history(value: Any) -> list[RoundPoint]:
    if not isinstance(value, list) or len(value) > 10 * MAX_ROUNDS_KEPT:
        raise Malformed("bad_field", "history must be a list of round records")
    points = []
    for record in value:
        if not isinstance(record, dict) or _int(record, "round") is None:
            raise Malformed("bad_field", "a history record needs a round")
        points.append(RoundPoint(
            round=record["round"], accuracy=_number(record, "accuracy"), loss=_number(record, "loss"),
            participants=_int(record, "participants") or 0, rejected=_int(record, "rejected") or 0,
            skipped=_int(record, "skipped") or 0,
        ))
    return points
