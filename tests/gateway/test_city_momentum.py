"""Slow momentum in the city merge: what a `city` vertex records, how anyone recomputes it, and which earlier
city models it may name."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.city_merge import Momentum, city_model, merge, momentum_problem, verify_city, with_momentum
from gateway.recompute import digest_of
from protocol import schemas
from protocol.digest import sha256


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w": rng.normal(size=(6, 3)).astype(np.float32), "b": rng.normal(size=(3,)).astype(np.float32)}


def stored(*models: dict[str, np.ndarray]) -> tuple[dict[bytes, bytes], list[bytes]]:
    blobs = {}
    for m in models:
        data = schemas.encode_model(m)
        blobs[sha256(data)] = data
    return blobs, list(blobs)


def body_with(blobs_digests, beta=0.6, output=None) -> dict:
    (a, b, previous, before) = blobs_digests
    body = {"epoch": 3, "rule": "weighted", "inputs": [[b"\x01" * 32, a, 10.0], [b"\x02" * 32, b, 30.0]],
            "output": b"", "params": Momentum(beta, previous, before).params()}
    return body


def test_momentum_adds_beta_times_the_last_city_step_in_float32():
    merged, previous, before = model(1), model(2), model(3)
    out = with_momentum(merged, 0.6, previous, before)
    for k in merged:
        assert out[k].dtype == np.float32
        expected = merged[k] + np.float32(0.6) * (previous[k] - before[k])
        assert np.array_equal(out[k], expected)
    assert not np.array_equal(out["w"], merged["w"])
    with pytest.raises(ValueError, match="tensors"):
        with_momentum(merged, 0.6, {"w": previous["w"]}, before)


def test_a_city_vertex_with_momentum_recomputes_from_its_inputs_and_its_two_earlier_models():
    a, b, previous, before = model(1), model(2), model(3), model(4)
    blobs, digests = stored(a, b, previous, before)
    body = body_with(digests)
    expected = with_momentum(merge("weighted", [(a, 10.0), (b, 30.0)]), 0.6, previous, before)
    body["output"] = digest_of(expected)
    assert digest_of(city_model(body, blobs.get)) == body["output"]
    assert verify_city(body, blobs.get).status == "match"
    # The plain merge of the same inputs is another model: a vertex that claims momentum it did not add fails.
    plain = dict(body, output=digest_of(merge("weighted", [(a, 10.0), (b, 30.0)])))
    assert verify_city(plain, blobs.get).status == "mismatch"
    # An earlier model not at hand is missing, not a mismatch.
    without = {d: v for d, v in blobs.items() if d != digests[3]}
    assert verify_city(body, without.get).status == "missing_inputs"


@pytest.mark.parametrize("params, problem", [
    ({"momentum": 1.0, "previous": "00" * 32, "before": "00" * 32}, "between 0 and 1"),
    ({"momentum": 0, "previous": "00" * 32, "before": "00" * 32}, "between 0 and 1"),
    ({"momentum": 0.5, "previous": "zz" * 32, "before": "00" * 32}, "params.previous"),
    ({"momentum": 0.5, "previous": "00" * 32}, "params.before"),
])
def test_malformed_momentum_params_are_a_mismatch_with_the_reason(params, problem):
    a, b = model(1), model(2)
    blobs, digests = stored(a, b)
    body = {"epoch": 3, "rule": "weighted", "inputs": [[b"\x01" * 32, digests[0], 1.0], [b"\x02" * 32, digests[1], 1.0]],
            "output": b"\x00" * 32, "params": params}
    verdict = verify_city(body, blobs.get)
    assert verdict.status == "mismatch" and problem in verdict.reason
    assert problem in momentum_problem(body, lambda epoch: {})


def test_momentum_may_name_only_one_gateways_city_models_of_the_two_epochs_before():
    p1, b1, p2, b2 = (bytes([n]) * 32 for n in (1, 2, 3, 4))
    outputs = {2: {"gw-1": p1, "gw-2": p2}, 1: {"gw-1": b1, "gw-2": b2}}
    on_ledger = lambda epoch: outputs.get(epoch, {})  # noqa: E731
    body = {"epoch": 3, "params": Momentum(0.5, p1, b1).params()}
    assert momentum_problem(body, on_ledger) is None
    assert momentum_problem({"epoch": 3, "params": Momentum(0.5, p2, b2).params()}, on_ledger) is None  # adopted
    assert "not one gateway's" in momentum_problem({"epoch": 3, "params": Momentum(0.5, p1, b2).params()}, on_ledger)
    assert "not one gateway's" in momentum_problem({"epoch": 4, "params": Momentum(0.5, p1, b1).params()}, on_ledger)
    assert "not one gateway's" in momentum_problem({"epoch": 2, "params": Momentum(0.5, b1, p1).params()}, on_ledger)
    assert momentum_problem({"epoch": 3, "params": {"max_examples": 10}}, on_ledger) is None  # no momentum
