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

import numpy as np

from protocol import envelope, schemas, topics
from protocol.digest import sha256
from protocol.keys import Identity

KEEP_RETAINED = 2


@dataclass(frozen=True)
class Release:
    digest: bytes
    version: int
    weights: dict[str, np.ndarray]
    size: int  # bytes published


class ModelPublisher:
    def __init__(self, identity: Identity, gateway_id: str, architecture: str, publish: Callable[..., object]) -> None:
        self.identity = identity
        self.gateway_id = gateway_id
        self.architecture = architecture
        self._publish = publish
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
        version = self.releases[-1].version + 1 if self.releases else 0
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
