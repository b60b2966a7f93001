"""The gateway's ledger: opened, joined to the city's gossip, read and written.

    keeper = LedgerKeeper(path, identity, genesis, gossip)   # opens; gossip starts; membership checked
    keeper.sync(registry)          # enrollments and revocations made elsewhere reach the device registry
    keeper.record_updates(...)     # a round's accepted updates: one `updates` vertex
    keeper.record_lineage(...)     # where a model lineage starts
    keeper.record_aggregate(...)   # a round's new model: base -> output, from its inputs
    keeper.close()

What reaches the ledger from elsewhere (an operator's `starling-ledger enroll`
or `revoke` in another process, another gateway by gossip) is taken in by
`sync`, which the gateway's worker thread calls every second. `Ledger` is
thread-safe, so the round engine writes its records from its own thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ledger.errors import DuplicateUpdate, LedgerError
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol.keys import Identity, identity_id
from protocol.logs import event
from protocol.transport import BrokerAuth

from .devices import DeviceRegistry
from .journal import Exchanges
from .ledger_sync import LedgerSync
from .lineage import LineageStart
from .models import Release
from .rounds import RoundTraffic

log = logging.getLogger("starling.gateway.ledger")


class LedgerKeeper:
    def __init__(self, path: Path, identity: Identity, name: str, genesis: Path | None, gossip: bool,
                 broker: tuple[str, int, BrokerAuth], bootstrap_s: float, checkpoint_every: int) -> None:
        """Open (or create) the ledger and, with `gossip`, start sharing it; raise if this gateway is not a
        member. `genesis`: the city's genesis vertex file; None roots a ledger of this gateway's own."""
        self.path = path
        self._identity = identity
        self._checkpoint_every = checkpoint_every
        self._writes = -1
        self.sync_link: LedgerSync | None = None
        self.ledger = Ledger(path, identity)
        try:
            if not self.ledger.is_initialized:
                if genesis is not None:  # the city's ledger, rooted in the operator's key
                    self.ledger.insert_vertex(Vertex.decode(genesis.read_bytes()))
                else:  # a ledger of its own: this gateway is its root and only member
                    self.ledger.init_genesis(name, [identity.public_key])
            if gossip:
                host, port, auth = broker
                self.sync_link = LedgerSync(self.ledger, identity.id, host, port, auth, bootstrap_s=bootstrap_s)
                self.sync_link.start()
                self.ledger.on_append = self.sync_link.announce
            if identity.public_key not in self.ledger.gateways():
                raise RuntimeError(f"this gateway ({identity.id}) is not a member of the ledger: the operator "
                                   "admits it with `starling-ledger join`")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.sync_link is not None:
            self.sync_link.close()
            self.sync_link = None
        self.ledger.close()

    @property
    def height(self) -> int:
        return self.ledger.height

    # --- what others wrote ---------------------------------------------------------------

    def sync(self, registry: DeviceRegistry, quiet: bool = False) -> None:
        """Admit devices enrolled elsewhere and drop the ones revoked (cheap when nothing changed)."""
        if not self.ledger.changed_elsewhere() and self.ledger.writes == self._writes:
            return
        self._writes = self.ledger.writes
        for key, name in self.ledger.enrolled_devices().items():
            if registry.admit(key, name) and not quiet:
                event(log, "device.enrolled", device=identity_id(key), name=name, by="ledger")
        for key, reason in self.ledger.revoked_devices().items():
            if registry.revoke(key):
                event(log, "device.revoked", device=identity_id(key), reason=reason)

    def maybe_checkpoint(self) -> None:
        """Commit to the ledger's state every `checkpoint_every` vertices (new gateways start from it)."""
        if not self._checkpoint_every or (self.sync_link is not None and self.sync_link.gossip.bootstrapping):
            return
        try:
            if self.ledger.since_checkpoint() >= self._checkpoint_every:
                vertex = self.ledger.write_checkpoint()
                event(log, "ledger.checkpoint", vertex=vertex.id_hex[:16], count=vertex.body["count"])
        except Exception:  # a checkpoint is an optimisation: never worth stopping the gateway for
            log.exception("ledger.checkpoint_failed")

    def status(self) -> dict[str, Any] | None:
        """Height, finality and peers, for the status topic (None if they cannot be read now)."""
        try:
            if self.sync_link is not None:
                doc = self.sync_link.gossip.status()
                doc.pop("vv", None)
                doc.pop("gateway", None)
                return doc
            return self.ledger.finality()
        except Exception:  # a status must never fail the round
            log.exception("status.ledger_failed")
            return None

    # --- what this gateway writes ------------------------------------------------------------

    def enroll(self, key: bytes, name: str, policy: str) -> None:
        self.ledger.enroll_device(key, name, policy)

    def record_updates(self, traffic: RoundTraffic, exchanges: Exchanges) -> list[bytes]:
        """Write a round's accepted updates as one `updates` vertex; return the recorded digests, each once
        (two devices may send byte-identical updates: a free rider's zeros, a replayed file).

        A round recorded before an interruption is not recorded again. If the ledger refuses the batch
        (it should not: every reply was checked), the records are tried one by one, so one bad record
        costs only itself, never the round.
        """
        records = [(a.envelope.ctx.sender, a.envelope.body["digest"], a.examples, a.envelope.sig)
                   for a in traffic.accepted]
        if not records:
            return []
        if exchanges.is_recorded(traffic.task):
            return list(dict.fromkeys(r[1] for r in records))
        args = (self._identity.id, traffic.round, traffic.task, traffic.base)
        try:
            self.ledger.record_updates(*args, records, True)  # each signature verified at ingest
            exchanges.mark_recorded(traffic.task)
            return list(dict.fromkeys(r[1] for r in records))
        except LedgerError as exc:
            event(log, "ledger.batch_refused", logging.ERROR, round=traffic.round, reason=str(exc))
        kept = []
        for record in records:
            try:
                self.ledger.record_updates(*args, [record])
                kept.append(record[1])
            except DuplicateUpdate:  # the same bytes from the same device, recorded in an earlier round: a device
                kept.append(record[1])  # whose training is deterministic repeats itself; the update is on record
                event(log, "ledger.record_known", device=identity_id(record[0]), update=record[1].hex()[:16])
            except LedgerError as exc:
                event(log, "ledger.record_refused", logging.ERROR, device=identity_id(record[0]), reason=str(exc))
        exchanges.mark_recorded(traffic.task)
        return list(dict.fromkeys(kept))

    def record_lineage(self, start: LineageStart) -> None:
        self.ledger.record_lineage(start.root, start.version, start.previous, start.reason, start.architecture)

    def record_aggregate(self, release: Release, strategy: str, rule: str,
                         inputs: list[tuple[bytes, float | None]]) -> None:
        self.ledger.record_aggregate(release.round, strategy, release.parent, [d for d, _ in inputs], release.digest)

    def record_contributions(self, round_: int, model: bytes, scores: tuple[tuple[bytes, bytes, float], ...]) -> None:
        """Each accepted update's contribution to the round's model (gateway/provenance.py). Not written yet:
        the ledger gets its `contributions` kind with the ledger's split (work in progress)."""
