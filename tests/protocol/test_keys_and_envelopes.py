"""Key files (mode 0600, atomic writes, refusal of bad files) and what an envelope signature binds."""

from __future__ import annotations

import dataclasses
import json
import os
import stat

import pytest

from protocol import atomic, cbor, envelope, keys
from protocol.digest import sha256
from protocol.envelope import Context
from protocol.errors import BadSignature, DigestMismatch, KeyFileError, LimitExceeded, SchemaError
from protocol.keys import Identity

SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --- key files ---------------------------------------------------------------------------


def test_a_saved_key_file_has_mode_0600(tmp_path):
    path = tmp_path / "device.key"
    Identity.generate().save(path)
    assert _mode(path) == 0o600


def test_a_saved_key_file_has_mode_0600_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        Identity.generate().save(tmp_path / "device.key")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "device.key") == 0o600


def test_saving_over_a_world_readable_file_leaves_mode_0600(tmp_path):
    path = tmp_path / "device.key"
    path.write_text("old")
    os.chmod(path, 0o644)
    Identity.generate().save(path)
    assert _mode(path) == 0o600


def test_a_saved_key_loads_back_to_the_same_identity(tmp_path):
    path = tmp_path / "device.key"
    original = Identity.generate()
    original.save(path)
    loaded = Identity.load(path)
    assert loaded.id == original.id
    assert loaded.public_key == original.public_key
    assert loaded.sign(b"hello") == original.sign(b"hello")


def test_the_key_file_names_its_type_seed_public_key_and_id(tmp_path):
    path = tmp_path / "device.key"
    identity = Identity.from_seed(SEED)
    identity.save(path)
    doc = json.loads(path.read_text())
    assert doc == {
        "type": keys.KEY_FILE_TYPE,
        "seed": SEED.hex(),
        "public_key": identity.public_key.hex(),
        "id": identity.id,
    }


def test_save_creates_missing_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "device.key"
    Identity.from_seed(SEED).save(path)
    assert Identity.load(path).id == Identity.from_seed(SEED).id


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o620, 0o602, 0o610, 0o601, 0o666, 0o777])
def test_a_key_file_others_can_access_is_refused_naming_its_mode(tmp_path, mode):
    path = tmp_path / "device.key"
    Identity.from_seed(SEED).save(path)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError) as info:
        Identity.load(path)
    assert f"{mode:o}" in str(info.value)
    assert "600" in str(info.value)
    assert info.value.reason == "key_file"


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_a_key_file_only_its_owner_can_access_is_accepted(tmp_path, mode):
    path = tmp_path / "device.key"
    Identity.from_seed(SEED).save(path)
    os.chmod(path, mode)
    assert Identity.load(path).public_key == Identity.from_seed(SEED).public_key


def _write_key_file(path, content) -> None:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    os.chmod(path, 0o600)


GOOD_DOC = {
    "type": keys.KEY_FILE_TYPE,
    "seed": SEED.hex(),
    "public_key": Identity.from_seed(SEED).public_key.hex(),
    "id": Identity.from_seed(SEED).id,
}


@pytest.mark.parametrize(
    "content",
    [
        "",
        "not json",
        "{",
        "[]",
        "null",
        {**GOOD_DOC, "type": "ssh-ed25519"},
        {k: v for k, v in GOOD_DOC.items() if k != "type"},
        {k: v for k, v in GOOD_DOC.items() if k != "seed"},
        {**GOOD_DOC, "seed": SEED.hex()[:-2]},
        {**GOOD_DOC, "seed": SEED.hex() + "00"},
        {**GOOD_DOC, "seed": "zz" * 32},
        {**GOOD_DOC, "seed": list(SEED)},
        {**GOOD_DOC, "public_key": "00" * 32},
        {**GOOD_DOC, "public_key": None},
    ],
    ids=[
        "empty",
        "not json",
        "truncated json",
        "a list",
        "null",
        "wrong type",
        "no type",
        "no seed",
        "short seed",
        "long seed",
        "non-hex seed",
        "seed as a list",
        "public key of another seed",
        "public key null",
    ],
)
def test_a_malformed_key_file_is_refused(tmp_path, content):
    path = tmp_path / "device.key"
    _write_key_file(path, content)
    with pytest.raises(KeyFileError):
        Identity.load(path)


def test_a_key_file_without_the_optional_public_key_loads_from_its_seed(tmp_path):
    path = tmp_path / "device.key"
    _write_key_file(path, {"type": keys.KEY_FILE_TYPE, "seed": SEED.hex()})
    assert Identity.load(path).public_key == Identity.from_seed(SEED).public_key


def test_a_missing_key_file_is_refused(tmp_path):
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path / "nope.key")


def test_a_folder_is_not_a_key_file(tmp_path):
    os.chmod(tmp_path, 0o700)
    with pytest.raises(KeyFileError):
        Identity.load(tmp_path)


def test_save_leaves_no_temporary_file_behind(tmp_path):
    path = tmp_path / "device.key"
    Identity.generate().save(path)
    Identity.generate().save(path)  # and replacing an existing one
    assert sorted(os.listdir(tmp_path)) == ["device.key"]


def test_a_failed_save_keeps_the_old_key_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "device.key"
    old = Identity.from_seed(SEED)
    old.save(path)

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", crash)
    with pytest.raises(OSError):
        Identity.generate().save(path)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["device.key"]
    assert Identity.load(path).id == old.id


def test_a_write_that_fails_midway_never_shows_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.bin"
    atomic.write_atomic(path, b"old contents")
    real_fsync = os.fsync

    def fail_on_file_fsync(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(atomic.os, "fsync", fail_on_file_fsync)
    with pytest.raises(OSError):
        atomic.write_atomic(path, b"new contents that never land")
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert path.read_bytes() == b"old contents"
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]


def test_write_atomic_sets_the_requested_mode(tmp_path):
    atomic.write_atomic(tmp_path / "a", b"x", mode=0o640)
    atomic.write_atomic(tmp_path / "b", b"x")
    assert _mode(tmp_path / "a") == 0o640
    assert _mode(tmp_path / "b") == 0o644


def test_load_or_create_creates_once_then_keeps_the_same_key(tmp_path):
    path = tmp_path / "device.key"
    first = keys.load_or_create(path)
    assert _mode(path) == 0o600
    second = keys.load_or_create(path)
    assert first.id == second.id


def test_generated_identities_differ():
    assert Identity.generate().public_key != Identity.generate().public_key


# --- envelopes: what the signature binds -------------------------------------------------------

DEVICE = Identity.from_seed(SEED)
OTHER = Identity.from_seed(bytes(32))
BASE = sha256(b"global model v7")
CTX = Context(sender=DEVICE.public_key, gateway="a1b2c3d4e5f60718", round=7, task="t-7-3", base=BASE)
BODY = {"digest": sha256(b"update"), "examples": 240}


def _sealed(ctx=CTX, body=BODY, msg_type="reply", attachment=None, identity=DEVICE) -> bytes:
    return envelope.seal(identity, msg_type, ctx, body, attachment)


def test_a_sealed_envelope_verifies_against_its_sender():
    decoded = envelope.decode(_sealed())
    decoded.verify()
    decoded.verify(DEVICE.public_key)
    assert decoded.ctx == CTX and decoded.body == BODY and decoded.type == "reply"


@pytest.mark.parametrize(
    "change",
    [
        {"round": 8},
        {"round": 0},
        {"task": "t-7-4"},
        {"task": ""},
        {"gateway": "ffffffffffffffff"},
        {"base": sha256(b"global model v6")},
        {"base": b""},
        {"sender": OTHER.public_key},
    ],
    ids=[
        "round+1",
        "round 0",
        "other task",
        "no task",
        "other gateway",
        "other base",
        "no base",
        "other sender",
    ],
)
def test_changing_the_context_after_signing_fails_verification(change):
    decoded = envelope.decode(_sealed())
    tampered = dataclasses.replace(decoded, ctx=dataclasses.replace(decoded.ctx, **change))
    with pytest.raises(BadSignature):
        tampered.verify()
    # and the same when the tampered message travels on the wire
    doc = cbor.loads(_sealed())
    wire = cbor.dumps({**doc, "ctx": {**doc["ctx"], **change}})
    with pytest.raises(BadSignature):
        envelope.open_verified(wire, "reply")


def test_a_signature_replayed_into_another_round_does_not_verify():
    round7 = envelope.decode(_sealed())
    round8 = envelope.decode(_sealed(ctx=dataclasses.replace(CTX, round=8)))
    assert round7.sig != round8.sig
    with pytest.raises(BadSignature):
        dataclasses.replace(round8, sig=round7.sig).verify()


@pytest.mark.parametrize(
    "body",
    [
        {**BODY, "examples": 241},
        {**BODY, "digest": sha256(b"other")},
        {"digest": BODY["digest"]},
        {**BODY, "x": 1},
    ],
    ids=["examples", "digest", "field removed", "field added"],
)
def test_changing_the_body_after_signing_fails_verification(body):
    decoded = envelope.decode(_sealed())
    with pytest.raises(BadSignature):
        dataclasses.replace(decoded, body=body).verify()


def test_changing_the_type_after_signing_fails_verification():
    decoded = envelope.decode(_sealed())
    with pytest.raises(BadSignature):
        dataclasses.replace(decoded, type="receipt").verify()


def test_verifying_against_another_key_fails():
    with pytest.raises(BadSignature):
        envelope.decode(_sealed()).verify(OTHER.public_key)


def test_a_message_signed_by_another_key_claiming_the_sender_fails():
    forged_ctx = dataclasses.replace(CTX, sender=OTHER.public_key)
    forged = envelope.decode(_sealed(ctx=forged_ctx, identity=OTHER))
    forged.verify()  # fine on its own: OTHER signed it as OTHER
    with pytest.raises(BadSignature):
        dataclasses.replace(forged, ctx=CTX).verify()


def test_the_signature_covers_the_domain_prefix():
    decoded = envelope.decode(_sealed())
    signed = envelope.signed_bytes(decoded.type, decoded.ctx, decoded.body)
    assert signed.startswith(envelope.DOMAIN)
    keys.verify(DEVICE.public_key, signed, decoded.sig)
    with pytest.raises(BadSignature):
        keys.verify(DEVICE.public_key, signed[len(envelope.DOMAIN) :], decoded.sig)


def test_an_attachment_is_bound_through_its_digest():
    payload = b"delta bytes" * 10
    decoded = envelope.decode(_sealed(body={"examples": 3}, attachment=payload))
    assert decoded.body["digest"] == sha256(payload)
    assert decoded.attachment == payload
    decoded.verify()


@pytest.mark.parametrize(
    "swap", [b"other delta", b"", b"delta bytes" * 10 + b"\x00"], ids=["other", "empty", "one byte longer"]
)
def test_an_attachment_swapped_for_another_fails_with_digest_mismatch(swap):
    payload = b"delta bytes" * 10
    data = _sealed(body={"examples": 3}, attachment=payload)
    decoded = envelope.decode(data)
    with pytest.raises(DigestMismatch):
        dataclasses.replace(decoded, attachment=swap).verify()
    doc = cbor.loads(data)
    with pytest.raises(DigestMismatch):
        envelope.open_verified(cbor.dumps({**doc, "att": swap}), "reply")


def test_an_attachment_and_its_digest_swapped_together_fail_the_signature():
    data = _sealed(body={"examples": 3}, attachment=b"honest")
    doc = cbor.loads(data)
    evil = {**doc, "att": b"evil", "body": {**doc["body"], "digest": sha256(b"evil")}}
    with pytest.raises(BadSignature):
        envelope.open_verified(cbor.dumps(evil), "reply")


def test_seal_overrides_a_stale_body_digest_with_the_attachments():
    data = _sealed(body={"digest": sha256(b"stale"), "examples": 1}, attachment=b"fresh")
    assert envelope.decode(data).body["digest"] == sha256(b"fresh")


def test_envelope_digest_differs_between_two_messages():
    digests = {
        envelope.decode(_sealed()).digest,
        envelope.decode(_sealed(body={**BODY, "examples": 1})).digest,
        envelope.decode(_sealed(ctx=dataclasses.replace(CTX, round=8))).digest,
        envelope.decode(_sealed(msg_type="enroll")).digest,
        envelope.decode(
            _sealed(identity=OTHER, ctx=dataclasses.replace(CTX, sender=OTHER.public_key))
        ).digest,
    }
    assert len(digests) == 5
    assert all(len(d) == 32 for d in digests)


def test_envelope_digest_is_stable_for_the_same_message():
    assert envelope.decode(_sealed()).digest == envelope.decode(_sealed()).digest


def test_envelope_digest_covers_the_signature():
    decoded = envelope.decode(_sealed())
    other_sig = dataclasses.replace(decoded, sig=bytes(64))
    assert other_sig.digest != decoded.digest


def test_open_verified_refuses_an_unexpected_type():
    with pytest.raises(SchemaError):
        envelope.open_verified(_sealed(msg_type="enroll"), "reply")


def test_seal_refuses_an_unknown_type_and_a_foreign_sender():
    with pytest.raises(ValueError):
        _sealed(msg_type="gossip")
    with pytest.raises(ValueError):
        envelope.seal(OTHER, "reply", CTX, BODY)


def test_seal_refuses_a_message_over_the_envelope_limit():
    with pytest.raises(LimitExceeded):
        _sealed(attachment=bytes(envelope.MAX_ENVELOPE_BYTES))


def test_context_sender_id_is_the_identity_id():
    assert CTX.sender_id == DEVICE.id
