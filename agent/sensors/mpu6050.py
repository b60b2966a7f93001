"""InvenSense MPU-6050 (accelerometer + gyroscope) over I2C, from its register map (RM-MPU-6000A).

Channels match the IMU model's training data: acceleration in g, angular
rate in rad/s, in the order ax, ay, az, gx, gy, gz. One burst read of the 14
bytes from ACCEL_XOUT_H (0x3B) gives a consistent sample (accel, temperature,
gyro as big-endian int16).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np

from .base import SensorError

WHO_AM_I = 0x75
PWR_MGMT_1 = 0x6B
SMPLRT_DIV = 0x19
CONFIG = 0x1A
GYRO_CONFIG = 0x1B
ACCEL_CONFIG = 0x1C
ACCEL_XOUT_H = 0x3B
CHIP_ID = 0x68
ACCEL_LSB_PER_G = {2: 16384.0, 4: 8192.0, 8: 4096.0, 16: 2048.0}  # full scale (g) -> LSB/g
GYRO_LSB_PER_DPS = {250: 131.0, 500: 65.5, 1000: 32.8, 2000: 16.4}  # full scale (deg/s) -> LSB/(deg/s)


class Mpu6050:
    channels = ("ax_g", "ay_g", "az_g", "gx_rad_s", "gy_rad_s", "gz_rad_s")

    def __init__(self, bus: Any, address: int = 0x68, rate_hz: float = 50.0, accel_range_g: int = 2,
                 gyro_range_dps: int = 250) -> None:
        if accel_range_g not in ACCEL_LSB_PER_G or gyro_range_dps not in GYRO_LSB_PER_DPS:
            raise SensorError(f"mpu6050: ranges are {sorted(ACCEL_LSB_PER_G)} g and {sorted(GYRO_LSB_PER_DPS)} deg/s")
        if not 4 <= rate_hz <= 1000:
            raise SensorError("mpu6050: rate_hz must be 4 to 1000")
        self.bus, self.address, self.rate_hz = bus, address, rate_hz
        self.name = f"mpu6050@{address:#04x}"
        self._accel_scale = ACCEL_LSB_PER_G[accel_range_g]
        self._gyro_scale = GYRO_LSB_PER_DPS[gyro_range_dps] * 180.0 / math.pi  # LSB per rad/s
        try:
            found = self.bus.read_byte_data(address, WHO_AM_I)
            if found & 0x7E != CHIP_ID & 0x7E:  # bits 6:1 hold the address without its AD0 bit
                raise SensorError(f"{self.name}: WHO_AM_I is {found:#04x}, not an MPU-6050 ({CHIP_ID:#04x})")
            self.bus.write_byte_data(address, PWR_MGMT_1, 0x01)  # wake up, clock from the X gyro's PLL
            self.bus.write_byte_data(address, CONFIG, 0x03)  # digital low-pass ~44 Hz: gyro output at 1 kHz
            self.bus.write_byte_data(address, SMPLRT_DIV, max(0, min(255, round(1000 / rate_hz) - 1)))
            self.bus.write_byte_data(address, GYRO_CONFIG, list(GYRO_LSB_PER_DPS).index(gyro_range_dps) << 3)
            self.bus.write_byte_data(address, ACCEL_CONFIG, list(ACCEL_LSB_PER_G).index(accel_range_g) << 3)
        except OSError as exc:
            raise SensorError(f"{self.name}: no answer on the I2C bus ({exc.strerror or exc})") from exc

    def _burst(self) -> tuple[int, ...]:
        try:
            data = bytes(self.bus.read_i2c_block_data(self.address, ACCEL_XOUT_H, 14))
        except OSError as exc:
            raise SensorError(f"{self.name}: read failed ({exc.strerror or exc})") from exc
        if len(data) != 14:
            raise SensorError(f"{self.name}: read {len(data)} bytes, expected 14")
        return struct.unpack(">7h", data)

    def read(self) -> np.ndarray:
        ax, ay, az, _temp, gx, gy, gz = self._burst()
        return np.array([ax / self._accel_scale, ay / self._accel_scale, az / self._accel_scale,
                         gx / self._gyro_scale, gy / self._gyro_scale, gz / self._gyro_scale], dtype=np.float32)

    def temperature_c(self) -> float:
        """Die temperature: TEMP_OUT / 340 + 36.53 (register map, section 4.18)."""
        return self._burst()[3] / 340.0 + 36.53

    def close(self) -> None:
        try:
            self.bus.write_byte_data(self.address, PWR_MGMT_1, 0x40)  # back to sleep
        except OSError:
            pass
