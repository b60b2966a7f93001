"""A gateway's key replaced by the operator's root key: `gateway.rotate` and `starling-ledger rotate`.

The new key is a member from the rotation on, the old one's later vertices are
refused, and the gateway keeps its id: the new key records the updates devices
signed for the old id (and no other), in the store, in an audit's replay and
in a store that started from a checkpoint after the rotation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ledger_helpers import run_cli, signed_reply

from ledger.errors import InvalidVertex, MembershipError, NotAGateway, NotRoot, WrongGateway
from ledger.store import Ledger
from ledger.verify import verify_store
from protocol.errors import ProtocolError
from protocol.keys import Identity
from protocol.rotation import Chain, KeyRotation, issue, load_chain


@pytest.fixture
def city(tmp_path: Path):
    """A ledger file with genesis by a root key naming gateway A, a device enrolled by A."""
    root, a, b, device = (Identity.generate() for _ in range(4))
    path = tmp_path / "a.db"
    with Ledger.open(path, root) as ledger:
        ledger.init_genesis("harbour", [a.public_key])
    with Ledger.open(path, a) as ledger:
        ledger.enroll_device(device.public_key, "d", "open")
        ledger.record_updates(a.id, 1, "t1", b"\x01" * 32, [signed_reply(device, a.id, 1, "t1", b"\x01" * 32)])
    return path, root, a, b, device


def test_the_new_key_writes_for_the_old_id_and_the_old_key_is_out(city):
    path, root, a, b, device = city
    with Ledger.open(path, root) as ledger:
        vertex = ledger.rotate_gateway(issue(root, a.public_key, b.public_key))
        assert ledger.gateways() == [b.public_key]
        assert [(r.old, r.new) for r in ledger.rotations()] == [(a.public_key, b.public_key)]
    with Ledger.open(path, a) as ledger, pytest.raises(NotAGateway):
        ledger.enroll_device(Identity.generate().public_key, "late", "open")  # it heard it was retired
    with Ledger.open(path, b) as ledger:
        record = signed_reply(device, a.id, 2, "t2", b"\x02" * 32)  # the device still addresses the gateway as a.id
        with pytest.raises(WrongGateway):
            ledger.record_updates(b.id, 2, "t2", b"\x02" * 32, [signed_reply(device, b.id, 2, "t2", b"\x02" * 32)])
        written = ledger.record_updates(a.id, 2, "t2", b"\x02" * 32, [record])
        assert written.creator == b.public_key and vertex.id in written.parents
    report = verify_store(path)
    assert report.ok, report


def test_only_the_root_rotates_and_only_to_a_fresh_key_of_a_member(city):
    path, root, a, b, _ = city
    stranger = Identity.generate()
    with Ledger.open(path, a) as ledger, pytest.raises(NotRoot):  # a gateway may not rotate keys
        ledger.rotate_gateway(issue(a, a.public_key, b.public_key))
    with Ledger.open(path, root) as ledger:
        with pytest.raises(MembershipError):
            ledger.rotate_gateway(issue(root, stranger.public_key, b.public_key))  # not a member
        with pytest.raises(InvalidVertex):  # the statement is another key's word
            ledger.rotate_gateway(issue(stranger, a.public_key, b.public_key))
        ledger.rotate_gateway(issue(root, a.public_key, b.public_key))
        with pytest.raises(MembershipError):
            ledger.rotate_gateway(issue(root, b.public_key, a.public_key))  # a retired key never comes back
        forged = issue(root, b.public_key, stranger.public_key)
        with pytest.raises(InvalidVertex, match="names other keys"):  # the statement must name the vertex's keys
            ledger.append("gateway.rotate", {"gateway": b.public_key, "next": Identity.generate().public_key,
                                             "statement": forged.encode()})
    with Ledger.open(path, stranger) as ledger, pytest.raises((NotRoot, NotAGateway)):
        ledger.rotate_gateway(issue(stranger, b.public_key, Identity.generate().public_key))


def test_a_store_that_starts_from_a_checkpoint_after_the_rotation_knows_the_gateway_id(city, tmp_path: Path):
    path, root, a, b, device = city
    with Ledger.open(path, root) as ledger:
        ledger.rotate_gateway(issue(root, a.public_key, b.public_key))
    with Ledger.open(path, b) as ledger:
        genesis = next(ledger.vertices())
        checkpoint = ledger.write_checkpoint()  # b is the only member: final at once
        served = ledger.latest_final_checkpoint()
        assert served is not None and served[0].id == checkpoint.id
        after = ledger.record_updates(a.id, 3, "t3", b"\x03" * 32, [signed_reply(device, a.id, 3, "t3", b"\x03" * 32)])
    with Ledger.open(tmp_path / "newcomer.db") as newcomer:
        newcomer.insert_vertex(genesis)
        newcomer.bootstrap(genesis, *served)
        assert newcomer.insert_vertex(after)  # b writes for a.id here too
        assert newcomer.gateways() == [b.public_key]


def test_the_cli_rotates_twice_and_writes_the_chain_devices_follow(city, tmp_path: Path):
    path, root, a, b, _ = city
    root.save(tmp_path / "root.key")
    c = Identity.generate()
    chain_file = tmp_path / "gw" / "rotations.cbor"
    for old, new in ((a, b), (b, c)):
        done = run_cli("rotate", "--root-key", str(tmp_path / "root.key"), "--db", str(path), "--gateway", old.id,
                       "--new-key", new.public_key.hex(), "--chain", str(chain_file))
        assert done.returncode == 0, done.stderr
        summary = json.loads(done.stdout)
        assert summary["gateway"] == a.id and summary["retired"] == old.id
    chain = load_chain(chain_file)
    assert chain.keys() == [a.public_key, b.public_key, c.public_key] and chain.gateway_id(c.public_key) == a.id
    assert chain.follow(a.public_key, [root.public_key]) == (c.public_key, [a.public_key, b.public_key])
    assert chain.follow(b.public_key, [root.public_key]) == (c.public_key, [b.public_key])
    stranger = Identity.generate()
    assert chain.follow(stranger.public_key, [root.public_key]) == (stranger.public_key, [])  # not about it
    with pytest.raises(ProtocolError):
        chain.follow(a.public_key, [stranger.public_key])  # a device that trusts another root
    again = run_cli("rotate", "--root-key", str(tmp_path / "root.key"), "--db", str(path), "--gateway", a.id,
                    "--new-key", Identity.generate().public_key.hex(), "--chain", str(chain_file))
    assert again.returncode == 2 and "not a member" in again.stderr
    assert verify_store(path).ok


def test_a_chain_refuses_broken_links_repeated_keys_and_garbage():
    root = Identity.generate()
    a, b, c = (Identity.generate().public_key for _ in range(3))
    first, second = issue(root, a, b), issue(root, b, c)
    assert Chain.decode(Chain((first, second)).encode()).keys() == [a, b, c]
    with pytest.raises(ProtocolError):
        Chain.decode(Chain((second, first)).encode())  # out of order: a broken link
    with pytest.raises(ProtocolError):
        Chain.decode(Chain((first, issue(root, b, a))).encode())  # back to a retired key
    with pytest.raises(ProtocolError):
        Chain.decode(b"\xff\x00garbage")
    with pytest.raises(ProtocolError):
        KeyRotation.decode(first.encode()[:-3])
    tampered = KeyRotation(first.old, c, first.issued, first.root, first.sig)
    with pytest.raises(ProtocolError):
        tampered.check([root.public_key])
