"""The agent's config: the release freeze window."""

from __future__ import annotations

import pytest

from agent.config import DEFAULT_FREEZE_WINDOW_S, ConfigError, parse_config


def doc(**model) -> dict:
    return {"device": {"name": "d", "key": "k", "state_dir": "s"},
            "gateway": {"id": "0" * 32, "public_key": "ab" * 32}, "data": {"replay": "x.npz"},
            "model": {"name": "imu_cnn", **model}}


def test_the_freeze_window_defaults_to_a_day_and_takes_an_integer():
    assert parse_config(doc()).freeze_window_s == DEFAULT_FREEZE_WINDOW_S == 86400.0
    assert parse_config(doc(freeze_window_s=7200)).freeze_window_s == 7200.0


@pytest.mark.parametrize("value", [0, -1.0, 599.0, 366 * 86400.0])
def test_a_freeze_window_out_of_bounds_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"model\.freeze_window_s must be between 600 and 31536000 seconds"):
        parse_config(doc(freeze_window_s=value))


@pytest.mark.parametrize("value", ["1d", True, float("inf")])
def test_a_freeze_window_of_the_wrong_kind_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match=r"model\.freeze_window_s"):
        parse_config(doc(freeze_window_s=value))
