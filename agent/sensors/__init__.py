"""Sensors: where a device's samples come from.

    base.py      the driver interface (`Sensor`) and `SensorError`
    replay.py    recorded samples from a CSV or NPZ file, at their own rate
    mpu6050.py   InvenSense MPU-6050 accelerometer + gyroscope over I2C (smbus2)
    bme280.py    Bosch BME280 temperature, pressure, humidity over I2C (smbus2)

`open_sensor(kind, **options)` builds one from the agent's config. The I2C
drivers take any object with smbus2's `SMBus` methods, so tests and the
emulator hand them `hw.simbus.SimulatedBus`, which answers like the chips'
datasheet registers.
"""

from __future__ import annotations

from typing import Any

from .base import Sensor, SensorError

__all__ = ["Sensor", "SensorError", "open_sensor"]


def open_sensor(kind: str, **options: Any) -> Sensor:
    """A sensor of `kind` ("replay", "mpu6050", "bme280"); I2C ones open /dev/i2c-<bus> unless given a `bus`."""
    if kind == "replay":
        from .replay import ReplaySensor

        return ReplaySensor(**options)
    if kind in ("mpu6050", "bme280"):
        bus = options.pop("bus", None)
        if bus is None:
            try:
                from smbus2 import SMBus
            except ImportError as exc:  # the agent extra installs it; say so plainly if it is missing
                raise SensorError(f"{kind}: smbus2 is not installed (pip install smbus2)") from exc
            number = options.pop("i2c_bus", 1)
            try:
                bus = SMBus(number)
            except OSError as exc:
                raise SensorError(f"{kind}: cannot open /dev/i2c-{number}: {exc.strerror or exc}") from exc
        if kind == "mpu6050":
            from .mpu6050 import Mpu6050

            return Mpu6050(bus, **options)
        from .bme280 import Bme280

        return Bme280(bus, **options)
    raise SensorError(f"unknown sensor kind {kind!r}: replay, mpu6050 or bme280")
