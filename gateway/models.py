"""Global model releases: signed, versioned, expiring, content-addressed, retained.

A release's address is the SHA-256 of the model bytes (the float32 weights
in deterministic CBOR); tasks name the model by that digest, so a device
fetches each model once, from a retained topic, whatever the number of tasks,
and a device that missed rounds catches up from the retained release its
next task names. Versions only grow, across restarts too (devices refuse a
rollback), and each release expires after `ttl_s` (devices refuse a stale
one). Models over 256 KB are published as retained chunks
`model/<digest>/<i>` next to the signed release. Only the two newest
releases stay retained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol import envelope, schemas, topics
from protocol.atomic import write_atomic
from protocol.digest import sha256
from protocol.keys import Identity

KEEP_RETAINED = 2
DEFAULT_TTL_S = 7 * 86400.0


@dataclass(frozen=True)
class Release:
    digest: bytes
    version: int
    weights: dict[str, np.ndarray]
    size: int  # bytes published
    chunks: int = 1


class ModelPublisher:
    """Signs and publishes releases; versions only ever grow, across restarts too.

    The last version is kept in `version_file` (written atomically before the
    release is published), so a restarted gateway continues the numbering.
    """

    def __init__(
        self,
        identity: Identity,
        gateway_id: str,
        architecture: str,
        publish: Callable[..., object],
        version_file: Path,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self.identity = identity
        self.gateway_id = gateway_id
        self.architecture = architecture
        self.ttl_s = ttl_s
        self._publish = publish
        self._version_file = version_file
        try:
            self._last_version = int(version_file.read_text())
        except (FileNotFoundError, ValueError):
            self._last_version = -1
        self.releases: list[Release] = []
        self.on_release: Callable[[Release, int], None] | None = None

    @property
    def current(self) -> Release | None:
        return self.releases[-1] if self.releases else None

    def release(self, weights: dict[str, np.ndarray], round_: int) -> Release:
        """Publish `weights` unless they are a retained release already; return the release."""
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        model = schemas.encode_model(weights)
        digest = sha256(model)
        for known in reversed(self.releases):
            if known.digest == digest:
                return known
        version = self._last_version + 1
        write_atomic(self._version_file, str(version).encode())
        self._last_version = version
        chunks = [model[i : i + schemas.CHUNK_BYTES] for i in range(0, len(model), schemas.CHUNK_BYTES)]
        body = schemas.ModelRelease(digest, version, self.architecture, time.time() + self.ttl_s, len(model),
                                    len(chunks)).to_body()
        ctx = envelope.Context(self.identity.public_key, self.gateway_id, round_, "model", b"")
        address = topics.model(self.gateway_id, digest.hex())
        if len(chunks) == 1:
            wire = envelope.seal(self.identity, "model", ctx, body, model)
            sent = len(wire)
        else:
            for index, chunk in enumerate(chunks):  # the pieces first: a device that sees the release finds them
                self._publish(f"{address}/{index}", chunk, retain=True)
            wire = envelope.seal(self.identity, "model", ctx, body)
            sent = len(wire) + len(model)
        self._publish(address, wire, retain=True)
        release = Release(digest, version, weights, sent, len(chunks))
        self.releases.append(release)
        for old in self.releases[:-KEEP_RETAINED]:
            self._clear(old)
        self.releases = self.releases[-KEEP_RETAINED:]
        if self.on_release:
            self.on_release(release, round_)
        return release

    def _clear(self, release: Release) -> None:
        """An empty retained message deletes the retained one on the broker."""
        address = topics.model(self.gateway_id, release.digest.hex())
        self._publish(address, b"", retain=True)
        if release.chunks > 1:
            for index in range(release.chunks):
                self._publish(f"{address}/{index}", b"", retain=True)
