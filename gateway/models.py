"""Publishing model releases: signed, versioned, expiring, content-addressed, retained.

A release's address is the SHA-256 of the model bytes (the float32 weights
in deterministic CBOR); tasks name the model by that digest, so a device
fetches each model once, from a retained topic, whatever the number of
tasks, and a device that missed rounds catches up from the retained release
its next task names. Versions come from the lineage (lineage.py) and only
grow, across restarts too (devices refuse a rollback); each publication
expires after `ttl_s` (devices refuse a stale one), so a restarted gateway
publishes its current model again with a fresh expiry. Models over 256 KB
are published as retained chunks `model/<digest>/<i>` next to the signed
release. Only the `KEEP_RETAINED` newest releases stay retained.

A release that is a step from the one before it (releases.py, `[training]
download` i8 or f16) also goes out as a signed delta, retained on
`model/delta/<digest>` (`schemas.ModelDelta`, one message of at most
`MAX_DELTA_BYTES`): a device holding the base downloads that instead of the
full model, and tasks say when there is one (`Task.delta_base`). It is signed
again with the full release and cleared with it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from protocol import envelope, schemas, topics
from protocol.keys import Identity

KEEP_RETAINED = 2
DEFAULT_TTL_S = 7 * 86400.0


@dataclass(frozen=True)
class Delta:
    """A release's step from its parent, as devices holding the parent download it."""

    base: bytes  # the parent's digest
    codec: str  # tensors.DELTA_CODECS
    data: bytes  # schemas.encode_delta: at most schemas.MAX_DELTA_BYTES


@dataclass(frozen=True)
class Release:
    """One released model."""

    digest: bytes
    version: int
    lineage: int
    round: int
    parent: bytes  # the model it was built from; b"" for a lineage's first model
    weights: dict[str, np.ndarray]
    size: int  # bytes of the encoded model
    step: bool = True  # a step of the lineage (else a model a strategy sent that did not become the head)
    model: bytes = b""  # the encoded model (schemas.encode_model), when at hand: publishing needs no second encoding
    delta: Delta | None = None  # the step from `parent` devices may download instead (the head's is journaled)


def chunk_count(size: int) -> int:
    return max(1, -(-size // schemas.CHUNK_BYTES))


class ModelPublisher:
    """Signs and publishes releases, and clears the retained copies of old ones."""

    def __init__(self, identity: Identity, gateway_id: str, architecture: str, publish: Callable[..., object],
                 ttl_s: float = DEFAULT_TTL_S, retained: list[Release] = ()) -> None:
        """`retained`: releases an earlier run of this gateway left retained (cleared in their turn)."""
        self.identity = identity
        self.gateway_id = gateway_id
        self.architecture = architecture
        self.ttl_s = ttl_s
        self._publish = publish
        self._retained: list[tuple[bytes, int]] = [(r.digest, chunk_count(r.size)) for r in retained]

    def publish(self, release: Release) -> int:
        """Sign and publish `release` (again, if it was: with a fresh expiry); return the bytes sent."""
        model = release.model or schemas.encode_model(release.weights)
        chunks = [model[i : i + schemas.CHUNK_BYTES] for i in range(0, len(model), schemas.CHUNK_BYTES)]
        body = schemas.ModelRelease(release.digest, release.version, self.architecture, time.time() + self.ttl_s,
                                    len(model), len(chunks)).to_body()
        ctx = envelope.Context(self.identity.public_key, self.gateway_id, release.round, "model", b"")
        address = topics.model(self.gateway_id, release.digest.hex())
        if len(chunks) == 1:
            wire = envelope.seal(self.identity, "model", ctx, body, model)
            sent = len(wire)
        else:
            for index, chunk in enumerate(chunks):  # the pieces first: a device that sees the release finds them
                self._publish(f"{address}/{index}", chunk, retain=True)
            wire = envelope.seal(self.identity, "model", ctx, body)
            sent = len(wire) + len(model)
        self._publish(address, wire, retain=True)
        if release.delta is not None:  # after the full release: a device that falls back finds it
            sent += self._publish_delta(release, release.delta, ctx)
        self._retained = [r for r in self._retained if r[0] != release.digest] + [(release.digest, len(chunks))]
        for digest, count in self._retained[:-KEEP_RETAINED]:
            self._clear(digest, count)
        self._retained = self._retained[-KEEP_RETAINED:]
        return sent

    def _publish_delta(self, release: Release, delta: Delta, ctx: envelope.Context) -> int:
        body = schemas.ModelDelta(b"", release.digest, delta.base, release.version, self.architecture,
                                  time.time() + self.ttl_s, len(delta.data), delta.codec).to_body()
        wire = envelope.seal(self.identity, "delta", ctx, body, delta.data)  # (seal sets the digest)
        self._publish(topics.model_delta(self.gateway_id, release.digest.hex()), wire, retain=True)
        return len(wire)

    def _clear(self, digest: bytes, chunks: int) -> None:
        """An empty retained message deletes the retained one on the broker (its delta's too: an earlier run
        may have left one this run does not know of)."""
        address = topics.model(self.gateway_id, digest.hex())
        self._publish(address, b"", retain=True)
        self._publish(topics.model_delta(self.gateway_id, digest.hex()), b"", retain=True)
        if chunks > 1:
            for index in range(chunks):
                self._publish(f"{address}/{index}", b"", retain=True)
