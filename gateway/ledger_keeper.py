"""The gateway's ledger: opened, joined to the city's gossip, read and written.

    keeper = LedgerKeeper(path, identity, ..., policy=, allowlist=, operator_keys=)
                                       # opens; gossip starts; membership checked
    keeper.sync(registry)              # enrollments this gateway's policy accepts, and revocations, made
                                       # elsewhere reach the device registry
    keeper.enroll(...)                 # a device this gateway admitted, with its evidence
    keeper.record_updates(...)         # a round's accepted updates: one `updates` vertex
    keeper.record_lineage(...)         # where a model lineage starts
    keeper.record_aggregate(...)       # a round's new model: base -> output, its rule, weighted inputs and
                                       # what a recompute needs (gateway/recompute.py)
    keeper.record_contributions(...)   # each accepted update's contribution score to that model
    keeper.record_city(...)            # a city epoch's merged model (gateway/city.py)
    keeper.close()

What reaches the ledger from elsewhere (an operator's `starling-ledger enroll`
or `revoke` in another process, another gateway by gossip) is taken in by
`sync`, which the gateway's worker thread calls every second. `Ledger` is
thread-safe, so the round engine writes its records from its own thread.

Every gateway applies its own enrollment policy to the enrollments it learns
from the ledger (`sync`): a device enrolled on the ledger is admitted here
when

    open       always
    allowlist  its key is on this gateway's allow-list
    voucher    one of its enrollments (by any gateway) carries a voucher that
               checks against this gateway's operator keys, for the device and
               this gateway, at that enrollment vertex's time

and under every policy when this gateway enrolled it itself (a device it
admitted, or the operator's `starling-ledger enroll` with this gateway's
key). A device refused here is not in the registry, so its replies are
refused as `unknown_device`; it can enroll here with its voucher
(`gateway.devices.Enrollment`), and this gateway writes its own enrollment.
Revocations are honoured whoever wrote them. Only enrollments new since the
last look are re-read (`Ledger.enrolled_since`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ledger.errors import AlreadyEnrolled, DuplicateUpdate, InvalidVertex, LedgerError, UnknownInput
from ledger.kinds import MAX_RECORDS
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol.errors import ProtocolError
from protocol.keys import Identity, identity_id
from protocol.logs import event
from protocol.rotation import Chain
from protocol.transport import BrokerAuth
from protocol.vouchers import Voucher

from .devices import DeviceRegistry
from .journal import Exchanges
from .ledger_sync import LedgerSync
from .lineage import LineageStart
from .models import Release
from .rounds import RoundTraffic

log = logging.getLogger("starling.gateway.ledger")


class LedgerKeeper:
    def __init__(self, path: Path, identity: Identity, name: str, genesis: Path | None, gossip: bool,
                 broker: tuple[str, int, BrokerAuth], bootstrap_s: float, checkpoint_every: int, *,
                 policy: str = "open", allowlist: tuple[bytes, ...] = (),
                 operator_keys: tuple[bytes, ...] = (), chain: Chain = Chain()) -> None:
        """Open (or create) the ledger and, with `gossip`, start sharing it; raise if this gateway is not a
        member. `genesis`: the city's genesis vertex file; None roots a ledger of this gateway's own.
        `policy`, `allowlist`, `operator_keys`: the gateway's `[enrollment]` config, applied to the
        enrollments `sync` finds on the ledger. `chain`: the gateway's key rotations (`protocol.rotation`):
        it writes under its first key's id and counts what its former keys enrolled as its own."""
        self.path = path
        self._identity = identity
        self._gateway_id = chain.gateway_id(identity.public_key)  # what devices sign for: `updates` records it
        self._own_ids = {identity.id, *(identity_id(k) for k in chain.keys())}
        self._checkpoint_every = checkpoint_every
        self._policy = policy
        self._allowlist = frozenset(allowlist)
        self._operator_keys = tuple(operator_keys)
        self._writes = -1
        self._enroll_mark = -1  # `Ledger.enrolled_since`: enrollments up to here have been looked at
        self._refused: set[bytes] = set()  # ledger-enrolled devices this policy did not admit (so far)
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
                                   "admits it with `starling-ledger join` (or a new key with `starling-ledger rotate`)")
            if chain.rotations:
                try:
                    chain.check([self.ledger.root])
                except ProtocolError as exc:
                    raise RuntimeError(f"this gateway's key rotations are not this ledger's root's: {exc}") from exc
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
        """Admit the devices enrolled elsewhere that this gateway's policy accepts, and drop the ones revoked
        (cheap when nothing changed: a device refused once is looked at again only when it gets a new
        enrollment)."""
        if not self.ledger.changed_elsewhere() and self.ledger.writes == self._writes:
            return
        self._writes = self.ledger.writes
        fresh, self._enroll_mark = self.ledger.enrolled_since(self._enroll_mark)
        news = set(fresh)
        for key, name in self.ledger.enrolled_devices().items():
            if registry.is_enrolled(key) or (key in self._refused and key not in news):
                continue
            if not self.admits(key):
                if key not in self._refused and not quiet:
                    event(log, "device.not_admitted", device=identity_id(key), policy=self._policy,
                          reason="enrolled elsewhere without evidence this policy accepts")
                self._refused.add(key)
                continue
            self._refused.discard(key)
            if registry.admit(key, name) and not quiet:
                event(log, "device.enrolled", device=identity_id(key), name=name, by="ledger")
        for key, reason in self.ledger.revoked_devices().items():
            self._refused.discard(key)
            if registry.revoke(key):
                event(log, "device.revoked", device=identity_id(key), reason=reason)

    def admits(self, key: bytes) -> bool:
        """True if this gateway's policy admits a device enrolled on the ledger (the module docstring)."""
        if self._policy == "open" or (self._policy == "allowlist" and key in self._allowlist):
            return True
        for record in self.ledger.enrollments(key):
            if record.creator in self._own_ids:
                return True
            if self._policy == "voucher" and record.policy == "voucher" and record.evidence:
                try:
                    Voucher.decode(record.evidence).check(self._operator_keys, key, self._gateway_id,
                                                          now=record.time)
                    return True
                except ProtocolError:
                    continue
        return False

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

    def enroll(self, key: bytes, name: str, policy: str, evidence: bytes = b"") -> None:
        """Record that this gateway admitted a device under `policy`, on `evidence` (the voucher under
        "voucher", else b""). Once per gateway: a device it enrolled before keeps that enrollment."""
        try:
            self.ledger.enroll_device(key, name, policy, evidence)
        except AlreadyEnrolled:  # enrolled here before the checkpoint this store started from: on record
            event(log, "device.enrolled_before", device=identity_id(key))

    def record_updates(self, traffic: RoundTraffic, exchanges: Exchanges) -> list[bytes]:
        """Write a round's accepted updates as one `updates` vertex; return the recorded digests, each once
        (two devices may send byte-identical updates: a free rider's zeros, a replayed file).

        A round recorded before an interruption is not recorded again. An update on record already is left
        out of the vertex (`_record_batch`). If the ledger refuses the batch for another reason (it should not:
        every reply was checked), the records are tried one by one, so one bad record costs only itself, never
        the round.
        """
        records = [(a.envelope.ctx.sender, a.envelope.body["digest"], a.examples, a.envelope.sig)
                   for a in traffic.accepted]
        if not records:
            return []
        if exchanges.is_recorded(traffic.task):
            return list(dict.fromkeys(r[1] for r in records))
        args = (self._gateway_id, traffic.round, traffic.task, traffic.base)
        try:
            self._record_batch(args, records)
            kept = [r[1] for r in records]
        except LedgerError as exc:
            event(log, "ledger.batch_refused", logging.ERROR, round=traffic.round, reason=str(exc))
            kept = self._record_one_by_one(args, records)
        exchanges.mark_recorded(traffic.task)
        return list(dict.fromkeys(kept))

    def _record_batch(self, args: tuple, records: list[tuple]) -> None:
        """The round's records as one vertex (each signature verified at ingest), less the updates on record
        already: a device trains deterministically (the same base, round and data give the same bytes), so a
        device that re-homed repeats at its new gateway's round 1 what its old gateway's round 1 recorded; when
        a gateway dies, most of that round is such repeats. The update is on record once; the aggregate that
        uses it names it."""
        try:
            self.ledger.record_updates(*args, records, True)
            return
        except DuplicateUpdate:  # (looked up only now: a round without repeats costs no lookups)
            pass
        fresh, known = [], []
        for record in records:
            (known if self.ledger.is_recorded(record[0], record[1]) else fresh).append(record)
        for device, digest, _, _ in known:
            event(log, "ledger.record_known", round=args[1], device=identity_id(device), update=digest.hex()[:16])
        event(log, "ledger.batch_has_known", round=args[1], known=len(known), recorded=len(fresh))
        if fresh:
            self.ledger.record_updates(*args, fresh, True)

    def _record_one_by_one(self, args: tuple, records: list[tuple]) -> list[bytes]:
        """Each record on its own (its signature checked again: the batch was refused, trust nothing); the
        digests on record afterwards."""
        kept = []
        for record in records:
            try:
                self.ledger.record_updates(*args, [record])
                kept.append(record[1])
            except DuplicateUpdate:
                kept.append(record[1])
                event(log, "ledger.record_known", round=args[1], device=identity_id(record[0]),
                      update=record[1].hex()[:16])
            except LedgerError as exc:
                event(log, "ledger.record_refused", logging.ERROR, device=identity_id(record[0]), reason=str(exc))
        return kept

    def record_lineage(self, start: LineageStart) -> None:
        self.ledger.record_lineage(start.root, start.version, start.previous, start.reason, start.architecture)

    def record_aggregate(self, release: Release, strategy: str, rule: str,
                         inputs: list[tuple[bytes, float | None]], params: dict[str, Any] | None = None) -> None:
        """A release's `aggregate` vertex: with the rule and each input's effective weight when the lineage
        row has them (`rule`), else the first form (digests only: a row journaled before rules were).
        `params`: what a recompute needs (gateway/recompute.py `aggregate_params`); params the ledger refuses
        cost the record its params (it cannot be recomputed then), never the record."""
        if rule:
            args = (release.round, strategy, release.parent, list(inputs), release.digest)
            if params is not None:
                try:
                    self.ledger.record_aggregate(*args, rule=rule, params=params)
                    return
                except InvalidVertex as exc:
                    event(log, "ledger.params_refused", logging.ERROR, version=release.version, reason=str(exc))
            self.ledger.record_aggregate(*args, rule=rule)
        else:
            self.ledger.record_aggregate(release.round, strategy, release.parent, [d for d, _ in inputs],
                                         release.digest)

    def record_city(self, release: Release, inputs: list[tuple[bytes, float | None]], params: dict[str, Any]) -> None:
        """A city epoch's `city` vertex for `release` (its model): `params` as `Releases.merge_city` journals
        them (epoch, rule, the offers merged, the vertex's own params), `inputs` (model digest, weight)."""
        offers = [bytes.fromhex(o) for o in params["offers"]]
        rows = [(offer, digest, weight) for offer, (digest, weight) in zip(offers, inputs, strict=True)]
        vertex = self.ledger.record_city(params["epoch"], params["rule"], rows, release.digest, params["params"])
        event(log, "ledger.city", epoch=params["epoch"], model=release.digest.hex()[:16], inputs=len(rows),
              vertex=vertex.id_hex[:16])

    def record_contributions(self, round_: int, model: bytes, scores: tuple[tuple[bytes, bytes, float], ...]) -> None:
        """Each accepted update's contribution score to the round's model (gateway/provenance.py), in
        `contributions` vertices of at most `MAX_RECORDS` scores. Only updates on record can be scored: the
        others (the ledger refused them) are left out. A refusal is logged, never raised: the model is out."""
        if len(scores) > MAX_RECORDS:  # several vertices: none may fail half-way, so check each score first
            scores = tuple(s for s in scores if self.ledger.is_recorded(s[0], s[1]))
        if not scores:
            return
        try:
            try:
                vertices = self.ledger.record_contributions(round_, model, scores)
            except UnknownInput:  # some update is not on record: score the ones that are
                scores = tuple(s for s in scores if self.ledger.is_recorded(s[0], s[1]))
                vertices = self.ledger.record_contributions(round_, model, scores) if scores else []
        except (LedgerError, ProtocolError) as exc:
            event(log, "ledger.contributions_refused", logging.ERROR, round=round_, reason=str(exc))
            return
        event(log, "ledger.contributions", round=round_, scores=len(scores), vertices=len(vertices))
