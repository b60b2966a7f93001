"""Root-signed membership vertices for the agent's tests, which run where the ledger (SQLite) is not installed.

They are written in the ledger's vertex wire form (ledger/vertex.py) by hand; tests/gateway/
test_membership_publisher.py checks the device's reader against vertices the ledger itself signs.
"""

from __future__ import annotations

from protocol import cbor
from protocol.keys import Identity
from protocol.membership import VERTEX_DOMAIN
from protocol.rotation import issue

TIME = 1.8e9


def vertex(signer: Identity, kind: str, seq: int, body: dict, parents: tuple[bytes, ...] = (b"\x01" * 32,),
           creator: bytes | None = None) -> bytes:
    """A vertex `signer` signs (as `creator`, its own key unless a forger says otherwise)."""
    doc = {"v": 1, "kind": kind, "creator": creator or signer.public_key, "seq": seq,
           "parents": [] if kind == "genesis" else sorted(parents), "time": TIME, "body": body}
    return cbor.dumps({**doc, "sig": signer.sign(VERTEX_DOMAIN + cbor.dumps(doc))})


def genesis(root: Identity, gateways: list[Identity], name: str = "harbour") -> bytes:
    return vertex(root, "genesis", 0, {"name": name, "gateways": sorted(g.public_key for g in gateways)})


def join(root: Identity, gateway: Identity, seq: int, name: str = "") -> bytes:
    return vertex(root, "gateway.join", seq, {"gateway": gateway.public_key, "name": name})


def leave(root: Identity, gateway: Identity, seq: int) -> bytes:
    return vertex(root, "gateway.leave", seq, {"gateway": gateway.public_key, "reason": "retired"})


def rotate(root: Identity, old: Identity, new: Identity, seq: int) -> bytes:
    statement = issue(root, old.public_key, new.public_key).encode()
    return vertex(root, "gateway.rotate", seq, {"gateway": old.public_key, "next": new.public_key,
                                                "statement": statement})


def document(*vertices: bytes) -> bytes:
    return cbor.dumps({"v": 1, "vertices": list(vertices)})
