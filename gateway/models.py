"""Global model releases: signed, content-addressed, retained on the broker.

A release's address is the SHA-256 of its attachment (the float32 weights in
deterministic CBOR); tasks name the model by that digest, so a device fetches
each model once, from a retained topic, whatever the number of tasks. Only
the two newest releases stay retained: a device that missed a round still
finds the model its task names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protocol import envelope, schemas, topics
from protocol.digest import sha256
from protocol.atomic import write_atomic
from protocol.keys import Identity

KEEP_RETAINED = 2


@dataclass(frozen=True)
class Release:
    digest: bytes
    version: int
    weights: dict[str, np.ndarray]
    size: int  # bytes published


class ModelPublisher:
    """Signs and publishes releases; versions only ever grow, across restarts too.

    Devices refuse a model older than one they already trust, so the last
    version is kept in `version_file` (written atomically before the release
    is published): a restarted gateway continues the numbering.
    """

    def __init__(
        self, identity: Identity, gateway_id: str, architecture: str, publish: Callable[..., object], version_file: Path
    ) -> None:
        self.identity = identity
        self.gateway_id = gateway_id
        self.architecture = architecture
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
        """Publish `weights` unless they are the current release; return the release."""
        weights = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items()}
        attachment = schemas.encode_model(weights)
        digest = sha256(attachment)
        for known in reversed(self.releases):
            if known.digest == digest:
                return known
        version = self._last_version + 1
        write_atomic(self._version_file, str(version).encode())
        self._last_version = version
        body = schemas.ModelRelease(digest, version, self.architecture).to_body()
        ctx = envelope.Context(self.identity.public_key, self.gateway_id, round_, "model", b"")
        wire = envelope.seal(self.identity, "model", ctx, body, attachment)
        self._publish(topics.model(self.gateway_id, digest.hex()), wire, retain=True)
        release = Release(digest, version, weights, len(wire))
        self.releases.append(release)
        for old in self.releases[:-KEEP_RETAINED]:
            self._publish(topics.model(self.gateway_id, old.digest.hex()), b"", retain=True)  # clears it
        self.releases = self.releases[-KEEP_RETAINED:]
        if self.on_release:
            self.on_release(release, round_)
        return release
