"""A simulated I2C bus whose chips answer like their datasheets' registers.

`SimulatedBus` has the smbus2 `SMBus` methods the drivers use; each address
holds a register file. An address with no chip raises OSError(EREMOTEIO), as
Linux's i2c-dev does. Two chips:

- `SimMpu6050`: WHO_AM_I 0x68, asleep after reset (data registers read 0
  until PWR_MGMT_1 clears SLEEP), data encoded from physical values with the
  full-scale ranges the driver writes to GYRO_CONFIG / ACCEL_CONFIG, and the
  temperature as (T - 36.53) * 340 (register map RM-MPU-6000A).
- `SimBme280`: chip id 0x60, calibration words at 0x88-0xA1 / 0xE1-0xE7, raw
  data at its reset value 0x80000 until a forced measurement is started in
  CTRL_MEAS, STATUS "measuring" for one poll after that. `datasheet_example()`
  loads the worked example of Bosch's BMP280 datasheet (same temperature and
  pressure formulas as the BME280): adc_T 519888 -> 25.08 deg C, adc_P 415148
  -> 100653.27 Pa.

For tests and for emulated devices; no hardware needed.
"""

from __future__ import annotations

import errno
import struct


class RegisterFile:
    """A chip as 256 byte registers; subclasses react to reads and writes."""

    def __init__(self) -> None:
        self.registers = bytearray(256)
        self.writes: list[tuple[int, int]] = []

    def read(self, register: int, length: int) -> bytes:
        return bytes(self.registers[register:register + length])

    def write(self, register: int, value: int) -> None:
        self.writes.append((register, value))
        self.registers[register] = value & 0xFF


class SimulatedBus:
    """The smbus2.SMBus methods the Starling drivers call, over simulated chips."""

    def __init__(self, chips: dict[int, RegisterFile]) -> None:
        self.chips = chips
        self.closed = False

    def _chip(self, address: int) -> RegisterFile:
        if self.closed:
            raise OSError(errno.EBADF, "bus closed")
        chip = self.chips.get(address)
        if chip is None:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")  # what i2c-dev says when nobody ACKs
        return chip

    def read_byte_data(self, address: int, register: int) -> int:
        return self._chip(address).read(register, 1)[0]

    def write_byte_data(self, address: int, register: int, value: int) -> None:
        self._chip(address).write(register, value)

    def read_i2c_block_data(self, address: int, register: int, length: int) -> list[int]:
        return list(self._chip(address).read(register, length))

    def close(self) -> None:
        self.closed = True


class SimMpu6050(RegisterFile):
    ACCEL_LSB = (16384.0, 8192.0, 4096.0, 2048.0)
    GYRO_LSB = (131.0, 65.5, 32.8, 16.4)

    def __init__(self, accel_g=(0.0, 0.0, 1.0), gyro_dps=(0.0, 0.0, 0.0), temperature_c: float = 25.0) -> None:
        super().__init__()
        self.registers[0x75] = 0x68  # WHO_AM_I
        self.registers[0x6B] = 0x40  # PWR_MGMT_1 after reset: SLEEP
        self.accel_g, self.gyro_dps, self.temperature_c = accel_g, gyro_dps, temperature_c

    def read(self, register: int, length: int) -> bytes:
        if self.registers[0x6B] & 0x40:  # asleep: the data registers hold nothing new
            data = bytes(14)
        else:
            accel_lsb = self.ACCEL_LSB[(self.registers[0x1C] >> 3) & 3]
            gyro_lsb = self.GYRO_LSB[(self.registers[0x1B] >> 3) & 3]
            raw = [round(a * accel_lsb) for a in self.accel_g]
            raw.append(round((self.temperature_c - 36.53) * 340.0))
            raw += [round(g * gyro_lsb) for g in self.gyro_dps]
            data = struct.pack(">7h", *(max(-32768, min(32767, r)) for r in raw))
        self.registers[0x3B:0x3B + 14] = data
        return super().read(register, length)


class SimBme280(RegisterFile):
    def __init__(self, calibration_tp: bytes, h1: int, calibration_h: bytes, adc_t: int, adc_p: int,
                 adc_h: int) -> None:
        super().__init__()
        self.registers[0xD0] = 0x60
        self.registers[0x88:0x88 + 24] = calibration_tp
        self.registers[0xA1] = h1
        self.registers[0xE1:0xE1 + 7] = calibration_h
        self.adc = (adc_t, adc_p, adc_h)
        self.registers[0xF7:0xFF] = bytes([0x80, 0, 0, 0x80, 0, 0, 0x80, 0])  # reset values
        self._measuring = 0

    def write(self, register: int, value: int) -> None:
        super().write(register, value)
        if register == 0xF4 and value & 0b11 in (0b01, 0b10):  # forced mode: one measurement
            adc_t, adc_p, adc_h = self.adc
            self.registers[0xF7:0xFF] = bytes([
                adc_p >> 12, (adc_p >> 4) & 0xFF, (adc_p & 0xF) << 4,
                adc_t >> 12, (adc_t >> 4) & 0xFF, (adc_t & 0xF) << 4,
                adc_h >> 8, adc_h & 0xFF,
            ])
            self._measuring = 1

    def read(self, register: int, length: int) -> bytes:
        if register == 0xF3:
            status = 0x08 if self._measuring else 0x00
            self._measuring = max(0, self._measuring - 1)
            return bytes([status])
        return super().read(register, length)

    @classmethod
    def datasheet_example(cls, adc_h: int = 0x6A2D) -> SimBme280:
        """Calibration and raw values of the BMP280 datasheet's worked example (section 3.12), plus
        humidity words of a typical BME280 (the datasheet gives no humidity example)."""
        tp = struct.pack("<HhhHhhhhhhhh", 27504, 26435, -1000, 36477, -10685, 3024, 2855, 140, -7, 15500, -14600,
                         6000)
        h2, h3, h4, h5, h6 = 362, 0, 313, 50, 30
        humidity = struct.pack("<hB", h2, h3) + bytes([h4 >> 4, ((h5 & 0xF) << 4) | (h4 & 0xF), h5 >> 4, h6])
        return cls(tp, 75, humidity, adc_t=519888, adc_p=415148, adc_h=adc_h)
