"""Strategy options travel in the task's config, as scalars with limits."""

from __future__ import annotations

import pytest

from protocol import schemas
from protocol.errors import LimitExceeded, ProtocolError, SchemaError


def test_options_round_trip():
    config = schemas.TrainConfig(2, 32, 0.1, 0.0, {"proximal-mu": 0.1, "clipping_norm": 1, "mode": "x", "on": True})
    assert schemas.TrainConfig.from_wire(config.to_wire()) == config


@pytest.mark.parametrize("options, error", [
    ({"k": [1, 2]}, SchemaError),
    ({"k": {"a": 1}}, SchemaError),
    ({"": 1}, SchemaError),
    ({f"k{i}": i for i in range(17)}, LimitExceeded),
    ({"k": float("nan")}, ProtocolError),
    ("not a map", SchemaError),
])
def test_bad_options_are_refused(options, error):
    wire = {**schemas.TrainConfig().to_wire(), "options": options}
    with pytest.raises(error):
        schemas.TrainConfig.from_wire(wire)
