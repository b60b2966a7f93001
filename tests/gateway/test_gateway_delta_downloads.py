"""[training] download: each round's release is the head plus the delta devices download, published beside the
full release, named by the tasks, and recomputed by an auditor with the same rounding."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_recompute import BASE, aggregate_in_process, encoded_update

from gateway import recompute
from gateway.config import parse_config as parse_gateway
from gateway.journal import Journal
from gateway.lineage import Lineage
from gateway.models import KEEP_RETAINED, ModelPublisher
from gateway.releases import Releases
from ledger.kinds import _check_params
from protocol import envelope, schemas, topics
from protocol.config import ConfigError
from protocol.digest import sha256
from protocol.errors import SchemaError
from protocol.keys import Identity
from protocol.tensors import apply_delta

GATEWAY = Identity.from_seed(b"d" * 32)
GOOD_GATEWAY = {
    "gateway": {"name": "gw", "key": "k", "state_dir": "s"},
    "strategy": {"name": "FedAvg"},
    "enrollment": {"policy": "allowlist", "allowlist": []},
}
PARAMS = {"strategy": {}, "sequence": [[0, 1.0]]}


class Keeper:  # the ledger's side is the recompute tests' (test_recompute.py)
    def record_lineage(self, start): ...
    def record_aggregate(self, release, strategy, rule, inputs, params=None): ...


def releases_for(tmp_path, download: str):
    published: list[tuple[str, bytes]] = []
    publisher = ModelPublisher(GATEWAY, GATEWAY.id, "arch", lambda t, p, retain=False: published.append((t, p)))
    releases = Releases(Lineage(Journal(tmp_path / "rounds.db")), publisher, Keeper(), "fam/1", tmp_path / "m.npz",
                        download=download)
    return releases, published


def step(weights: dict[str, np.ndarray], seed: int, spread: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, spread, v.shape)).astype(np.float32) for k, v in weights.items()}


def advance(releases: Releases, weights, round_: int, params: dict | None = None):
    return releases.advance(weights, round_, "weighted", [], "FedAvg", {}, None, [], dict(params or PARAMS))


def test_the_download_setting_defaults_to_int8_and_a_bad_one_is_refused_naming_it():
    assert parse_gateway(GOOD_GATEWAY).download == "i8"
    for value in ("f16", "full"):
        assert parse_gateway({**GOOD_GATEWAY, "training": {"download": value}}).download == value
    with pytest.raises(ConfigError, match=r"training\.download must be one of"):
        parse_gateway({**GOOD_GATEWAY, "training": {"download": "f32"}})
    with pytest.raises(ConfigError, match=r"training\.download must be str"):
        parse_gateway({**GOOD_GATEWAY, "training": {"download": 8}})


@pytest.mark.parametrize("codec", ["i8", "f16"])
def test_a_round_releases_exactly_the_head_plus_the_published_delta(tmp_path, codec):
    releases, published = releases_for(tmp_path, codec)
    head = releases.start(BASE, "first start")
    aggregate = step(BASE, 1)
    release = advance(releases, aggregate, 1)
    assert release.delta is not None and release.delta.base == head.digest and release.delta.codec == codec
    assert release.digest == sha256(schemas.encode_model(release.weights))
    assert any(not np.array_equal(release.weights[k], aggregate[k]) for k in BASE)  # rounded, not the aggregate

    wire = dict(published)[topics.model_delta(GATEWAY.id, release.digest.hex())]
    env = envelope.open_verified(wire, "delta")
    assert env.ctx.sender == GATEWAY.public_key
    delta = schemas.ModelDelta.from_body(env.body)
    assert (delta.target, delta.base, delta.version, delta.codec, delta.size) == (
        release.digest, head.digest, release.version, codec, len(env.attachment))
    rebuilt = apply_delta(head.weights, schemas.decode_delta(env.attachment, codec))  # what a device does
    assert sha256(schemas.encode_model(rebuilt)) == release.digest
    assert len(env.attachment) < release.size
    assert releases.head.weights is release.weights  # the next round trains from the released model

    # Journaled for the ledger's aggregate vertex: a recompute rounds the same way.
    rows = Journal(tmp_path / "rounds.db").read("select inputs from release where version = ?", release.version)
    assert json.loads(rows[0][0])["params"][schemas.DOWNLOAD] == codec


def test_a_full_download_a_first_model_and_a_step_f16_cannot_hold_are_full_releases(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "f16").mkdir()
    releases, published = releases_for(tmp_path / "full", "full")
    releases.start(BASE, "first start")
    aggregate = step(BASE, 1)
    release = advance(releases, aggregate, 1)
    assert release.delta is None and all(np.array_equal(release.weights[k], aggregate[k]) for k in BASE)
    assert not any("/delta/" in t and p for t, p in published)

    releases, published = releases_for(tmp_path / "f16", "f16")
    first = releases.start(BASE, "first start")
    assert first.delta is None
    huge = {k: v + 1e6 for k, v in BASE.items()}  # beyond f16's range: sent whole
    release = advance(releases, huge, 1)
    assert release.delta is None and release.digest == sha256(schemas.encode_model(huge))


def test_a_restarted_gateway_publishes_its_head_with_its_delta_and_a_full_step_after_it_keeps_none(tmp_path):
    releases, _ = releases_for(tmp_path, "i8")
    head = releases.start(BASE, "first start")
    made = advance(releases, step(BASE, 1), 1)
    restarted, published = releases_for(tmp_path, "i8")  # the same journal, a new process
    again = restarted.head
    assert (again.digest, again.delta) == (made.digest, made.delta) and again.delta.base == head.digest
    assert restarted.release_for(None, 2) == again  # the head is published again by this process ...
    wire = dict(published)[topics.model_delta(GATEWAY.id, again.digest.hex())]  # ... with its delta
    env = envelope.open_verified(wire, "delta")
    rebuilt = apply_delta(head.weights, schemas.decode_delta(env.attachment, "i8"))
    assert sha256(schemas.encode_model(rebuilt)) == again.digest

    huge = {k: v + 1e6 for k, v in again.weights.items()}  # a full step: the journal keeps no delta for it
    releases, _ = releases_for(tmp_path, "f16")
    assert advance(releases, huge, 2).delta is None
    assert releases_for(tmp_path, "f16")[0].head.delta is None
    assert Journal(tmp_path / "rounds.db").read("select count(*) from release_delta") == [(0,)]


def test_old_deltas_are_cleared_with_their_releases(tmp_path):
    releases, published = releases_for(tmp_path, "i8")
    weights = BASE
    digests = [releases.start(BASE, "first start").digest]
    for round_ in range(1, KEEP_RETAINED + 3):
        weights = step(weights, round_)
        digests.append(advance(releases, weights, round_).digest)
    cleared = {t for t, p in published if not p}
    for digest in digests[: -KEEP_RETAINED]:
        assert topics.model_delta(GATEWAY.id, digest.hex()) in cleared
    for digest in digests[-KEEP_RETAINED:]:
        assert topics.model_delta(GATEWAY.id, digest.hex()) not in cleared


@pytest.mark.parametrize("codec", ["i8", "f16"])
def test_an_auditor_recomputes_a_rounded_release_and_a_forged_rounding_is_a_mismatch(tmp_path, codec):
    updates = [encoded_update(seed) for seed in range(6)]
    output, inputs, params = aggregate_in_process("FedAvg", updates, [10, 20, 30, 40, 50, 60], list(range(6)))
    releases, _ = releases_for(tmp_path, codec)
    head = releases.start(BASE, "first start")
    release = advance(releases, output, 1, params)
    recorded = {**params, schemas.DOWNLOAD: codec}
    _check_params(recorded, len(inputs), False)  # the ledger takes the params that say so
    body = {"round": 1, "strategy": "FedAvg", "base": head.digest, "rule": "weighted",
            "inputs": [list(i) for i in inputs], "output": release.digest, "params": recorded}
    blobs = {sha256(u): u for u in updates} | {head.digest: schemas.encode_model(BASE)}
    verdict = recompute.verify_body(body, blobs.get)
    assert verdict.ok and verdict.status == "match", verdict
    unrounded = {**body, "params": params}  # without the rounding the digest is another one
    assert recompute.verify_body(unrounded, blobs.get).status == "mismatch"
    other = {**body, "params": {**params, schemas.DOWNLOAD: "f16" if codec == "i8" else "i8"}}
    assert recompute.verify_body(other, blobs.get).status == "mismatch"
    unknown = {**body, "params": {**params, schemas.DOWNLOAD: "f8"}}
    assert recompute.verify_body(unknown, blobs.get).status == "unverifiable"
    with pytest.raises(SchemaError):
        _check_params({**params, schemas.DOWNLOAD: 8}, len(inputs), False)
