"""Starling ledger: the gateways' tamper-evident DAG of who contributed what.

    vertex.py    the signed, content-addressed vertex and its wire form
    kinds.py     each kind's body schema, rules and effects (genesis, gateway.join, gateway.leave,
                 device.enroll, device.revoke, updates, aggregate, checkpoint, lineage)
    validate.py  the rules every vertex passes to join the DAG
    state.py     what those rules read and change; an in-memory version for the verifier
    store.py     one gateway's SQLite store (`Ledger`): order, finality, checkpoints, bootstrap
    snapshot.py  the state of a checkpoint's causal past, as canonical bytes
    gossip.py    anti-entropy between gateways (transport-agnostic; gateway/ledger_sync.py runs it on MQTT)
    verify.py    offline audit of a store file (`verify_store`)
    audit.py     audit queries: provenance, lineage, the DAG as DOT
    cli.py       `starling-ledger verify | show | export | history | provenance | lineage | dot | init |
                 join | leave | enroll | revoke | voucher`

It imports only the standard library, `protocol` and `sqlite_utils`.
"""

from .errors import LedgerError
from .store import Ledger
from .verify import VerifyReport, verify_store
from .vertex import Vertex, sign

__all__ = ["Ledger", "LedgerError", "Vertex", "VerifyReport", "sign", "verify_store"]
