"""The city tier: every few rounds the member gateways merge their models into one, with no city server.

    tier = CityTier(settings, ledger, gateway_id, own_ids, blobs, stop)
    if tier.due(round_):
        merged = tier.epoch(round_, head)     # None: nothing to merge (alone, or nothing offered)
        ... the engine releases merged.weights as the next step and records the `city` vertex

An epoch is every `every` rounds (round numbers are each gateway's own and go
on across restarts, so epoch e is round e x every everywhere). At its epoch
round a gateway:

1. offers its head, when a round of its own made it: a `city.offer` vertex
   naming its aggregate vertex; the model's bytes, kept in its blob store,
   are pushed once to every member first (blob_exchange.py), so the others
   hold them by the time they read the offer;
2. waits until every member it does not exclude has offered, or `deadline_s`
   passed since its own offer, or another member has already merged this
   epoch (a `city` vertex by a gateway it does not exclude);
3. takes the set: the first `city` vertex of the epoch, if there is one, after
   recomputing it from its inputs (its merged set is then this gateway's too:
   a late gateway joins the set the others agreed, it does not make another);
   else the sound offers (`ledger.offers`: each member's first, its weight the
   examples the ledger records behind it) of members it does not exclude, in
   gateway id order;
4. fetches the models it lacks from the offering gateways (blob exchange),
   merges them (city_merge.py: Flower's FedAvg or FedMedian, the same bits
   everywhere) and hands the result back; the engine releases it and records
   the `city` vertex (inputs, rule, output).

So all gateways that see the same offers get the same model, and a gateway
that comes late (a partition healed, a slow round) takes the merge the others
made. Two gateways that both reach the deadline with different offers (an
offer that arrived at one in time, at the other not) merge different sets for
that epoch; the next epoch where all see all offers brings them back to one
model. A gateway alone (a partition, the others gone) merges nothing: it goes
on with its own rounds and its accepted updates stay on its ledger.

Excluded: a member with mismatch evidence against it (`ledger.flagged`) that
this gateway wrote itself, or that more than a third of the members wrote
(one lying accuser cannot keep an honest gateway out), until the operator's
`mismatch.clear`. The evidence comes from the auditor (city_audit.py).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from ledger.city_queries import Offer
from ledger.errors import LedgerError
from ledger.kinds import CITY
from ledger.store import Ledger
from ledger.vertex import Vertex
from protocol import schemas
from protocol.errors import ProtocolError
from protocol.logs import event

from .blob_keeper import BlobKeeper
from .city_merge import RULES, MissingModel, Momentum, city_model, merge, momentum_problem, with_momentum
from .models import Release
from .recompute import digest_of, versions

log = logging.getLogger("starling.gateway.city")
POLL_S = 0.1
CITY_STEP = "city"  # the rule a lineage step made by a city merge is journaled under (lineage.py)
DEFAULT_MAX_EXAMPLES = 100_000
RECENT_EPOCHS = 50  # epochs kept in the status and result
OFFER_FLUSH_S = 10.0  # how long an offer waits for the blob writer to have the head on disk


@dataclass(frozen=True)
class CitySettings:
    """The `[city]` config table."""

    every: int = 3  # rounds per city epoch
    rule: str = "weighted"  # "weighted" (FedAvg over the gateways' models) or "median" (FedMedian)
    deadline_s: float = 60.0  # how long after its own offer a gateway waits for the other members' offers
    audit_share: float | None = None  # share of the peers' round aggregates this gateway recomputes
    #                                    (city_audit.py); None: 2 / (members - 1), all of them up to 3 gateways
    max_examples: int = DEFAULT_MAX_EXAMPLES  # an update counts at most this many examples in an offer's weight
    momentum: float = 0.0  # slow momentum (city_merge.py): + momentum x (city model e-1 - e-2); 0: the plain merge


@dataclass
class CityMerge:
    """One epoch's merge at this gateway: what the engine releases and records."""

    epoch: int
    round: int
    rule: str
    weights: dict[str, np.ndarray]
    inputs: list[tuple[bytes, bytes, float | None]]  # (offer vertex, model digest, weight) in merge order
    gateways: list[str]  # the offering gateway of each input
    left_out: list[tuple[str, str]]  # (gateway id, why)
    max_examples: int  # the cap on each update's examples in an offer's weight
    adopted: bytes | None = None  # the `city` vertex whose set this merge took, if another member merged first
    momentum: Momentum | None = None  # the slow momentum added to the merge, if any
    seconds: float = 0.0
    digest: bytes = b""

    @property
    def params(self) -> dict[str, Any]:
        """What the `city` vertex records besides its inputs (a recompute needs only the inputs and the rule;
        these say how the weights were read and what computed the merge)."""
        momentum = self.momentum.params() if self.momentum is not None else {}
        return {"max_examples": self.max_examples, **momentum, **{f"version_{k}": v for k, v in versions().items()}}

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "round": self.round, "model": self.digest.hex(), "rule": self.rule,
                "inputs": [{"gateway": g, "model": m.hex(), "weight": w}
                           for g, (_, m, w) in zip(self.gateways, self.inputs)],
                "left_out": [{"gateway": g, "reason": r} for g, r in self.left_out],
                "adopted": self.adopted.hex() if self.adopted else None, "seconds": round(self.seconds, 3),
                "momentum": self.momentum.beta if self.momentum is not None else None}


class CityTier:
    def __init__(self, settings: CitySettings, ledger: Ledger, gateway_id: str, own_ids: set[str],
                 blobs: BlobKeeper, stop: threading.Event) -> None:
        """`ledger`: this gateway's store (thread-safe; the keeper owns it); `own_ids`: the identity ids this
        gateway wrote under (its keys before rotations); `blobs`: where models are kept and fetched."""
        if settings.rule not in RULES:
            raise ValueError(f"city.rule must be one of {sorted(RULES)}")
        self.settings = settings
        self._ledger = ledger
        self._id = gateway_id
        self._own_ids = set(own_ids)
        self._blobs = blobs
        self._stop = stop
        self._merging = threading.Event()  # set while an epoch runs: the auditor holds its checks (in_epoch)
        self._lock = threading.Lock()
        self._epochs: list[dict[str, Any]] = self._recorded_epochs()  # a restarted gateway's report goes on
        self._alone = 0
        self._fetched_bytes = 0  # model bytes received from other members for the merges (pushed or fetched)
        self._pushed_bytes = 0  # this gateway's offered models, sent once to all

    def _recorded_epochs(self) -> list[dict[str, Any]]:
        """The epochs this gateway merged before (its `city` vertices), as the report lists them; what only the
        merge knew (left out, seconds) is null."""
        out = []
        for vertex in self._ledger.vertices_of(CITY):
            if self._ledger.speaks_as(vertex.creator) != self._id:
                continue
            body = vertex.body
            inputs = []
            for offer_id, model, weight in body["inputs"]:
                offer = self._ledger.get(offer_id)
                gateway = self._ledger.speaks_as(offer.creator) if offer is not None else None
                inputs.append({"gateway": gateway, "model": model.hex(), "weight": weight})
            out.append({"epoch": body["epoch"], "round": body["epoch"] * self.settings.every,
                        "model": body["output"].hex(), "rule": body["rule"], "inputs": inputs, "left_out": None,
                        "adopted": None, "seconds": None, "restored": True})
        return out[-RECENT_EPOCHS:]

    def due(self, round_: int) -> bool:
        return round_ > 0 and round_ % self.settings.every == 0

    def in_epoch(self) -> bool:
        """Whether an epoch is under way here: the audits wait (city_audit.py), so that the merge every member
        waits for gets the CPU and the blob exchange first."""
        return self._merging.is_set()

    # --- one epoch -----------------------------------------------------------------------------

    def epoch(self, round_: int, head: Release) -> CityMerge | None:
        """Offer, wait, agree, fetch and merge (the module docstring). None when there is nothing to merge;
        InterruptedError when stopped."""
        self._merging.set()
        try:
            return self._epoch(round_, head)
        finally:
            self._merging.clear()

    def _epoch(self, round_: int, head: Release) -> CityMerge | None:
        started = time.monotonic()
        epoch = round_ // self.settings.every
        self._offer(epoch, round_, head)
        deadline = time.monotonic() + self.settings.deadline_s
        refused: set[bytes] = set()  # other members' merges of this epoch this gateway would not take
        while True:
            excluded = self.excluded()
            offers = self._ledger.offers(epoch, self.settings.max_examples)
            first = self._first_merge(epoch, excluded, refused)
            if first is not None:
                merged = self._adopt(first, round_, offers, excluded, head)
                if merged is not None:
                    return self._done(merged, started)
                refused.add(first.id)
            members = set(self._ledger.member_ids().values()) - excluded
            if members <= {o.gateway for o in offers} or time.monotonic() >= deadline:
                break
            if self._stop.wait(POLL_S):
                raise InterruptedError("stopped while waiting for the city's offers")
        merged = self._merge_offers(epoch, round_, offers, excluded, head)
        return None if merged is None else self._done(merged, started)

    def _offer(self, epoch: int, round_: int, head: Release) -> None:
        aggregate = self._ledger.aggregate_with_output(self._own_ids, head.digest)
        if aggregate is None:  # the head is the last city model, or its aggregate is not on record
            event(log, "city.no_offer", epoch=epoch, round=round_, model=head.digest.hex()[:16],
                  reason="no round of this gateway made the head")
            return
        # The head's bytes go to the blob store off this thread: on disk before anyone is told to fetch them.
        if not self._blobs.flush(OFFER_FLUSH_S):
            event(log, "city.offer_unflushed", logging.WARNING, epoch=epoch, seconds=OFFER_FLUSH_S)
        # Every member will want the model: it goes out once, to all, before the offer that names it (a member
        # that missed the push fetches it from the blob store as usual).
        model = head.model or schemas.encode_model(head.weights)
        if self._blobs.push(model):
            with self._lock:
                self._pushed_bytes += len(model)
        try:
            vertex = self._ledger.record_offer(epoch, aggregate.body["round"], head.digest, aggregate.id)
        except (LedgerError, ProtocolError) as exc:
            event(log, "city.offer_refused", logging.ERROR, epoch=epoch, reason=str(exc))
            return
        event(log, "city.offer", epoch=epoch, round=aggregate.body["round"], model=head.digest.hex()[:16],
              vertex=vertex.id_hex[:16])

    def _first_merge(self, epoch: int, excluded: set[str], refused: set[bytes]) -> Vertex | None:
        """The epoch's first `city` vertex by another member this gateway does not exclude (and has not refused
        to adopt already)."""
        for vertex in self._ledger.city_merges(epoch):
            creator = self._ledger.speaks_as(vertex.creator)
            if creator != self._id and creator not in excluded and vertex.id not in refused:
                return vertex
        return None

    def _adopt(self, vertex: Vertex, round_: int, offers: list[Offer], excluded: set[str],
               head: Release) -> CityMerge | None:
        """The set another member merged, if this gateway accepts it: every input a sound offer of a member it
        does not exclude, each weight the ledger's, and the output recomputed bit for bit. Else None (logged;
        a recomputed mismatch is the auditor's evidence to write)."""
        body = vertex.body
        by_offer = {o.vertex: o for o in offers}
        problem = None
        if body["rule"] != self.settings.rule:
            problem = f"merged by {body['rule']}, this city merges by {self.settings.rule}"
        for offer_id, model, weight in body["inputs"]:
            offer = by_offer.get(offer_id)
            if problem is not None:
                break
            if offer is None or offer.problem is not None or offer.model != model:
                problem = "an input is not a sound offer of this epoch"
            elif offer.gateway in excluded:
                problem = f"an input is {offer.gateway}'s, which this gateway excludes"
            elif body["rule"] == "weighted" and weight != float(offer.examples):
                problem = "an input's weight is not the examples the ledger records behind it"
        if problem is None:
            problem = momentum_problem(body, self._ledger.city_outputs)
        weights = None
        if problem is None:
            creator = self._ledger.speaks_as(vertex.creator)
            wanted = [(by_offer[o].gateway, m) for o, m, _ in body["inputs"]]
            momentum = Momentum.of(body)
            if momentum is not None:
                wanted += [(creator, momentum.previous), (creator, momentum.before)]
            models = self._fetch(wanted, head)
            try:
                weights = city_model(body, models.get)
            except MissingModel as exc:
                problem = f"a model could not be fetched: {exc}"
            except ValueError as exc:
                problem = f"no city model comes of its inputs: {exc}"
            else:
                if digest_of(weights) != body["output"]:
                    problem = "its output is not what its inputs give"
        if problem is not None:
            event(log, "city.not_adopted", logging.WARNING, epoch=body["epoch"], vertex=vertex.id_hex[:16],
                  by=self._ledger.speaks_as(vertex.creator), reason=problem)
            return None
        gateways = [by_offer[o].gateway for o, _, _ in body["inputs"]]
        left_out = self._left_out(set(gateways), offers, excluded, "not_in_agreed_set")
        return CityMerge(body["epoch"], round_, body["rule"], weights, [tuple(i) for i in body["inputs"]], gateways,
                         left_out, self.settings.max_examples, adopted=vertex.id, momentum=Momentum.of(body))

    def _merge_offers(self, epoch: int, round_: int, offers: list[Offer], excluded: set[str],
                      head: Release) -> CityMerge | None:
        chosen: list[Offer] = []
        for offer in offers:
            if offer.problem is not None and offer.gateway not in excluded:
                event(log, "city.bad_offer", logging.WARNING, epoch=epoch, gateway=offer.gateway, reason=offer.problem)
            elif offer.gateway not in excluded:
                chosen.append(offer)
        models = self._fetch([(o.gateway, o.model) for o in chosen], head)
        chosen = [o for o in chosen if models.get(o.model) is not None]
        left_out = self._left_out({o.gateway for o in chosen}, offers, excluded, "fetch_failed")
        if len(chosen) < 2:
            with self._lock:
                self._alone += 1
            event(log, "city.alone", epoch=epoch, round=round_, offers=len(offers), usable=len(chosen),
                  left_out=",".join(f"{g[:8]}:{r}" for g, r in left_out) or "-")
            return None
        rule = self.settings.rule
        inputs = [(o.vertex, o.model, float(o.examples) if rule == "weighted" else None) for o in chosen]
        weights = merge(rule, [(schemas.decode_model(models[m]), w) for _, m, w in inputs])
        momentum = None
        earlier = self._own_last_two(epoch, head)
        if earlier is not None:
            momentum, previous, before = earlier
            weights = with_momentum(weights, momentum.beta, previous, before)
        return CityMerge(epoch, round_, rule, weights, inputs, [o.gateway for o in chosen], left_out,
                         self.settings.max_examples, momentum=momentum)

    def _own_last_two(self, epoch: int, head: Release) -> tuple[Momentum, dict, dict] | None:
        """The momentum of this epoch's merge and the two city models it is made of (this gateway's merges of
        the two epochs before); None without momentum, or when either is not on the ledger or at hand (an epoch
        merged alone, the first two epochs, pruned)."""
        if not self.settings.momentum:
            return None
        previous, before = (self._ledger.city_outputs(e).get(self._id) for e in (epoch - 1, epoch - 2))
        if previous is None or before is None:
            return None
        models = self._fetch([(self._id, previous), (self._id, before)], head)
        if models.get(previous) is None or models.get(before) is None:
            event(log, "city.no_momentum", logging.WARNING, epoch=epoch, reason="an earlier city model is not at hand")
            return None
        return (Momentum(self.settings.momentum, previous, before), schemas.decode_model(models[previous]),
                schemas.decode_model(models[before]))

    def _left_out(self, taken: set[str], offers: list[Offer], excluded: set[str],
                  otherwise: str) -> list[tuple[str, str]]:
        """Every member (and every gateway that offered) not in `taken`, with why: "flagged" (excluded),
        "bad_offer" (an unsound offer), "no_offer" (nothing offered), else `otherwise` (its model could not be
        fetched; or, adopting another member's merge, it was not in the set agreed)."""
        by_gateway = {o.gateway: o for o in offers}
        out = []
        for gateway in sorted((set(self._ledger.member_ids().values()) | set(by_gateway)) - taken):
            offer = by_gateway.get(gateway)
            if gateway in excluded:
                out.append((gateway, "flagged"))
            elif offer is None:
                out.append((gateway, "no_offer"))
            elif offer.problem is not None:
                out.append((gateway, "bad_offer"))
            else:
                out.append((gateway, otherwise))
        return out

    def _fetch(self, wanted: list[tuple[str, bytes]], head: Release) -> dict[bytes, bytes | None]:
        """The bytes of each (holder gateway, model digest): this gateway's own head at hand, the rest from the
        blob store or the holders, all at once; None for what could not be had."""
        out: dict[bytes, bytes | None] = {}
        futures = {}
        members = sorted(set(self._ledger.member_ids().values()) - {self._id})
        for holder, digest in wanted:
            if digest == head.digest and head.model:
                out[digest] = head.model
            elif digest not in out and digest not in futures:  # the offerer first, then whoever fetched it too
                holders = [holder, *(m for m in members if m != holder)]
                futures[digest] = self._blobs.fetch(digest, holders, head.version)
        if futures:
            wait(futures.values(), timeout=self._blobs.settings.fetch_timeout_s + 5)
        wire = 0
        for digest, future in futures.items():
            fetched = future.result() if future.done() else None
            out[digest] = fetched.data if fetched is not None else None
            if fetched is not None and fetched.data is not None and fetched.holder != "local":
                wire += len(fetched.data)
        with self._lock:
            self._fetched_bytes += wire
        return out

    def _done(self, merged: CityMerge, started: float) -> CityMerge:
        merged.seconds = time.monotonic() - started
        merged.digest = digest_of(merged.weights)
        event(log, "city.merged", epoch=merged.epoch, round=merged.round, model=merged.digest.hex()[:16],
              inputs=len(merged.inputs), rule=merged.rule, adopted=merged.adopted.hex()[:16] if merged.adopted else "-",
              left_out=",".join(f"{g[:8]}:{r}" for g, r in merged.left_out) or "-",
              seconds=round(merged.seconds, 3))
        with self._lock:
            self._epochs = [*self._epochs, merged.to_json()][-RECENT_EPOCHS:]
        return merged

    # --- who is left out -------------------------------------------------------------------------

    def excluded(self) -> set[str]:
        """Members whose models stay out: this gateway's own evidence against them, or evidence from more than a
        third of the members (not cleared by the operator)."""
        members = len(self._ledger.member_ids()) or 1
        out = set()
        for gateway, items in self._ledger.flagged().items():
            accusers = {e.accuser for e in items}
            if self._id in accusers or len(accusers) > members / 3:
                out.add(gateway)
        return out

    def report(self) -> dict[str, Any]:
        """The status's and result's `city` section (the auditor adds its own part)."""
        flagged = {}
        for gateway, items in self._ledger.flagged().items():
            last = items[-1]
            flagged[gateway] = {"vertex": last.vertex.hex(), "kind": last.kind, "reason": last.reason,
                                "accusers": sorted({e.accuser for e in items})}
        with self._lock:
            return {"every": self.settings.every, "rule": self.settings.rule, "epochs": list(self._epochs),
                    "alone": self._alone, "fetched_bytes": self._fetched_bytes,
                    "pushed_bytes": self._pushed_bytes, "flagged": flagged,
                    "excluded": sorted(self.excluded())}
