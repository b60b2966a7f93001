"""Content-addressed blobs beside the ledger: device updates and models, kept by their SHA-256.

    store = BlobStore(state_dir / "blobs", Retention(keep_tags=4))
    digest = store.put(reply.attachment, tag=epoch)   # the update digest the ledger records
    digests = store.put_many(attachments, tag=epoch)  # a round's updates: one fsync per folder, not per blob
    data = store.get(digest)                          # checked against the digest, or None
    store.prune()                                     # keep the newest 4 tags

What is kept: the exact bytes whose SHA-256 the ledger names, i.e. an
accepted reply's attachment (the update digest, protocol/envelope.py) and an
encoded model (`schemas.encode_model`, the release digest). Any member
gateway or auditor can then fetch them by digest (blob_exchange.py) and
recompute an aggregate.

Tags are the unit of retention: a non-negative integer that grows with time.
The gateway tags a blob with the model version it belongs to (a release, and
the updates trained on it: gateway/blob_keeper.py), so `keep_tags` is a number
of model versions; with the city tier a tag becomes the city epoch. A blob may
belong to several tags (a model that is one epoch's output and the next
epoch's input); it is gone only when its last tag is pruned.

Layout: the file system is the index, so there is nothing to keep consistent
with it after a power cut:

    <folder>/<tag>/<first two hex digits>/<64 hex digits>

The same blob under a second tag is a hard link (no second copy on disk; a
plain copy where the file system has no hard links). Every file is written
with `write_atomic` (temp file, fsync, rename, fsync the folder; `put_many`
fsyncs each folder once for the whole batch) and new folders are fsynced into
their parent, so a power cut leaves a blob either whole or absent; a temp file
a cut left behind is removed at the next open.
A blob damaged on disk anyway is caught on read: `get` hashes what it read,
and a file that does not match its name is removed (every tag's link) and
reported (`blob.corrupt`), never returned.

    store = BlobStore(state_dir / "blobs", read_only=True)  # an auditor beside a running gateway

Read-only, the store writes, creates and removes nothing: the folder must
exist, the temp files of the gateway's writer are left alone (at a read-write
open they would be swept as a power cut's leftovers, under the writer's feet),
and a damaged blob is counted and reported but left in place (the gateway's
own store removes it at its next read). Writes raise `ReadOnlyStore`.

Thread-safe: writes, prunes and removals take one lock; reads take none (a file pruned
under a reader is simply absent).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from protocol.atomic import write_atomic
from protocol.blob_messages import MAX_BLOB_BYTES
from protocol.digest import DIGEST_BYTES, sha256
from protocol.logs import event

log = logging.getLogger("starling.gateway.blobs")
DEFAULT_KEEP_TAGS = 4  # the current city epoch and the three before it: time for peers to fetch and audit
HEX_NAME = re.compile(r"[0-9a-f]{64}")
TAG_NAME = re.compile(r"0|[1-9][0-9]{0,17}")  # a tag folder: a decimal integer below 10^18
TEMP_PREFIX = "."  # write_atomic's temp files are ".<name>.<random>.tmp": never a blob name


class ReadOnlyStore(PermissionError):
    """A write, retag or prune asked of a store opened read-only."""


class BlobTooLarge(ValueError):
    """A blob over the store's `max_blob_bytes` (the largest honest model): refused, nothing written."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"a blob of {size} bytes is over the limit of {limit} bytes")
        self.size, self.limit = size, limit


@dataclass(frozen=True)
class Retention:
    """What `prune` keeps: the newest `keep_tags` tags (city epochs), and of those only the newest that fit in
    `max_bytes` (None: no byte cap). The newest tag is always kept, whatever its size."""

    keep_tags: int = DEFAULT_KEEP_TAGS
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.keep_tags < 1:
            raise ValueError("retention must keep at least one tag (the current one)")
        if self.max_bytes is not None and self.max_bytes < 0:
            raise ValueError("max_bytes must be >= 0 (or None: no byte cap)")


@dataclass(frozen=True)
class Pruned:
    tags: tuple[int, ...]  # the tags removed
    blobs: int  # blobs gone for good (no kept tag held them)
    bytes: int


def check_tag(tag: int) -> int:
    """A tag is an integer in [0, 10^18) (it names a folder); ValueError otherwise."""
    if type(tag) is not int or not TAG_NAME.fullmatch(str(tag)):
        raise ValueError(f"a tag is an integer in [0, 10^18), not {tag!r}")
    return tag


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    def __init__(self, folder: Path, retention: Retention = Retention(),
                 max_blob_bytes: int = MAX_BLOB_BYTES, read_only: bool = False) -> None:
        self.folder = Path(folder)
        self.retention = retention
        self.max_blob_bytes = max_blob_bytes
        self.read_only = read_only
        self._lock = threading.RLock()  # writes, prunes and removals; re-entered by put -> _remove_corrupt
        if read_only:
            if not self.folder.is_dir():
                raise FileNotFoundError(f"no blob folder at {self.folder}")
        else:
            self._ensure_dir(self.folder)
        self.corrupt = 0  # blobs found damaged on read (and removed, unless read-only) since open
        self._tags: list[int] = []  # ascending; replaced, never changed in place (readers hold no lock)
        self._count = 0  # distinct digests held
        self._bytes = 0  # their sizes, once each
        self._open()

    # --- reading -----------------------------------------------------------------------------

    def get(self, digest: bytes) -> bytes | None:
        """The blob with this SHA-256, or None. A copy that does not hash to its name is removed and logged."""
        name = self._name(digest)
        for tag in reversed(self._tags):
            try:
                data = self._path(tag, name).read_bytes()
            except (FileNotFoundError, NotADirectoryError):
                continue
            if sha256(data) == digest:
                return data
            if self.read_only:  # counted and said, left in place; another tag's copy may be good
                self.corrupt += 1
                event(log, "blob.corrupt", logging.ERROR, digest=name[:16], bytes=len(data), tag=tag,
                      detail="does not hash to its name: left in place (read-only)")
                continue
            self._remove_corrupt(name)
            return None
        return None

    def has(self, digest: bytes) -> bool:
        """Whether a copy is held (not re-hashed: `get` checks what it returns)."""
        return self._where(self._name(digest)) is not None

    def size(self, digest: bytes) -> int | None:
        """The size of a held blob (a stat, not a read: what a server checks before it reads), or None."""
        name = self._name(digest)
        for tag in reversed(self._tags):
            try:
                return self._path(tag, name).stat().st_size
            except (FileNotFoundError, NotADirectoryError):
                continue
        return None

    def tags(self) -> list[int]:
        return list(self._tags)

    def status(self) -> dict[str, object]:
        """For the gateway's status line: distinct blobs and their bytes (each once, however many tags hold
        it), the tags held, and the blobs found damaged (and removed) since the store was opened."""
        tags = self._tags
        return {"blobs": self._count, "bytes": self._bytes, "tags": len(tags),
                "oldest_tag": tags[0] if tags else None, "newest_tag": tags[-1] if tags else None,
                "corrupt": self.corrupt, "keep_tags": self.retention.keep_tags}

    # --- writing -----------------------------------------------------------------------------

    def put(self, data: bytes, tag: int) -> bytes:
        """Keep `data` under `tag` and return its SHA-256. Idempotent: the same bytes again only add the tag."""
        self._writable()
        if len(data) > self.max_blob_bytes:
            raise BlobTooLarge(len(data), self.max_blob_bytes)
        check_tag(tag)
        digest = sha256(data)
        name = digest.hex()
        with self._lock:
            if self._path(tag, name).exists() and self._intact(tag, name):
                return digest
            source = self._where(name)
            if source is not None and not self._intact(source, name):
                source = None  # removed as corrupt: these fresh bytes replace it
            if source is None:
                self._write(tag, name, data)
                self._count += 1
                self._bytes += len(data)
                event(log, "blob.stored", logging.DEBUG, digest=name[:16], tag=tag, bytes=len(data))
            else:
                self._link(source, tag, name, data)
        return digest

    def put_many(self, blobs: list[bytes], tag: int) -> list[bytes]:
        """Keep each of `blobs` under `tag`; return their SHA-256s, in order. What `put` does for each, at a
        fraction of the cost for a round's thousand updates: every new file is written and fsynced, then all
        are renamed, then each folder they went to is fsynced once (`put`: one folder fsync per blob). Nothing
        is written if one blob is over the size limit."""
        self._writable()
        for data in blobs:
            if len(data) > self.max_blob_bytes:
                raise BlobTooLarge(len(data), self.max_blob_bytes)
        check_tag(tag)
        digests = [sha256(data) for data in blobs]
        with self._lock:
            fresh: dict[str, bytes] = {}
            for digest, data in zip(digests, blobs):
                name = digest.hex()
                if name in fresh or self._path(tag, name).exists() and self._intact(tag, name):
                    continue
                source = self._where(name)
                if source is not None and not self._intact(source, name):
                    source = None
                if source is None:
                    fresh[name] = data
                else:
                    self._link(source, tag, name, data)
            if fresh:
                self._write_many(tag, fresh)
        return digests

    def retag(self, digest: bytes, tag: int) -> bool:
        """Keep a held blob for `tag` too (e.g. the head model, still current in a later epoch); False if absent."""
        self._writable()
        check_tag(tag)
        name = self._name(digest)
        with self._lock:
            source = self._where(name)
            if source is None:
                return False
            if source != tag and not self._path(tag, name).exists():
                self._link(source, tag, name, None)
            return True

    def prune(self, keep_latest_tags: int | None = None) -> Pruned:
        """Remove the tags retention does not keep (oldest first); `keep_latest_tags` overrides `keep_tags`."""
        self._writable()
        keep = self.retention.keep_tags if keep_latest_tags is None else keep_latest_tags
        if keep < 1:
            raise ValueError("prune must keep at least one tag")
        removed, blobs, freed = [], 0, 0
        with self._lock:
            while len(self._tags) > 1 and (len(self._tags) > keep or (
                    self.retention.max_bytes is not None and self._bytes > self.retention.max_bytes)):
                tag, self._tags = self._tags[0], self._tags[1:]
                gone, size = self._drop_tag(tag)
                removed.append(tag)
                blobs += gone
                freed += size
        if removed:
            event(log, "blob.pruned", tags=",".join(map(str, removed)), blobs=blobs, bytes=freed,
                  kept=len(self._tags), held=self._count)
        return Pruned(tuple(removed), blobs, freed)

    def scrub(self) -> int:
        """Re-hash every blob (an operator's or auditor's check; reads everything); remove and count bad ones."""
        bad = 0
        for tag in list(self._tags):
            for shard in sorted(self._dirs(self.folder / str(tag))):
                for entry in list(os.scandir(shard)):
                    if HEX_NAME.fullmatch(entry.name) and self.get(bytes.fromhex(entry.name)) is None:
                        bad += 1
        return bad

    # --- inside ------------------------------------------------------------------------------

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStore(f"the blob store at {self.folder} is open read-only")

    def _open(self) -> None:
        """Find the tags, count the blobs, and remove temp files a power cut left behind."""
        names: dict[str, int] = {}
        tags: list[int] = []
        swept = 0
        for entry in os.scandir(self.folder):
            if not (entry.is_dir(follow_symlinks=False) and TAG_NAME.fullmatch(entry.name)):
                continue  # not ours: left alone
            tags.append(int(entry.name))
            for shard in self._dirs(Path(entry.path)):
                try:
                    items = list(os.scandir(shard))
                except FileNotFoundError:  # read-only beside a running gateway: a prune got there first
                    continue
                for item in items:
                    if item.name.startswith(TEMP_PREFIX) and item.is_file(follow_symlinks=False):
                        if self.read_only:  # perhaps a running gateway's write in progress: not ours
                            continue
                        os.unlink(item.path)  # a write a power cut interrupted: never renamed, never a blob
                        swept += 1
                    elif HEX_NAME.fullmatch(item.name) and item.is_file(follow_symlinks=False):
                        with contextlib.suppress(FileNotFoundError):
                            names[item.name] = item.stat().st_size
        self._tags = sorted(tags)
        self._count, self._bytes = len(names), sum(names.values())
        event(log, "blob.store_opened", folder=self.folder, blobs=self._count, bytes=self._bytes,
              tags=len(self._tags), swept=swept)

    @staticmethod
    def _dirs(folder: Path) -> list[str]:
        try:
            return [e.path for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    @staticmethod
    def _name(digest: bytes) -> str:
        if not isinstance(digest, bytes) or len(digest) != DIGEST_BYTES:
            raise ValueError(f"a blob digest is {DIGEST_BYTES} bytes (SHA-256)")
        return digest.hex()

    def _path(self, tag: int, name: str) -> Path:
        return self.folder / str(tag) / name[:2] / name

    def _where(self, name: str) -> int | None:
        """The newest tag holding this blob, or None."""
        for tag in reversed(self._tags):
            if self._path(tag, name).exists():
                return tag
        return None

    def _intact(self, tag: int, name: str) -> bool:
        """Whether the copy under `tag` hashes to its name; if not, every bad copy is removed (lock held)."""
        try:
            data = self._path(tag, name).read_bytes()
        except FileNotFoundError:
            return False
        if sha256(data).hex() == name:
            return True
        self._remove_corrupt(name)
        return False

    def _ensure_dir(self, path: Path) -> None:
        """Make `path` (and missing parents) and fsync each new one into its parent: a power cut must not
        take a folder, and the blobs renamed into it, away after `put` returned."""
        if path.is_dir():
            return
        self._ensure_dir(path.parent)
        try:
            path.mkdir()
        except FileExistsError:
            return
        _fsync_dir(path.parent)

    def _add_tag(self, tag: int) -> None:
        if tag not in self._tags:  # a new list, never a changed one: readers iterate without the lock
            self._tags = sorted([*self._tags, tag])

    def _write(self, tag: int, name: str, data: bytes) -> None:
        path = self._path(tag, name)
        self._ensure_dir(path.parent)
        self._add_tag(tag)
        write_atomic(path, data, mode=0o644)

    def _write_many(self, tag: int, blobs: dict[str, bytes]) -> None:
        """Write new blobs under `tag` (lock held) as `write_atomic` would, with one fsync per folder, not per
        blob. A blob is counted once its rename is done; a failure part way leaves whole blobs and temp files
        (removed at the next open), never a torn blob."""
        folders: set[Path] = set()
        temps: list[tuple[str, Path]] = []
        tag_folder = self.folder / str(tag)
        self._ensure_dir(tag_folder)
        made = False
        for shard in sorted({name[:2] for name in blobs}):  # new shard folders: one fsync of their parent for all
            if not (tag_folder / shard).is_dir():
                (tag_folder / shard).mkdir(exist_ok=True)
                made = True
        if made:
            _fsync_dir(tag_folder)
        self._add_tag(tag)
        try:
            for name, data in blobs.items():
                target = self._path(tag, name)
                fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f"{TEMP_PREFIX}{name}.", suffix=".tmp")
                temps.append((name, Path(temp)))
                os.fchmod(fd, 0o644)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            for name, temp in temps:
                os.replace(temp, self._path(tag, name))
                folders.add(temp.parent)
                self._count += 1
                self._bytes += len(blobs[name])
            temps = []
        finally:
            for _, temp in temps:  # not renamed (a failed write): never a blob
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
            for folder in folders:
                _fsync_dir(folder)
        event(log, "blob.stored", logging.DEBUG, blobs=len(blobs), tag=tag, bytes=sum(map(len, blobs.values())),
              folders=len(folders))

    def _link(self, source: int, tag: int, name: str, data: bytes | None) -> None:
        """The blob under `source` also under `tag`: a hard link, else (no hard links here) a copy."""
        target = self._path(tag, name)
        self._ensure_dir(target.parent)
        self._add_tag(tag)
        try:
            os.link(self._path(source, name), target)
        except FileExistsError:
            return
        except OSError:  # EXDEV, EPERM, ENOTSUP: a file system without hard links (some FUSE, FAT)
            self._write(tag, name, self._path(source, name).read_bytes() if data is None else data)
            return
        _fsync_dir(target.parent)

    def _drop_tag(self, tag: int) -> tuple[int, int]:
        """Remove one tag's folder (lock held); return the blobs and bytes that no other tag still holds.
        A cut halfway leaves part of the folder: the next open finds the tag again and the next prune ends it."""
        gone = size = 0
        folder = self.folder / str(tag)
        for shard in self._dirs(folder):
            for entry in list(os.scandir(shard)):
                length = entry.stat(follow_symlinks=False).st_size
                os.unlink(entry.path)
                if HEX_NAME.fullmatch(entry.name) and self._where(entry.name) is None:
                    gone += 1
                    size += length
        shutil.rmtree(folder, ignore_errors=True)
        _fsync_dir(self.folder)
        self._count -= gone
        self._bytes -= size
        return gone, size

    def _remove_corrupt(self, name: str) -> None:
        """Remove every copy of a blob that does not hash to its name, count it and say so. Each copy is read
        again under the lock: a `put` on another thread may have just replaced the bad bytes with good ones."""
        with self._lock:
            removed = length = 0
            for tag in self._tags:
                path = self._path(tag, name)
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                if sha256(data).hex() != name:
                    path.unlink()
                    removed, length = removed + 1, len(data)
            if not removed:
                return
            self.corrupt += 1
            if self._where(name) is None:  # no good copy left (one may be, where tags hold copies, not links)
                self._count -= 1
                self._bytes = max(0, self._bytes - length)  # off if the damage changed the length; exact at open
            event(log, "blob.corrupt", logging.ERROR, digest=name[:16], bytes=length, copies=removed,
                  detail="does not hash to its name: removed")
