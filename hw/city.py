"""Several gateways of one emulated city: their shared genesis, and the end-of-run ledger check.

    genesis = write_genesis(workdir / "city", scenario.name, [g.public_key for g in gateways])
    ...  # run the gateways with [ledger] genesis = genesis, gossip = true
    settled = settle(ledgers, host, port, timeout_s=30)          # gossip until the ledgers agree
    check = compare_ledgers(ledgers, accepted_by_gateway)         # identical? every accepted update in each?

`write_genesis` does what `starling-ledger init --create-root-key` does: a
fresh operator root key (kept in the run folder, mode 0600) signs the genesis
vertex that names every gateway.

Why `settle`: a gateway process exits as soon as its own rounds are done, so
the vertices a slower gateway writes afterwards (its last updates and
aggregate) reach nobody who already left. In a city the gateways stay up and
anti-entropy gossip brings every ledger level; the emulator does the same
after the rounds by opening each gateway's ledger with its own key and
running the real `LedgerSync` (same client id, so each picks up the
persistent session its gateway left on the broker) until every store holds
the same vertices and the same derived state, or the time runs out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ledger.kinds import GENESIS, UPDATES
from ledger.store import Ledger
from ledger.vertex import sign
from protocol.atomic import write_atomic
from protocol.keys import Identity, identity_id


def write_genesis(folder: Path, name: str, gateway_keys: Sequence[bytes]) -> Path:
    """A fresh operator root key (`folder/operator.key`) and the genesis naming `gateway_keys`."""
    folder.mkdir(parents=True, exist_ok=True)
    root = Identity.generate()
    root.save(folder / "operator.key")
    genesis = sign(root, GENESIS, 0, [], {"name": name, "gateways": sorted(set(gateway_keys))})
    path = folder / "genesis.cbor"
    write_atomic(path, genesis.encode(), mode=0o644)
    return path


@dataclass
class GatewayLedger:
    name: str
    path: Path
    key: Path


def _snapshot(path: Path) -> tuple[set[str], str, int]:
    with Ledger.open(path, read_only=True) as ledger:
        return {v.hex() for v in ledger.ids()}, ledger.state_digest(), ledger.height


def settle(ledgers: Sequence[GatewayLedger], host: str, port: int, timeout_s: float = 30.0) -> dict[str, Any]:
    """Gossip the gateways' ledgers (their own keys, the real LedgerSync) until they agree or time is up."""
    from contextlib import ExitStack

    from gateway.ledger_sync import LedgerSync

    started = time.monotonic()
    agreed = False
    with ExitStack() as stack:
        opened = []
        for g in ledgers:
            identity = Identity.load(g.key)
            ledger = stack.enter_context(Ledger.open(g.path, identity))
            stack.enter_context(LedgerSync(ledger, identity.id, host, port, vv_interval_s=0.2))
            opened.append(ledger)
        while time.monotonic() - started < timeout_s:
            time.sleep(0.3)
            views = [({v.hex() for v in ledger.ids()}, ledger.state_digest()) for ledger in opened]
            if all(v == views[0] for v in views[1:]):
                agreed = True
                break
    return {"agreed": agreed, "seconds": round(time.monotonic() - started, 2)}


def compare_ledgers(ledgers: Sequence[GatewayLedger], accepted: dict[str, int],
                    gateway_keys: dict[str, bytes]) -> dict[str, Any]:
    """Are the ledgers identical, and does each hold every update any gateway accepted?

    `accepted`: gateway name -> the number of updates it accepted (its training rounds' participants);
    `gateway_keys`: gateway name -> its public key (the creator of its `updates` vertices).
    """
    views = {}
    records: dict[str, dict[bytes, set[tuple[bytes, bytes, int]]]] = {}
    for g in ledgers:
        if not g.path.exists():
            views[g.name] = (set(), None, 0)
            records[g.name] = {}
            continue
        views[g.name] = _snapshot(g.path)
        by_creator: dict[bytes, set[tuple[bytes, bytes, int]]] = {}
        with Ledger.open(g.path, read_only=True) as ledger:
            for vertex in ledger.vertices():
                if vertex.kind == UPDATES:
                    for device, digest, _, _ in vertex.body["records"]:
                        by_creator.setdefault(vertex.creator, set()).add((device, digest, vertex.body["round"]))
        records[g.name] = by_creator
    first = next(iter(views.values()))
    identical = all(v[0] == first[0] and v[1] == first[1] and v[1] is not None for v in views.values())
    missing: dict[str, dict[str, int]] = {}
    recorded_by_own: dict[str, int] = {}
    for name, key in gateway_keys.items():
        own = records.get(name, {}).get(key, set())
        recorded_by_own[name] = len(own)
        for holder, by_creator in records.items():
            lacking = len(own - by_creator.get(key, set()))
            if lacking:
                missing.setdefault(holder, {})[name] = lacking
    every_update = not missing and all(recorded_by_own.get(n, 0) >= accepted.get(n, 0) for n in gateway_keys)
    return {
        "identical": identical,
        "state_digests": {n: v[1] for n, v in views.items()},
        "heights": {n: v[2] for n, v in views.items()},
        "accepted_updates": dict(accepted),
        "recorded_updates": recorded_by_own,
        "missing_updates": missing,  # holder -> {gateway whose accepted updates it lacks: how many}
        "every_accepted_update_in_every_ledger": every_update,
        "gateway_ids": {n: identity_id(k) for n, k in gateway_keys.items()},
    }
