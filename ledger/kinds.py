"""The kinds of vertex and the schema of each one's body.

A `Vertex` checks its body against its kind when it is built (`check_body`),
so every vertex in hand is schema-valid. A schema checks types and limits
only and raises `protocol.errors.ProtocolError` subclasses (SchemaError,
LimitExceeded); what a kind means to the DAG (its rules against the state
so far, and what it adds to it) is in `ledger.kind_rules`.

    genesis        {"name": str, "gateways": [public key, ...] sorted, no duplicates}
    gateway.join   {"gateway": public key, "name": str}
    gateway.leave  {"gateway": public key, "reason": str}
    gateway.rotate {"gateway": public key, "next": public key, "statement": the root's signed rotation}
    device.enroll  {"device": public key, "name": str, "policy": str[, "evidence": bytes]}
    device.revoke  {"device": public key, "reason": str}
    updates        {"gateway": str, "round": int, "task": str, "base": digest,
                    "records": [[device key, update digest, examples, device signature], ...]}
    aggregate      {"round": int, "strategy": str, "base": digest, "inputs": [update digests], "output": digest}
                   or, naming how the inputs were combined:
                   {"round", "strategy", "base", "rule": str, "inputs": [[update digest, weight or null], ...],
                    "output"[, "params": {...}]}  (params: what a recompute needs, see `_check_params`)
    checkpoint     {"count": int, "state": digest}
    lineage        {"model": digest, "version": int, "previous": digest or b"", "reason": str,
                    "architecture": str}
    contributions  {"round": int, "model": digest, "scores": [[device key, update digest, score], ...]}
    city.offer     {"epoch": int, "round": int, "model": digest, "aggregate": vertex id}
    city           {"epoch": int, "rule": str, "inputs": [[offer vertex id, model digest, weight or null], ...],
                    "output": digest[, "params": {...}]}
    mismatch       {"vertex": vertex id, "recomputed": digest or b"", "reason": str}
    mismatch.clear {"gateway": public key, "reason": str}

Bodies are deliberately compact: an update record is a 4-item list, not a
map, because there are thousands per round and each one stays on disk
forever.

A kind's body may grow an optional field, never change an old one: a vertex
is signed over its exact body, so every body ever written must stay valid.
`device.enroll` without `evidence` and `aggregate` without `rule` (or with
`rule` and without `params`) are the first forms of those kinds, and are still
accepted as they were.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from itertools import pairwise
from typing import Any

from protocol.digest import DIGEST_BYTES
from protocol.envelope import ID_MAX, Context, signed_bytes
from protocol.errors import ProtocolError, SchemaError
from protocol.fields import (
    check_bytes,
    check_fields,
    check_float,
    check_int,
    check_list,
    check_number,
    check_text,
    is_int,
)
from protocol.keys import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, identity_id
from protocol.rotation import MAX_STATEMENT_BYTES, KeyRotation
from protocol.schemas import MAX_EXAMPLES
from protocol.vouchers import MAX_VOUCHER_BYTES, Voucher

GENESIS = "genesis"
GATEWAY_JOIN = "gateway.join"
GATEWAY_LEAVE = "gateway.leave"
GATEWAY_ROTATE = "gateway.rotate"
DEVICE_ENROLL = "device.enroll"
DEVICE_REVOKE = "device.revoke"
UPDATES = "updates"
AGGREGATE = "aggregate"
CHECKPOINT = "checkpoint"
LINEAGE = "lineage"
CONTRIBUTIONS = "contributions"
CITY_OFFER = "city.offer"
CITY = "city"
MISMATCH = "mismatch"
MISMATCH_CLEAR = "mismatch.clear"

VOUCHER_POLICY = "voucher"  # the one enrollment policy whose evidence is not empty: the voucher's encoding
COORDINATE_RULE = "coordinate"  # an aggregate rule that decides per coordinate: its inputs carry no weight

MAX_GATEWAYS = 62  # members ever (each has a bit in a 64-bit SQLite integer for finality)
MAX_RECORDS = 10_000  # per updates vertex; a gateway records a bigger round in several batches
MAX_INPUTS = 50_000  # per aggregate
MAX_ROUND = 2**31 - 1  # as protocol.envelope.Context
NAME_MAX = 64
REASON_MAX = 256  # a revocation's reason, kept for auditors
STRATEGY_MAX = 256  # room for a user strategy's import path
ARCHITECTURE_MAX = 256  # a model architecture id (a hex digest in practice)
MAX_VERSION = 2**63 - 1  # a release version; fits SQLite's INTEGER
RECORD_FIELDS = 4  # [device public key, update digest, examples, device signature]
RULE_MAX = 32  # an aggregate's rule: "weighted", "selected", "coordinate" (gateway/provenance.py)
PARAMS_FIELDS = frozenset({"strategy", "wrappers", "sequence", "versions", "download"})  # an aggregate's `params`
DOWNLOAD_MAX = 16  # params.download: a delta codec name (protocol.tensors.DELTA_CODECS)
MAX_PARAMS = 64  # strategy constructor parameters (and software versions) recorded
PARAM_NAME_MAX = 64
PARAM_TEXT_MAX = 256
MAX_WRAPPERS = 8
MAX_PARAM_INT = 2**63 - 1
SCORE_FIELDS = 3  # [device public key, update digest, score]
CITY_RULES = ("weighted", "median")  # how a city epoch merges the gateways' models (gateway/city_merge.py)
CITY_INPUT_FIELDS = 3  # [offer vertex id, model digest, weight or null]
MAX_EPOCH = MAX_ROUND


def _genesis(body: dict[str, Any]) -> None:
    """The root: the DAG's name and its first gateways (their keys sorted bytewise, no duplicates)."""
    check_fields(body, {"name", "gateways"}, "genesis body")
    check_text(body["name"], "name", NAME_MAX, 1)
    gateways = check_list(body["gateways"], "gateways", MAX_GATEWAYS, 1)
    for key in gateways:
        check_bytes(key, "a gateway key", PUBLIC_KEY_BYTES)
    if any(a >= b for a, b in pairwise(gateways)):
        raise SchemaError("gateways must be sorted bytewise without duplicates")


def _gateway_join(body: dict[str, Any]) -> None:
    check_fields(body, {"gateway", "name"}, "gateway.join body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    check_text(body["name"], "name", NAME_MAX)


def _gateway_leave(body: dict[str, Any]) -> None:
    check_fields(body, {"gateway", "reason"}, "gateway.leave body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    check_text(body["reason"], "reason", REASON_MAX)


def _gateway_rotate(body: dict[str, Any]) -> None:
    """A gateway's key replaced: `statement` is the `protocol.rotation.KeyRotation` the devices follow, and
    must name the same two keys (whether its root key is the ledger's is a rule: `ledger.kind_rules`)."""
    check_fields(body, {"gateway", "next", "statement"}, "gateway.rotate body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    check_bytes(body["next"], "next", PUBLIC_KEY_BYTES)
    if not isinstance(body["statement"], bytes) or len(body["statement"]) > MAX_STATEMENT_BYTES:
        raise SchemaError(f"statement must be at most {MAX_STATEMENT_BYTES} bytes")
    rotation = KeyRotation.decode(body["statement"])
    if (rotation.old, rotation.new) != (body["gateway"], body["next"]):
        raise SchemaError("gateway.rotate: the statement names other keys than the vertex")


def _device_enroll(body: dict[str, Any]) -> None:
    """A device admitted under a policy, optionally with the evidence the policy admitted it on: under
    "voucher" the voucher's encoding (it must decode as a `protocol.vouchers.Voucher` naming this device;
    whether it admits the device is each gateway's question, under its own operator keys), under any other
    policy b"" (an allow-list entry is the key itself; "open" and an operator's by-hand enrollment have
    none). The first form of this kind has no `evidence` and stays valid."""
    fields = {"device", "name", "policy"}
    check_fields(body, fields | {"evidence"} if "evidence" in body else fields, "device.enroll body")
    check_bytes(body["device"], "device", PUBLIC_KEY_BYTES)
    check_text(body["name"], "name", NAME_MAX)
    check_text(body["policy"], "policy", NAME_MAX, 1)
    if "evidence" in body:
        _check_evidence(body["evidence"], body["policy"], body["device"])


def _check_evidence(evidence: Any, policy: str, device: bytes) -> None:
    if not isinstance(evidence, bytes):
        raise SchemaError("evidence must be bytes")
    if len(evidence) > MAX_VOUCHER_BYTES:
        raise SchemaError(f"evidence must be at most {MAX_VOUCHER_BYTES} bytes")
    if policy != VOUCHER_POLICY:
        if evidence:
            raise SchemaError(f"evidence must be empty under policy {policy!r} (only a voucher is carried)")
        return
    try:
        voucher = Voucher.decode(evidence)
    except ProtocolError as exc:
        raise SchemaError(f"evidence is not a voucher ({exc})") from exc
    if voucher.device != device:
        raise SchemaError("evidence is a voucher for another device key")


def _device_revoke(body: dict[str, Any]) -> None:
    check_fields(body, {"device", "reason"}, "device.revoke body")
    check_bytes(body["device"], "device", PUBLIC_KEY_BYTES)
    check_text(body["reason"], "reason", REASON_MAX)


def _updates(body: dict[str, Any]) -> None:
    """A batch of accepted updates: at most one record per device, each re-checkable from its fields alone
    (see `reply_signed_bytes`)."""
    check_fields(body, {"gateway", "round", "task", "base", "records"}, "updates body")
    check_text(body["gateway"], "gateway", ID_MAX, 1)
    check_int(body["round"], "round", 0, MAX_ROUND)
    check_text(body["task"], "task", ID_MAX)
    check_bytes(body["base"], "base", DIGEST_BYTES)
    records = check_list(body["records"], "records", MAX_RECORDS, 1)
    devices = set()
    for i, record in enumerate(records):
        check_list(record, f"record {i}", RECORD_FIELDS, RECORD_FIELDS)
        device, digest, examples, signature = record
        check_bytes(device, f"record {i} device", PUBLIC_KEY_BYTES)
        check_bytes(digest, f"record {i} digest", DIGEST_BYTES)
        check_int(examples, f"record {i} examples", 0, MAX_EXAMPLES)
        check_bytes(signature, f"record {i} signature", SIGNATURE_BYTES)
        if device in devices:
            raise SchemaError(f"record {i}: device {identity_id(device)} appears twice in the batch")
        devices.add(device)


def _aggregate(body: dict[str, Any]) -> None:
    """A round's new model (`output`), the model it started from (`base`) and the updates it was built from.

    With `rule` (how the strategy combined its inputs: "weighted", "selected", "coordinate", ...) each input
    is [update digest, effective weight]: a float in [0, 1], or null under the "coordinate" rule (the rule,
    not a weight, decided each coordinate). Without `rule`, the first form: the inputs are digests only.
    """
    fields = {"round", "strategy", "base", "inputs", "output"}
    if "rule" in body:
        fields |= {"rule", "params"} if "params" in body else {"rule"}  # params only with the second form
    check_fields(body, fields, "aggregate body")
    check_int(body["round"], "round", 0, MAX_ROUND)
    check_text(body["strategy"], "strategy", STRATEGY_MAX, 1)
    check_bytes(body["base"], "base", DIGEST_BYTES)
    inputs = check_list(body["inputs"], "inputs", MAX_INPUTS, 1)
    if "rule" in body:
        rule = check_text(body["rule"], "rule", RULE_MAX, 1)
        digests = []
        for i, item in enumerate(inputs):
            check_list(item, f"input {i}", 2, 2)
            digest, weight = item
            digests.append(check_bytes(digest, f"input {i} digest", DIGEST_BYTES))
            if rule == COORDINATE_RULE:
                if weight is not None:
                    raise SchemaError(f"input {i}: a coordinate rule's inputs carry no weight (null)")
            else:
                check_float(weight, f"input {i} weight", 0.0, 1.0)
    else:
        digests = [check_bytes(digest, f"input {i}", DIGEST_BYTES) for i, digest in enumerate(inputs)]
    if len(set(digests)) != len(digests):
        raise SchemaError("inputs name an update twice")
    check_bytes(body["output"], "output", DIGEST_BYTES)
    if "params" in body:
        _check_params(body["params"], len(inputs), body["rule"] == COORDINATE_RULE)


def _check_params(params: Any, inputs: int, coordinate: bool) -> None:
    """What a recompute needs beyond the inputs (gateway/recompute.py), an optional map:

        strategy  {name: scalar}   the strategy's constructor parameters as it ran (null, bool, int, float, text)
        wrappers  [class name]     what wrapped it, outermost first (DP, the update bound): absent when none
        sequence  [[input index, weight], ...]   every reply the strategy aggregated, in its order, with the
                                   weight Flower weighed it by (its "num-examples"; null under "coordinate"):
                                   float32 sums depend on their order, and byte-identical updates are one
                                   input but were aggregated once per reply. Absent: not replayable.
        versions  {name: text}     the software that computed it (flwr, numpy)
        download  text             the release is the base plus the aggregate's step rounded by this delta
                                   codec ("i8", "f16": gateway/releases.py); absent for a full release
    """
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise SchemaError("params must be a map with text keys")
    if set(params) - PARAMS_FIELDS or "strategy" not in params:
        raise SchemaError(f"params: keys are strategy and optionally {sorted(PARAMS_FIELDS - {'strategy'})}, "
                          f"got {sorted(params)}")
    _check_scalars(params["strategy"], "params.strategy", text_only=False)
    if "versions" in params:
        _check_scalars(params["versions"], "params.versions", text_only=True)
    if "download" in params:
        check_text(params["download"], "params.download", DOWNLOAD_MAX, 1)
    if "wrappers" in params:
        for name in check_list(params["wrappers"], "params.wrappers", MAX_WRAPPERS, 1):
            check_text(name, "a wrapper", STRATEGY_MAX, 1)
    if "sequence" in params:
        seen = set()
        for i, item in enumerate(check_list(params["sequence"], "params.sequence", MAX_INPUTS, 1)):
            check_list(item, f"sequence {i}", 2, 2)
            index, weight = item
            seen.add(check_int(index, f"sequence {i} input", 0, inputs - 1))
            if coordinate:
                if weight is not None:
                    raise SchemaError(f"sequence {i}: a coordinate rule weighs nothing (null)")
            else:
                check_number(weight, f"sequence {i} weight", 0.0, math.inf)
        if len(seen) != inputs:
            raise SchemaError("params.sequence leaves out an input")


def _check_scalars(value: Any, name: str, text_only: bool) -> None:
    if not isinstance(value, dict) or len(value) > MAX_PARAMS:
        raise SchemaError(f"{name} must be a map of at most {MAX_PARAMS} entries")
    for key, item in value.items():
        check_text(key, f"a key of {name}", PARAM_NAME_MAX, 1)
        where = f"{name}.{key}"
        if isinstance(item, str):
            check_text(item, where, PARAM_TEXT_MAX)
        elif text_only:
            raise SchemaError(f"{where} must be text")
        elif is_int(item):
            check_int(item, where, -MAX_PARAM_INT - 1, MAX_PARAM_INT)
        elif isinstance(item, float):
            check_float(item, where, -math.inf, math.inf)
        elif item is not None and not isinstance(item, bool):
            raise SchemaError(f"{where} must be null, a bool, a number or text")


def input_digests(body: dict[str, Any]) -> list[bytes]:
    """The update digests an aggregate body names, in either form."""
    return [item[0] for item in body["inputs"]] if "rule" in body else list(body["inputs"])


def input_weights(body: dict[str, Any]) -> list[tuple[bytes, float | None]]:
    """(update digest, effective weight or None) for each input of an aggregate body; None for every input
    of the first form (it recorded no weights)."""
    if "rule" in body:
        return [(digest, weight) for digest, weight in body["inputs"]]
    return [(digest, None) for digest in body["inputs"]]


def _checkpoint(body: dict[str, Any]) -> None:
    """The vertices in the checkpoint's causal past, and the SHA-256 of their `ledger.snapshot`."""
    check_fields(body, {"count", "state"}, "checkpoint body")
    check_int(body["count"], "count", 1, 2**62)
    check_bytes(body["state"], "state", DIGEST_BYTES)


def _lineage(body: dict[str, Any]) -> None:
    """Where a model lineage starts: its first model, the release version the gateway gave it, the last
    model of the lineage it replaces (b"" if none; it may equal `model`: a reset to the factory weights
    before any round ran restarts at the model it leaves), why, and the model's architecture id."""
    check_fields(body, {"model", "version", "previous", "reason", "architecture"}, "lineage body")
    check_bytes(body["model"], "model", DIGEST_BYTES)
    check_int(body["version"], "version", 0, MAX_VERSION)
    previous = body["previous"]  # empty bytes: the first lineage, nothing replaced
    if not isinstance(previous, bytes) or len(previous) not in (0, DIGEST_BYTES):
        raise SchemaError(f"previous must be {DIGEST_BYTES} bytes, or empty bytes when there was none")
    check_text(body["reason"], "reason", REASON_MAX, 1)
    check_text(body["architecture"], "architecture", ARCHITECTURE_MAX, 1)


def _contributions(body: dict[str, Any]) -> None:
    """Each accepted update's contribution score to a round's model (`model`: the aggregate's output).

    A big round is recorded in several vertices, at most MAX_RECORDS scores each; a (device, update) pair
    appears once per vertex. A score is a finite float, negative for an update against the round's way.
    """
    check_fields(body, {"round", "model", "scores"}, "contributions body")
    check_int(body["round"], "round", 0, MAX_ROUND)
    check_bytes(body["model"], "model", DIGEST_BYTES)
    scores = check_list(body["scores"], "scores", MAX_RECORDS, 1)
    seen = set()
    for i, item in enumerate(scores):
        check_list(item, f"score {i}", SCORE_FIELDS, SCORE_FIELDS)
        device, digest, score = item
        check_bytes(device, f"score {i} device", PUBLIC_KEY_BYTES)
        check_bytes(digest, f"score {i} digest", DIGEST_BYTES)
        check_float(score, f"score {i} score", -math.inf, math.inf)
        if (device, digest) in seen:
            raise SchemaError(f"score {i}: device {identity_id(device)}'s update is scored twice")
        seen.add((device, digest))


def _city_offer(body: dict[str, Any]) -> None:
    """A gateway offers its latest model to city epoch `epoch`: the output (`model`) of its `aggregate`
    vertex `aggregate` (round `round`). The ledger carries the offer; the model's bytes stay at the gateway
    (its blob store) for the other members to fetch by digest."""
    check_fields(body, {"epoch", "round", "model", "aggregate"}, "city.offer body")
    check_int(body["epoch"], "epoch", 1, MAX_EPOCH)
    check_int(body["round"], "round", 0, MAX_ROUND)
    check_bytes(body["model"], "model", DIGEST_BYTES)
    check_bytes(body["aggregate"], "aggregate", DIGEST_BYTES)


def _city(body: dict[str, Any]) -> None:
    """A city epoch's model (`output`), merged by `rule` from the offers it names: [offer vertex id, the
    offered model's digest, its weight] in the order they were merged. "weighted" gives each input its
    weight (the examples behind it, as the ledger records them); "median" decides per coordinate, its
    inputs carry no weight (null). `params`: scalars a recompute needs (the cap on examples, versions)."""
    fields = {"epoch", "rule", "inputs", "output"} | ({"params"} if "params" in body else set())
    check_fields(body, fields, "city body")
    check_int(body["epoch"], "epoch", 1, MAX_EPOCH)
    rule = check_text(body["rule"], "rule", RULE_MAX, 1)
    if rule not in CITY_RULES:
        raise SchemaError(f"rule must be one of {list(CITY_RULES)}, got {rule!r}")
    inputs = check_list(body["inputs"], "inputs", MAX_GATEWAYS, 1)
    offers = set()
    for i, item in enumerate(inputs):
        check_list(item, f"input {i}", CITY_INPUT_FIELDS, CITY_INPUT_FIELDS)
        offer, model, weight = item
        offers.add(check_bytes(offer, f"input {i} offer", DIGEST_BYTES))
        check_bytes(model, f"input {i} model", DIGEST_BYTES)
        if rule == "median":
            if weight is not None:
                raise SchemaError(f"input {i}: a median's inputs carry no weight (null)")
        else:
            check_number(weight, f"input {i} weight", 0.0, math.inf)
    if len(offers) != len(inputs):
        raise SchemaError("inputs name an offer twice")
    check_bytes(body["output"], "output", DIGEST_BYTES)
    if "params" in body:
        _check_scalars(body["params"], "params", text_only=False)


def _mismatch(body: dict[str, Any]) -> None:
    """Evidence: the writer recomputed the `aggregate` or `city` vertex `vertex` from its recorded inputs and
    got another model (`recomputed`; b"" when an input could not have made any model), for `reason`."""
    check_fields(body, {"vertex", "recomputed", "reason"}, "mismatch body")
    check_bytes(body["vertex"], "vertex", DIGEST_BYTES)
    recomputed = body["recomputed"]
    if not isinstance(recomputed, bytes) or len(recomputed) not in (0, DIGEST_BYTES):
        raise SchemaError(f"recomputed must be {DIGEST_BYTES} bytes, or empty bytes when no model came out")
    check_text(body["reason"], "reason", REASON_MAX, 1)


def _mismatch_clear(body: dict[str, Any]) -> None:
    """The operator's answer to mismatch evidence against `gateway` (signed by the root key): the evidence
    in this vertex's causal past no longer keeps the gateway's models out of the city."""
    check_fields(body, {"gateway", "reason"}, "mismatch.clear body")
    check_bytes(body["gateway"], "gateway", PUBLIC_KEY_BYTES)
    check_text(body["reason"], "reason", REASON_MAX, 1)


KINDS: dict[str, Callable[[dict[str, Any]], None]] = {
    GENESIS: _genesis,
    GATEWAY_JOIN: _gateway_join,
    GATEWAY_LEAVE: _gateway_leave,
    GATEWAY_ROTATE: _gateway_rotate,
    DEVICE_ENROLL: _device_enroll,
    DEVICE_REVOKE: _device_revoke,
    UPDATES: _updates,
    AGGREGATE: _aggregate,
    CHECKPOINT: _checkpoint,
    LINEAGE: _lineage,
    CONTRIBUTIONS: _contributions,
    CITY_OFFER: _city_offer,
    CITY: _city,
    MISMATCH: _mismatch,
    MISMATCH_CLEAR: _mismatch_clear,
}


def check_kind(name: Any) -> None:
    """Raise SchemaError unless `name` is a kind of vertex."""
    _schema_of(name)


def check_body(kind: str, body: Any) -> None:
    """Schema-check a body for its kind. Raises ProtocolError subclasses."""
    schema = _schema_of(kind)
    if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
        raise SchemaError("body must be a map with text keys")
    schema(body)


def _schema_of(name: Any) -> Callable[[dict[str, Any]], None]:
    try:
        return KINDS[name]
    except (KeyError, TypeError):
        raise SchemaError(f"unknown vertex kind {name!r}") from None


def reply_signed_bytes(
    device: bytes, gateway: str, round: int, task: str, base: bytes, digest: bytes, examples: int
) -> bytes:
    """The bytes a device signed when it sent the reply an update record stands for: the "reply"
    envelope with context (device, gateway, round, task, base) and body {"digest", "examples"}."""
    ctx = Context(sender=device, gateway=gateway, round=round, task=task, base=base)
    return signed_bytes("reply", ctx, {"digest": digest, "examples": examples})
