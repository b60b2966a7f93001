"""Starling ledger: the gateways' tamper-evident DAG of who contributed what.

    errors.py      why the ledger refuses something: one exception family (`LedgerError`)
    kinds.py       the kinds of vertex (genesis, gateway.join, gateway.leave, device.enroll,
                   device.revoke, updates, aggregate, checkpoint, lineage, contributions) and each one's
                   body schema
    vertex.py      the signed, content-addressed vertex and its wire form
    state.py       what the rules read and change; an in-memory version for the verifier
    snapshot.py    the state of a checkpoint's causal past, as canonical bytes
    kind_rules.py  each kind's rules against the DAG and its effect on the derived state
    validate.py    the rules every vertex passes to join the DAG
    sql_state.py   the rules' state over the SQLite tables, inside a write transaction
    schema.py      the SQLite file: tables, header, connection, upgrade of an older file
    queries.py     every read of a store
    bootstrap.py   starting a store from a peer's final checkpoint
    store.py       one gateway's SQLite store (`Ledger`): open, close, the write transaction, writes
    gossip.py      anti-entropy between gateways (transport-agnostic; gateway/ledger_sync.py runs it on MQTT)
    verify.py      offline audit of a store file (`verify_store`)
    audit.py       audit queries: provenance, lineage, contribution totals, the DAG as DOT, the
                   recompute audit (its recompute plugged in by the gateway package)
    cli.py         `starling-ledger verify | show | export | history | provenance | lineage | contributions |
                   dot | audit --recompute | init | join | leave | enroll | revoke | voucher`

Each module imports only modules listed above it, the standard library,
`protocol` and `sqlite_utils`.
"""

from .errors import LedgerError
from .store import Ledger
from .verify import VerifyReport, verify_store
from .vertex import Vertex, sign

__all__ = ["Ledger", "LedgerError", "Vertex", "VerifyReport", "sign", "verify_store"]
