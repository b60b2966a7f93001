"""Bosch BME280 (temperature, pressure, humidity) over I2C, from its datasheet (BST-BME280-DS002).

Each chip carries its own calibration words (0x88-0xA1, 0xE1-0xE7); the raw
20-bit temperature and pressure and 16-bit humidity (0xF7-0xFE, one burst
read) become physical values through the datasheet's compensation formulas
(section 8.1, double precision). Forced mode: one measurement per read.
Channels: temperature in deg C, pressure in hPa, relative humidity in %.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import SensorError

CHIP_ID_REG = 0xD0
CHIP_ID = 0x60
CTRL_HUM = 0xF2
STATUS = 0xF3
CTRL_MEAS = 0xF4
CONFIG = 0xF5
DATA = 0xF7
CALIB_TP = 0x88
CALIB_H1 = 0xA1
CALIB_H = 0xE1


@dataclass(frozen=True)
class Calibration:
    T1: int
    T2: int
    T3: int
    P1: int
    P2: int
    P3: int
    P4: int
    P5: int
    P6: int
    P7: int
    P8: int
    P9: int
    H1: int
    H2: int
    H3: int
    H4: int
    H5: int
    H6: int

    @classmethod
    def parse(cls, tp: bytes, h1: int, h: bytes) -> Calibration:
        t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9 = struct.unpack("<HhhHhhhhhhhh", tp[:24])
        h2, h3 = struct.unpack("<hB", h[:3])
        h4 = (_signed8(h[3]) << 4) | (h[4] & 0x0F)  # 12 bits: 0xE4 [11:4], 0xE5 [3:0]
        h5 = (_signed8(h[5]) << 4) | (h[4] >> 4)  # 12 bits: 0xE6 [11:4], 0xE5 [7:4]
        return cls(t1, t2, t3, p1, p2, p3, p4, p5, p6, p7, p8, p9, h1, h2, h3, h4, h5, _signed8(h[6]))


def _signed8(value: int) -> int:
    return value - 256 if value > 127 else value


def compensate(cal: Calibration, adc_t: int, adc_p: int, adc_h: int) -> tuple[float, float, float]:
    """(deg C, Pa, %RH) from raw readings: the datasheet's floating-point formulas."""
    var1 = (adc_t / 16384.0 - cal.T1 / 1024.0) * cal.T2
    var2 = (adc_t / 131072.0 - cal.T1 / 8192.0) ** 2 * cal.T3
    t_fine = var1 + var2
    temperature = t_fine / 5120.0

    var1 = t_fine / 2.0 - 64000.0
    var2 = var1 * var1 * cal.P6 / 32768.0
    var2 = var2 + var1 * cal.P5 * 2.0
    var2 = var2 / 4.0 + cal.P4 * 65536.0
    var1 = (cal.P3 * var1 * var1 / 524288.0 + cal.P2 * var1) / 524288.0
    var1 = (1.0 + var1 / 32768.0) * cal.P1
    if var1 == 0:
        pressure = 0.0  # the datasheet's guard against dividing by zero
    else:
        pressure = 1048576.0 - adc_p
        pressure = (pressure - var2 / 4096.0) * 6250.0 / var1
        var1 = cal.P9 * pressure * pressure / 2147483648.0
        var2 = pressure * cal.P8 / 32768.0
        pressure = pressure + (var1 + var2 + cal.P7) / 16.0

    h = t_fine - 76800.0
    h = (adc_h - (cal.H4 * 64.0 + cal.H5 / 16384.0 * h)) * (
        cal.H2 / 65536.0 * (1.0 + cal.H6 / 67108864.0 * h * (1.0 + cal.H3 / 67108864.0 * h))
    )
    h = h * (1.0 - cal.H1 * h / 524288.0)
    return temperature, pressure, min(100.0, max(0.0, h))


class Bme280:
    channels = ("temperature_c", "pressure_hpa", "humidity_pct")

    def __init__(self, bus: Any, address: int = 0x76, rate_hz: float = 1.0, timeout_s: float = 0.1) -> None:
        if not 0 < rate_hz <= 25:
            raise SensorError("bme280: rate_hz must be above 0 and at most 25 (forced mode)")
        self.bus, self.address, self.rate_hz, self.timeout_s = bus, address, rate_hz, timeout_s
        self.name = f"bme280@{address:#04x}"
        try:
            found = bus.read_byte_data(address, CHIP_ID_REG)
            if found != CHIP_ID:
                raise SensorError(f"{self.name}: chip id is {found:#04x}, not a BME280 ({CHIP_ID:#04x})")
            tp = bytes(bus.read_i2c_block_data(address, CALIB_TP, 24))
            h1 = bus.read_byte_data(address, CALIB_H1)
            h = bytes(bus.read_i2c_block_data(address, CALIB_H, 7))
            bus.write_byte_data(address, CTRL_HUM, 0x01)  # humidity x1 (takes effect with CTRL_MEAS)
            bus.write_byte_data(address, CONFIG, 0x00)  # no IIR filter: each forced read stands alone
        except OSError as exc:
            raise SensorError(f"{self.name}: no answer on the I2C bus ({exc.strerror or exc})") from exc
        self.calibration = Calibration.parse(tp, h1, h)

    def read(self) -> np.ndarray:
        try:
            self.bus.write_byte_data(self.address, CTRL_MEAS, (0b001 << 5) | (0b001 << 2) | 0b01)  # T x1, P x1, forced
            end = time.monotonic() + self.timeout_s
            while self.bus.read_byte_data(self.address, STATUS) & 0x08:  # measuring
                if time.monotonic() > end:
                    raise SensorError(f"{self.name}: measurement did not finish within {self.timeout_s} s")
                time.sleep(0.002)
            raw = bytes(self.bus.read_i2c_block_data(self.address, DATA, 8))
        except OSError as exc:
            raise SensorError(f"{self.name}: read failed ({exc.strerror or exc})") from exc
        adc_p = (raw[0] << 12) | (raw[1] << 4) | (raw[2] >> 4)
        adc_t = (raw[3] << 12) | (raw[4] << 4) | (raw[5] >> 4)
        adc_h = (raw[6] << 8) | raw[7]
        if adc_t == 0x80000 or adc_p == 0x80000:  # the reset value: the chip skipped the measurement
            raise SensorError(f"{self.name}: no measurement (raw data at its reset value)")
        temperature, pressure, humidity = compensate(self.calibration, adc_t, adc_p, adc_h)
        return np.array([temperature, pressure / 100.0, humidity], dtype=np.float32)

    def close(self) -> None:
        pass
