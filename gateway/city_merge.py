"""A city epoch's merge: the gateways' models into one, by Flower's own aggregation, the same everywhere.

    weights = merge("weighted", [(model, examples), ...])   # FedAvg's aggregate_train, in this order
    weights = merge("median", [(model, None), ...])          # FedMedian's: coordinate-wise median
    weights = with_momentum(weights, 0.6, previous, before)  # + 0.6 x (city model e-1 - city model e-2)
    weights = city_model(body, fetch)                        # a `city` vertex's model from its inputs
    verdict = verify_city(body, fetch)                       # ... and its digest against the recorded output

Every gateway runs the merge itself on the same models in the same order
(the offers sorted by gateway id, as `ledger.offers` lists them), so every
gateway gets the same bits: FedAvg's sum is elementwise float32 multiply and
add in the order given, FedMedian is order-free (gateway/recompute.py, the
README's "Verifiable aggregation", says which platforms were measured). The
`city` vertex records the inputs in merge order with their weights, which is
all a recompute needs.

    rule       Flower strategy   an input weighs
    weighted   FedAvg            the examples behind its model (the ledger's records, capped)
    median     FedMedian         nothing: each coordinate is the median of the gateways' values

Slow momentum (`[city] momentum`, beta; SlowMo, Wang et al., ICLR 2020): the
gateways train several rounds apart between epochs, each on its own
neighbourhood, so a plain mean of their models moves the city less than
training together would. With momentum the merge adds beta x (the city model
of epoch e-1 - the city model of epoch e-2), both this gateway's own merges:
the city model keeps part of its last step. The `city` vertex then records
`momentum` (beta) and `previous` / `before` (those two models' digests, hex)
in its params; a recompute fetches them like the inputs, and `momentum_problem`
checks on the ledger that they are one gateway's merges of those two epochs
(any other pair would let a gateway steer the city where it likes). Without
both models at hand (the first two epochs, an epoch merged alone) the merge is
the plain one and records no momentum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from protocol import schemas
from protocol.digest import sha256
from protocol.errors import ProtocolError

from .grid import NUM_EXAMPLES
from .recompute import Verdict, digest_of, reply_messages

RULES = {"weighted": "FedAvg", "median": "FedMedian"}
MOMENTUM, PREVIOUS, BEFORE = "momentum", "previous", "before"  # a `city` vertex's params, with momentum


class MissingModel(Exception):
    """A model a city merge needs is not at hand (or its bytes do not hash to its digest)."""


@dataclass(frozen=True)
class Momentum:
    beta: float  # 0 < beta < 1
    previous: bytes  # the digest of the writer's city model of epoch e-1 ...
    before: bytes  # ... and of epoch e-2

    def params(self) -> dict[str, Any]:
        return {MOMENTUM: self.beta, PREVIOUS: self.previous.hex(), BEFORE: self.before.hex()}

    @classmethod
    def of(cls, body: dict[str, Any]) -> Momentum | None:
        """What a `city` vertex body records (None: no momentum); ValueError when its params are malformed."""
        params = body.get("params") or {}
        if MOMENTUM not in params:
            return None
        beta, previous, before = params.get(MOMENTUM), params.get(PREVIOUS), params.get(BEFORE)
        if not isinstance(beta, float) or not 0.0 < beta < 1.0:
            raise ValueError(f"params.{MOMENTUM} must be a number between 0 and 1, got {beta!r}")
        digests = []
        for name, value in ((PREVIOUS, previous), (BEFORE, before)):
            try:
                digest = bytes.fromhex(value) if isinstance(value, str) else b""
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"params.{name} must be a model digest (hex), got {value!r}")
            digests.append(digest)
        return cls(beta, digests[0], digests[1])


def merge(rule: str, models: list[tuple[dict[str, np.ndarray], float | None]]) -> dict[str, np.ndarray]:
    """The city model of `models` ((weights, examples or None) in merge order) by `rule`. ValueError for an
    unknown rule, no models, models that do not have the same tensors, or weights that are not positive."""
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp import strategy as flower

    if rule not in RULES:
        raise ValueError(f"the city's merge rule must be one of {sorted(RULES)}, got {rule!r}")
    if not models:
        raise ValueError("nothing to merge")
    names = {k: np.shape(v) for k, v in models[0][0].items()}
    contents = []
    for weights, examples in models:
        if {k: np.shape(v) for k, v in weights.items()} != names:
            raise ValueError("the models to merge do not have the same tensors")
        weight = 1.0 if rule == "median" else float(examples or 0.0)
        if not weight > 0:
            raise ValueError("every model of a weighted merge weighs more than nothing")
        arrays = ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in weights.items()})
        contents.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({NUM_EXAMPLES: weight})}))
    strategy = getattr(flower, RULES[rule])(weighted_by_key=NUM_EXAMPLES)
    arrays, _ = strategy.aggregate_train(1, reply_messages(contents))
    if arrays is None:
        raise ValueError(f"{RULES[rule]} made no model of these inputs")
    return {k: np.asarray(v.numpy(), dtype=np.float32) for k, v in arrays.items()}


def with_momentum(weights: dict[str, np.ndarray], beta: float, previous: dict[str, np.ndarray],
                  before: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """weights + beta x (previous - before), elementwise in float32 (the same bits everywhere). ValueError when
    the three models do not have the same tensors."""
    shapes = {k: np.shape(v) for k, v in weights.items()}
    for model in (previous, before):
        if {k: np.shape(v) for k, v in model.items()} != shapes:
            raise ValueError("the momentum's city models do not have the merged model's tensors")
    factor = np.float32(beta)
    return {k: np.asarray(w + factor * (np.asarray(previous[k], np.float32) - np.asarray(before[k], np.float32)),
                          dtype=np.float32) for k, w in weights.items()}


def momentum_problem(body: dict[str, Any], city_outputs: Callable[[int], dict[str, bytes]]) -> str | None:
    """Why a `city` vertex's momentum is not one gateway's own merges of the two epochs before (None: it is, or
    it has none). `city_outputs(epoch)`: {gateway: the model it merged that epoch}, from the ledger. The
    writer's own pair, or the pair of the member whose merge it adopted; each of those merges is itself
    recomputed by every auditor, so no gateway can name models the city did not make."""
    try:
        momentum = Momentum.of(body)
    except ValueError as exc:
        return str(exc)
    if momentum is None:
        return None
    epoch = body["epoch"]
    previous, before = city_outputs(epoch - 1), city_outputs(epoch - 2)
    if not any(previous.get(g) == momentum.previous and before.get(g) == momentum.before for g in previous):
        return (f"its momentum names {momentum.previous.hex()[:16]} and {momentum.before.hex()[:16]}, not one "
                f"gateway's city models of epochs {epoch - 1} and {epoch - 2}")
    return None


def _decoded(fetch: Callable[[bytes], bytes | None], digest: bytes) -> dict[str, np.ndarray]:
    data = fetch(digest)
    if data is None or sha256(data) != digest:
        raise MissingModel(f"model {digest.hex()[:16]} is not at hand")
    try:
        return schemas.decode_model(data)
    except ProtocolError as exc:
        raise ValueError(f"model {digest.hex()[:16]} does not decode: {exc}") from exc


def city_model(body: dict[str, Any], fetch: Callable[[bytes], bytes | None]) -> dict[str, np.ndarray]:
    """A `city` vertex body's model from its inputs' models (`fetch(digest)`: the bytes, or None when not at
    hand) and its momentum's. MissingModel when one is not at hand; ValueError when no model comes of them."""
    momentum = Momentum.of(body)
    models = [(_decoded(fetch, digest), weight) for _, digest, weight in body["inputs"]]
    weights = merge(body["rule"], models)
    if momentum is not None:
        weights = with_momentum(weights, momentum.beta, _decoded(fetch, momentum.previous),
                                _decoded(fetch, momentum.before))
    return weights


def verify_city(body: dict[str, Any], fetch: Callable[[bytes], bytes | None]) -> Verdict:
    """Recompute a `city` vertex body (`city_model`) and compare with its output. A model whose bytes do not
    hash to its digest counts as missing."""
    output = body["output"]
    try:
        got = digest_of(city_model(body, fetch))
    except MissingModel as exc:
        return Verdict(False, output, None, str(exc), "missing_inputs")
    except ValueError as exc:
        return Verdict(False, output, None, f"no city model comes of these inputs: {exc}", "mismatch")
    if got == output:
        return Verdict(True, output, got, "recomputed bit for bit", "match")
    return Verdict(False, output, got, "the recomputed city model differs from the recorded output", "mismatch")
