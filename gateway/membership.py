"""What a gateway tells devices about its city: the root-signed membership vertices, retained.

    MembershipPublisher(ledger, gateway_id, connection.publish, stop).start()

A device trusts the city (the operator's root key), not one gateway, and
re-homes to another member when its gateway is gone (agent/roaming.py). To do
that it must know the members and their keys. The ledger holds every
statement the root key made about them (the genesis, `gateway.join`,
`gateway.leave`, `gateway.rotate`); this publishes exactly those vertices,
unchanged, as a `protocol.membership` document, retained on
`starling/<gw>/members`. Nothing here signs anything: the device checks the
root's signatures itself, so a gateway can only pass on what the operator
said (or hold some of it back).

It is republished when the member set on the ledger changes (a join, leave
or rotation gossiped in): a cheap look at the `gateways` table every
`interval_s`, and the scan for the vertices only on a change. Its own thread,
so the service needs one line to start it and nothing on its critical path.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from protocol import cbor, topics
from protocol.logs import event
from protocol.membership import KINDS, MAX_VERTICES, VERSION

log = logging.getLogger("starling.gateway.membership")
INTERVAL_S = 2.0


def document(ledger) -> bytes | None:
    """The membership document of `ledger` (a `ledger.store.Ledger`), or None before it has a genesis.

    Only vertices the root key created: the genesis of a lone gateway that is its own root is its own
    too, and then that gateway's other vertices are not membership statements anyway (the kinds filter)."""
    root = ledger.root
    if root is None:
        return None
    vertices = [v.encode() for v in ledger.vertices_of(*KINDS) if v.creator == root]
    if not vertices or len(vertices) > MAX_VERTICES:
        return None
    return cbor.dumps({"v": VERSION, "vertices": vertices})


class MembershipPublisher:
    """Publishes `document(ledger)` retained on `topics.members(gateway_id)` now and whenever the members change,
    until `stop` is set (the service's worker stop: set before the ledger closes)."""

    def __init__(self, ledger, gateway_id: str, publish: Callable[..., object], stop: threading.Event,
                 interval_s: float = INTERVAL_S) -> None:
        self._ledger = ledger
        self._topic = topics.members(gateway_id)
        self._publish = publish
        self._stop = stop
        self._interval_s = interval_s
        self._seen: tuple[bytes, ...] | None = None  # the member keys when last published
        self.published = 0

    def start(self) -> MembershipPublisher:
        threading.Thread(target=self._run, name="gateway-membership", daemon=True).start()
        return self

    def publish_if_changed(self) -> bool:
        """Publish the document if the member set changed since the last time; True if it did."""
        members = tuple(self._ledger.gateways())
        if members == self._seen:
            return False
        doc = document(self._ledger)
        if doc is None:
            return False
        self._publish(self._topic, doc, retain=True, counted=False)
        self._seen = members
        self.published += 1
        event(log, "gateway.members_published", members=len(members), bytes=len(doc))
        return True

    def _run(self) -> None:
        while True:
            try:
                self.publish_if_changed()
            except Exception as exc:  # noqa: BLE001 (devices can wait; the gateway must not stop for this)
                event(log, "gateway.members_failed", logging.WARNING, reason=f"{type(exc).__name__}: {exc}")
            if self._stop.wait(self._interval_s):
                return
