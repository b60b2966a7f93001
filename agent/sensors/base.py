"""The sensor driver interface: a few named channels, read one sample at a time."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class SensorError(Exception):
    """A sensor is missing, answers wrongly or gives no more data; the message says which and why."""


class Sensor(Protocol):
    name: str
    channels: tuple[str, ...]  # what read() returns, in order, with units: ("ax_g", "ay_g", ...)
    rate_hz: float  # the rate it is meant to be read at

    def read(self) -> np.ndarray:
        """One sample: float32 values, one per channel. Raises SensorError."""

    def close(self) -> None: ...
