"""The gateway's devices: who is enrolled, revoked and online, and how a device enrolls.

`DeviceRegistry` is the one owner of the device sets. The gateway's worker
thread changes them (enrollments, revocations from the ledger, online flags);
the round engine reads which devices are online. `Enrollment` handles a
device's signed enrollment request under the configured policy:

    voucher    the request carries an operator-signed voucher for the device's key
    allowlist  the device's key is on the configured allow-list
    open       anyone (the emulator only)

An admitted device gets a `device.enroll` vertex on the ledger, carrying the
evidence it was admitted on (the voucher under "voucher", else b""), and a
signed receipt; a refused one is counted by reason (`no_voucher`,
`bad_voucher`, `not_allowed`, `revoked`, or a decoding reason) and, if its
signature verified, gets a signed negative receipt.

A device another gateway enrolled is admitted here only if this gateway's
policy accepts that enrollment's evidence (`gateway.ledger_keeper`); one
refused that way (its replies get `unknown_device`) enrolls here like a new
device, presenting its voucher, and this gateway then writes its own
`device.enroll` vertex.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from protocol import envelope, schemas, topics
from protocol.errors import ProtocolError
from protocol.keys import identity_id, node_id
from protocol.logs import event
from protocol.vouchers import Voucher

from .outbox import Outbox

log = logging.getLogger("starling.gateway.devices")
MAX_ENROLL_BYTES = 4096


class DeviceRegistry:
    """Enrolled, revoked and online devices. `on_change(what, key)` ("enroll" / "revoke") keeps copies
    elsewhere (the ingest workers' key sets) current."""

    def __init__(self, on_change: Callable[[str, bytes], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._names: dict[bytes, str] = {}  # enrolled public key -> name
        self._by_node: dict[int, bytes] = {}  # Flower node id -> public key
        self._by_id: dict[str, bytes] = {}  # device id -> public key
        self._online: set[str] = set()
        self._revoked: set[bytes] = set()
        self._on_change = on_change

    # --- questions (any thread) ----------------------------------------------------------

    def is_enrolled(self, key: bytes) -> bool:
        return key in self._names

    def is_revoked(self, key: bytes) -> bool:
        return key in self._revoked

    def knows(self, device: str) -> bool:
        return device in self._by_id

    def name_of(self, device: str) -> str:
        key = self._by_id.get(device)
        return self._names.get(key, "") if key is not None else ""

    def is_online(self, device: str) -> bool:
        return device in self._online

    def online_nodes(self) -> dict[int, bytes]:
        """Flower node id -> public key of each enrolled device that is online now."""
        with self._lock:
            return {node_id(self._by_id[d]): self._by_id[d] for d in self._online if d in self._by_id}

    def key_of(self, node: int) -> bytes | None:
        return self._by_node.get(node)

    def counts(self) -> tuple[int, int]:
        """(enrolled, online)."""
        with self._lock:
            return len(self._names), len(self._online)

    def keys(self) -> tuple[list[bytes], list[bytes]]:
        """(enrolled keys, revoked keys): what a new ingest worker starts from."""
        with self._lock:
            return list(self._names), list(self._revoked)

    def revoked_ids(self) -> list[str]:
        with self._lock:
            return sorted(identity_id(key) for key in self._revoked)

    # --- changes (the worker thread) --------------------------------------------------------

    def admit(self, key: bytes, name: str) -> bool:
        """Enroll a device; False if it was enrolled already."""
        with self._lock:
            if key in self._names:
                return False
            self._names[key] = name
            self._by_node[node_id(key)] = key
            self._by_id[identity_id(key)] = key
        if self._on_change is not None:
            self._on_change("enroll", key)
        return True

    def revoke(self, key: bytes) -> bool:
        """Forget a revoked device for good: its next reply is refused as `revoked`. False if known already."""
        with self._lock:
            if key in self._revoked:
                return False
            self._revoked.add(key)
            self._names.pop(key, None)
            self._by_node.pop(node_id(key), None)
            device = identity_id(key)
            self._by_id.pop(device, None)
            self._online.discard(device)
        if self._on_change is not None:
            self._on_change("revoke", key)
        return True

    def set_online(self, device: str, online: bool) -> bool:
        """Note an enrolled device's liveness; False for a stranger (whose liveness is nobody's business)."""
        with self._lock:
            if device not in self._by_id:
                return False
            (self._online.add if online else self._online.discard)(device)
        return True


class Enrollment:
    """A device's signed enrollment request, decided under the configured policy."""

    def __init__(self, gateway_id: str, policy: str, allowlist: tuple[bytes, ...], operator_keys: tuple[bytes, ...],
                 registry: DeviceRegistry, outbox: Outbox, write: Callable[[bytes, str, str, bytes], object]) -> None:
        """`write(key, name, policy, evidence)` puts the `device.enroll` vertex on the ledger."""
        self._gateway_id = gateway_id
        self._policy = policy
        self._allowlist = allowlist
        self._operator_keys = operator_keys
        self._registry = registry
        self._outbox = outbox
        self._write = write
        self.rejections: dict[str, int] = {}

    def handle(self, topic: str, payload: bytes) -> None:
        device = topics.device_of(topic)

        def refuse(reason: str, detail: str, env: envelope.Envelope | None = None) -> None:
            self.rejections[reason] = self.rejections.get(reason, 0) + 1
            event(log, "enroll.rejected", logging.WARNING, device=device, reason=reason, detail=detail)
            if env is not None:  # only a verified sender gets a signed answer
                self._outbox.enroll_receipt(env.ctx.sender_id, False, reason)

        try:
            env = envelope.decode(payload, max_bytes=MAX_ENROLL_BYTES)
            if env.type != "enroll":
                raise schemas.SchemaError(f"a {env.type!r} message on an enroll topic")
            request = schemas.EnrollRequest.from_body(env.body)
        except ProtocolError as exc:
            return refuse(exc.reason, exc.detail)
        if env.ctx.sender_id != device:
            return refuse("topic_mismatch", "signed by another key")
        if env.ctx.gateway != self._gateway_id:
            return refuse("wrong_gateway", env.ctx.gateway)
        try:
            env.verify()
        except ProtocolError as exc:
            return refuse(exc.reason, exc.detail)
        key = env.ctx.sender
        if self._registry.is_revoked(key):
            return refuse("revoked", "this key was revoked; a device needs a new key", env)
        if self._policy == "allowlist" and key not in self._allowlist:
            return refuse("not_allowed", "key is not on the allow-list", env)
        if self._policy == "voucher" and not self._registry.is_enrolled(key):
            if not request.voucher:
                return refuse("no_voucher", "the voucher policy needs an operator's voucher", env)
            try:
                Voucher.decode(request.voucher).check(self._operator_keys, key, self._gateway_id)
            except ProtocolError as exc:
                return refuse(exc.reason, exc.detail, env)
        if not self._registry.is_enrolled(key):
            evidence = request.voucher if self._policy == "voucher" else b""  # an allow-list entry is the key
            self._write(key, request.name, self._policy, evidence)
            self._registry.admit(key, request.name)
            event(log, "enroll.accepted", device=device, name=request.name, policy=self._policy)
        # It is connected: it just sent this request. Also when it was enrolled already (by this gateway's
        # ledger, say, for a device that re-homed here): its "online" flag may have arrived before the
        # enrollment did, and was dropped then as a stranger's.
        self._registry.set_online(device, True)
        self._outbox.enroll_receipt(device, True, "")

