"""A city epoch's merge: the gateways' models into one, by Flower's own aggregation, the same everywhere.

    weights = merge("weighted", [(model, examples), ...])   # FedAvg's aggregate_train, in this order
    weights = merge("median", [(model, None), ...])          # FedMedian's: coordinate-wise median
    verdict = verify_city(body, fetch)                       # a `city` vertex recomputed from its inputs

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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from protocol import schemas
from protocol.digest import sha256
from protocol.errors import ProtocolError

from .grid import NUM_EXAMPLES
from .recompute import Verdict, digest_of, reply_messages

RULES = {"weighted": "FedAvg", "median": "FedMedian"}


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


def verify_city(body: dict[str, Any], fetch: Callable[[bytes], bytes | None]) -> Verdict:
    """Recompute a `city` vertex body from its inputs' models (`fetch(digest)`: the bytes, or None when not at
    hand) and compare with its output. A model whose bytes do not hash to its digest counts as missing."""
    output = body["output"]
    models = []
    for _, digest, weight in body["inputs"]:
        data = fetch(digest)
        if data is None or sha256(data) != digest:
            return Verdict(False, output, None, f"model {digest.hex()[:16]} is not at hand", "missing_inputs")
        try:
            models.append((schemas.decode_model(data), weight))
        except ProtocolError as exc:
            return Verdict(False, output, None, f"model {digest.hex()[:16]} does not decode: {exc}", "mismatch")
    try:
        got = digest_of(merge(body["rule"], models))
    except ValueError as exc:
        return Verdict(False, output, None, f"no city model comes of these inputs: {exc}", "mismatch")
    if got == output:
        return Verdict(True, output, got, "recomputed bit for bit", "match")
    return Verdict(False, output, got, "the recomputed city model differs from the recorded output", "mismatch")
