"""`gateway.blobs.BlobStore`: content-addressed updates and models on disk, by digest, with tags for retention."""

from __future__ import annotations

import errno
import logging
import os
import threading

import numpy as np
import pytest

from gateway.blobs import BlobStore, BlobTooLarge, ReadOnlyStore, Retention
from protocol import envelope, schemas
from protocol.digest import sha256
from protocol.envelope import Context
from protocol.keys import Identity


def blob(n: int, size: int = 1000) -> bytes:
    return np.random.default_rng(n).bytes(size)


def files(store: BlobStore) -> list[str]:
    return sorted(str(p.relative_to(store.folder)) for p in store.folder.rglob("*") if p.is_file())


def test_round_trip_by_digest_with_status(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = blob(1)
    digest = store.put(data, tag=3)
    assert digest == sha256(data)
    assert store.get(digest) == data and store.has(digest)
    assert store.get(sha256(b"never stored")) is None and not store.has(sha256(b"never stored"))
    hexname = digest.hex()
    assert files(store) == [f"3/{hexname[:2]}/{hexname}"]  # <tag>/<shard>/<digest hex>
    assert store.status() == {"blobs": 1, "bytes": 1000, "tags": 1, "oldest_tag": 3, "newest_tag": 3,
                              "corrupt": 0, "keep_tags": 4}
    again = BlobStore(tmp_path / "blobs")  # the file system is the index: a reopened store knows it all
    assert again.get(digest) == data and again.status()["blobs"] == 1


def test_the_digests_are_the_ones_the_ledger_records(tmp_path):
    """An accepted reply's attachment hashes to the update digest it signed; an encoded model to its release
    digest: `put` returns exactly those."""
    store = BlobStore(tmp_path / "blobs")
    device = Identity.from_seed(bytes(range(32)))
    update = schemas.encode_update({"w": np.ones((3, 4), np.float32)}, {"loss": 0.5})
    wire = envelope.seal(device, "reply", Context(device.public_key, "ab" * 16, 2, "t1", bytes(32)),
                         {"examples": 10}, attachment=update)
    reply = envelope.decode(wire)
    assert store.put(reply.attachment, tag=0) == reply.body["digest"]
    model = schemas.encode_model({"w": np.zeros((5,), np.float32)})
    assert store.put(model, tag=0) == sha256(model)
    assert schemas.decode_model(store.get(sha256(model)))["w"].shape == (5,)


def test_put_is_idempotent_and_a_second_tag_is_a_link_not_a_copy(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = blob(2)
    digest = store.put(data, 1)
    assert store.put(data, 1) == digest and len(files(store)) == 1
    assert store.put(data, 2) == digest
    first, second = (store.folder / str(t) / digest.hex()[:2] / digest.hex() for t in (1, 2))
    assert first.stat().st_ino == second.stat().st_ino  # one copy on disk
    assert store.status()["blobs"] == 1 and store.status()["bytes"] == 1000 and store.tags() == [1, 2]


def test_put_many_keeps_a_batch_with_one_folder_fsync_per_folder(tmp_path, monkeypatch):
    """A round's updates in one call: the digests in order (a duplicate, one held under this tag, one held
    under another tag, all as `put` would), and each folder fsynced once, not once per blob."""
    from gateway import blobs as module

    store = BlobStore(tmp_path / "blobs")
    held_here, held_before = store.put(blob(100), 5), store.put(blob(101), 4)
    batch = [blob(i) for i in range(200, 400)] + [blob(200), blob(100), blob(101)]
    synced: list[str] = []
    real = module._fsync_dir
    monkeypatch.setattr(module, "_fsync_dir", lambda path: (synced.append(str(path)), real(path)))
    digests = store.put_many(batch, 5)
    assert digests == [sha256(b) for b in batch]
    assert digests[-2:] == [held_here, held_before]
    shards = {d.hex()[:2] for d in digests}
    assert len(synced) <= len(shards) + 2  # each shard folder once, their parent once, the link's folder
    assert len(synced) < len(batch) / 1.3  # `put` fsyncs a folder for each blob (and each new folder's parent)
    assert store.status()["blobs"] == 202 and store.status()["bytes"] == 202 * 1000
    assert all(store.get(d) == b for d, b in zip(digests, batch))
    here = store.folder / "5" / held_before.hex()[:2] / held_before.hex()
    assert here.stat().st_ino == (store.folder / "4" / held_before.hex()[:2] / held_before.hex()).stat().st_ino
    assert not [p for p in store.folder.rglob(".*")]  # no temp file left
    again = BlobStore(tmp_path / "blobs")
    assert again.status()["blobs"] == 202 and again.put_many(batch[:3], 5) == digests[:3]
    assert again.status()["blobs"] == 202


def test_put_many_writes_nothing_when_one_blob_is_over_the_limit(tmp_path):
    store = BlobStore(tmp_path / "blobs", max_blob_bytes=1024)
    with pytest.raises(BlobTooLarge):
        store.put_many([bytes(10), bytes(1025)], 0)
    assert files(store) == [] and store.status()["blobs"] == 0


def test_without_hard_links_a_second_tag_gets_a_copy(tmp_path, monkeypatch):
    store = BlobStore(tmp_path / "blobs")
    digest = store.put(blob(3), 1)

    def no_links(*_args):
        raise OSError(errno.EPERM, "hard links not supported here")

    monkeypatch.setattr(os, "link", no_links)
    assert store.retag(digest, 2) and store.put(blob(3), 3) == digest
    assert len(files(store)) == 3 and store.status()["blobs"] == 1
    assert store.prune(keep_latest_tags=1).blobs == 0 and store.get(digest) == blob(3)


def test_a_corrupted_file_is_removed_and_reported_never_returned(tmp_path, caplog):
    store = BlobStore(tmp_path / "blobs")
    data = blob(4)
    digest = store.put(data, 1)
    store.put(data, 2)
    path = store.folder / "2" / digest.hex()[:2] / digest.hex()
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0x01  # one flipped bit: both tags' links see it
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR, logger="starling.gateway.blobs"):
        assert store.get(digest) is None
    assert "blob.corrupt" in caplog.text and f"digest={digest.hex()[:16]}" in caplog.text
    assert files(store) == [] and not store.has(digest)
    assert store.status()["corrupt"] == 1 and store.status()["blobs"] == 0
    assert store.put(data, 2) == digest and store.get(digest) == data  # the right bytes again: kept again


def test_putting_the_right_bytes_over_a_damaged_copy_repairs_it(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    data = blob(5)
    digest = store.put(data, 1)
    (store.folder / "1" / digest.hex()[:2] / digest.hex()).write_bytes(data[:500])  # truncated on disk
    assert store.put(data, 1) == digest and store.get(digest) == data
    assert store.status()["corrupt"] == 1 and store.status()["blobs"] == 1


def test_scrub_finds_every_damaged_blob(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    digests = [store.put(blob(i), i % 3) for i in range(9)]
    for d in digests[:2]:
        next(store.folder.glob(f"*/*/{d.hex()}")).write_bytes(b"rot")
    assert store.scrub() == 2 and store.status()["blobs"] == 7
    assert all(store.get(d) == blob(i) for i, d in enumerate(digests) if i >= 2)


def test_read_only_an_auditor_beside_the_gateway_changes_nothing(tmp_path, caplog):
    """What `starling-ledger audit --recompute` opens next to a running gateway: it writes, creates, sweeps
    and removes nothing; a damaged copy is counted and skipped (a good copy under another tag is returned)."""
    with pytest.raises(FileNotFoundError):
        BlobStore(tmp_path / "none", read_only=True)
    assert not (tmp_path / "none").exists()
    store = BlobStore(tmp_path / "blobs")
    good, bad = blob(1), blob(2)
    digest, damaged = store.put(good, 1), store.put(bad, 1)
    (store.folder / "2" / digest.hex()[:2]).mkdir(parents=True)  # tag 2: a plain copy, then damaged
    (store.folder / "2" / digest.hex()[:2] / digest.hex()).write_bytes(good[:-1] + b"\0")
    (store.folder / "1" / damaged.hex()[:2] / damaged.hex()).write_bytes(b"rot")
    temp = store.folder / "1" / digest.hex()[:2] / f".{'ab' * 32}.x.tmp"  # the gateway's write in progress
    temp.write_bytes(b"half")
    before = {p: p.read_bytes() for p in store.folder.rglob("*") if p.is_file()}
    reader = BlobStore(tmp_path / "blobs", read_only=True)
    with caplog.at_level(logging.ERROR, logger="starling.gateway.blobs"):
        assert reader.get(digest) == good and reader.get(damaged) is None
    assert reader.status()["corrupt"] == 2 and caplog.text.count("blob.corrupt") == 2
    for write in (lambda: reader.put(b"x", 3), lambda: reader.put_many([b"x"], 3), lambda: reader.retag(digest, 3),
                  lambda: reader.prune(1)):
        with pytest.raises(ReadOnlyStore):
            write()
    assert {p: p.read_bytes() for p in store.folder.rglob("*") if p.is_file()} == before


def test_prune_keeps_the_newest_tags_and_blobs_any_kept_tag_holds(tmp_path, caplog):
    store = BlobStore(tmp_path / "blobs", Retention(keep_tags=3))
    only_old = store.put(blob(10), 1)
    old_and_new = store.put(blob(11), 1)
    store.put(blob(11), 5)  # the same blob, still needed in epoch 5
    for tag in (2, 3, 4, 5):
        store.put(blob(100 + tag), tag)
    assert store.status()["blobs"] == 6
    with caplog.at_level(logging.INFO, logger="starling.gateway.blobs"):
        pruned = store.prune()
    assert pruned.tags == (1, 2) and pruned.blobs == 2 and pruned.bytes == 2000
    assert "blob.pruned" in caplog.text and "tags=1,2" in caplog.text
    assert store.tags() == [3, 4, 5] and sorted(os.listdir(store.folder)) == ["3", "4", "5"]
    assert store.get(only_old) is None and store.get(old_and_new) == blob(11)
    assert store.status()["blobs"] == 4 and store.status()["bytes"] == 4000
    assert store.prune(keep_latest_tags=1).tags == (3, 4) and store.tags() == [5]
    assert store.prune().tags == ()  # nothing to do
    with pytest.raises(ValueError):
        store.prune(keep_latest_tags=0)
    with pytest.raises(ValueError):
        Retention(keep_tags=0)


def test_a_byte_cap_drops_the_oldest_tags_but_never_the_newest(tmp_path):
    store = BlobStore(tmp_path / "blobs", Retention(keep_tags=10, max_bytes=2500))
    for tag in range(5):
        store.put(blob(tag), tag)
    assert store.prune().tags == (0, 1, 2) and store.status()["bytes"] == 2000
    store.put(blob(99, 5000), 7)  # one tag over the cap on its own
    store.prune()
    assert store.tags() == [7] and store.status()["bytes"] == 5000


def test_retag_keeps_a_current_model_for_a_later_epoch(tmp_path):
    store = BlobStore(tmp_path / "blobs", Retention(keep_tags=1))
    model = store.put(blob(6), 1)
    assert store.retag(model, 4) and not store.retag(sha256(b"absent"), 4)
    store.prune()
    assert store.get(model) == blob(6) and store.tags() == [4]


def test_an_oversize_blob_is_refused_by_name_and_nothing_is_written(tmp_path):
    store = BlobStore(tmp_path / "blobs", max_blob_bytes=1024)
    store.put(bytes(1024), 0)
    with pytest.raises(BlobTooLarge, match="1025 bytes is over the limit of 1024") as refused:
        store.put(bytes(1025), 0)
    assert refused.value.size == 1025 and refused.value.limit == 1024
    assert store.status()["blobs"] == 1


@pytest.mark.parametrize("tag", [-1, 1.0, True, "3", 10**18])
def test_tags_are_small_non_negative_integers(tmp_path, tag):
    with pytest.raises(ValueError):
        BlobStore(tmp_path / "blobs").put(b"x", tag)


def test_a_digest_must_be_32_bytes(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    with pytest.raises(ValueError):
        store.get(b"short")
    with pytest.raises(ValueError):
        store.has("ab" * 32)


def test_a_write_cut_before_its_rename_leaves_nothing_behind(tmp_path, monkeypatch):
    """A power cut between the temp file and the rename: no blob (the put never returned); the torn temp file
    the cut leaves is ignored by reads and removed at the next open."""
    store = BlobStore(tmp_path / "blobs")
    kept = store.put(blob(7), 1)
    data = blob(8)
    torn = None

    def cut(src, dst):
        nonlocal torn
        torn = src
        raise KeyboardInterrupt("power cut")  # BaseException, as a dying process: write_atomic's cleanup is skipped

    real_unlink = os.unlink
    monkeypatch.setattr(os, "replace", cut)
    monkeypatch.setattr(os, "unlink", lambda path: None)  # ... and so is its unlink of the temp file
    with pytest.raises(KeyboardInterrupt):
        store.put(data, 1)
    monkeypatch.setattr(os, "replace", os.rename)
    monkeypatch.setattr(os, "unlink", real_unlink)
    assert torn is not None and os.path.exists(torn) and os.path.basename(torn).startswith(".")
    assert store.get(sha256(data)) is None and not store.has(sha256(data))
    reopened = BlobStore(tmp_path / "blobs")
    assert not os.path.exists(torn)
    assert reopened.status()["blobs"] == 1 and reopened.get(kept) == blob(7)
    assert reopened.put(data, 1) == sha256(data) and reopened.get(sha256(data)) == data


def test_a_prune_cut_halfway_is_finished_by_the_next_one(tmp_path):
    store = BlobStore(tmp_path / "blobs", Retention(keep_tags=1))
    old = [store.put(blob(i), 1) for i in range(4)]
    store.put(blob(50), 2)
    os.unlink(next(store.folder.glob(f"1/*/{old[0].hex()}")))  # the cut came after one unlink
    reopened = BlobStore(tmp_path / "blobs", Retention(keep_tags=1))
    assert reopened.tags() == [1, 2] and reopened.status()["blobs"] == 4
    assert reopened.prune().blobs == 3 and reopened.tags() == [2] and reopened.status()["blobs"] == 1


def test_foreign_files_in_the_folder_are_left_alone(tmp_path):
    folder = tmp_path / "blobs"
    (folder / "notes").mkdir(parents=True)
    (folder / "README").write_text("operator's")
    store = BlobStore(folder)
    store.put(b"x", 0)
    store.prune(keep_latest_tags=1)
    assert (folder / "README").exists() and (folder / "notes").is_dir() and store.tags() == [0]


def test_threads_putting_and_reading_at_once_agree_on_the_counts(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(40):
                digest = store.put(blob((i + offset) % 60, 200), tag=i % 3)
                assert store.get(digest) == blob((i + offset) % 60, 200)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 20,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert store.status()["blobs"] == 60 == BlobStore(tmp_path / "blobs").status()["blobs"]
