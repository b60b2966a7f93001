"""Sensor drivers against a simulated I2C bus that answers like the datasheets, and the replay driver."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.sensors import SensorError, open_sensor
from agent.sensors.bme280 import Bme280
from agent.sensors.mpu6050 import Mpu6050
from agent.sensors.replay import ReplaySensor
from hw.simbus import SimBme280, SimMpu6050, SimulatedBus

# --- BME280 -------------------------------------------------------------------------------------


def test_bme280_reads_the_datasheet_example_as_25_08_degrees_and_1006_53_hpa():
    bus = SimulatedBus({0x76: SimBme280.datasheet_example()})
    temperature, pressure, humidity = Bme280(bus).read()
    assert temperature == pytest.approx(25.08, abs=0.01)  # BMP280 datasheet, section 3.12
    assert pressure == pytest.approx(1006.5327, abs=0.01)  # 100653.27 Pa
    assert 0.0 < humidity < 100.0


def test_bme280_humidity_rises_with_the_raw_reading_and_stays_within_0_to_100():
    readings = [Bme280(SimulatedBus({0x76: SimBme280.datasheet_example(adc_h=raw)})).read()[2]
                for raw in (0x5000, 0x6000, 0x7000, 0x8000, 0xFFFF)]
    assert readings == sorted(readings) and 0.0 <= readings[0] and readings[-1] == 100.0


def test_bme280_starts_a_forced_measurement_for_each_read():
    chip = SimBme280.datasheet_example()
    sensor = Bme280(SimulatedBus({0x76: chip}))
    sensor.read()
    sensor.read()
    forced = [v for r, v in chip.writes if r == 0xF4]
    assert len(forced) == 2 and all(v & 0b11 == 0b01 for v in forced)


def test_bme280_at_another_address_or_another_chip_is_a_clear_error():
    with pytest.raises(SensorError, match="no answer"):
        Bme280(SimulatedBus({0x77: SimBme280.datasheet_example()}))
    with pytest.raises(SensorError, match="not a BME280"):
        Bme280(SimulatedBus({0x76: SimMpu6050()}))


# --- MPU-6050 -----------------------------------------------------------------------------------


def test_mpu6050_lying_flat_reads_one_g_down_and_no_rotation():
    chip = SimMpu6050(accel_g=(0.0, 0.0, 1.0), gyro_dps=(0.0, 0.0, 0.0), temperature_c=25.0)
    sensor = Mpu6050(SimulatedBus({0x68: chip}))
    np.testing.assert_allclose(sensor.read(), [0, 0, 1, 0, 0, 0], atol=1e-4)
    assert sensor.temperature_c() == pytest.approx(25.0, abs=0.01)
    assert (0x6B, 0x01) in chip.writes  # woken from its reset SLEEP


def test_mpu6050_turning_at_90_degrees_per_second_reads_half_pi_rad_per_second_at_every_range():
    for accel_range, gyro_range in ((2, 250), (8, 1000), (16, 2000)):
        chip = SimMpu6050(accel_g=(1.5, -0.5, 0.25), gyro_dps=(0.0, -30.0, 90.0))
        sample = Mpu6050(SimulatedBus({0x68: chip}), accel_range_g=accel_range, gyro_range_dps=gyro_range).read()
        np.testing.assert_allclose(sample[:3], [1.5, -0.5, 0.25], atol=2 / 2048)
        np.testing.assert_allclose(sample[3:], np.radians([0.0, -30.0, 90.0]), atol=math.radians(0.1))


def test_mpu6050_goes_back_to_sleep_on_close_and_refuses_a_wrong_chip():
    chip = SimMpu6050()
    Mpu6050(SimulatedBus({0x68: chip})).close()
    assert chip.writes[-1] == (0x6B, 0x40)
    with pytest.raises(SensorError, match="not an MPU-6050"):
        Mpu6050(SimulatedBus({0x68: SimBme280.datasheet_example()}))
    with pytest.raises(SensorError, match="ranges"):
        Mpu6050(SimulatedBus({0x68: chip}), accel_range_g=3)


def test_open_sensor_builds_a_driver_on_a_given_bus_and_names_unknown_kinds():
    sensor = open_sensor("mpu6050", bus=SimulatedBus({0x68: SimMpu6050()}))
    assert sensor.channels[0] == "ax_g" and sensor.read().shape == (6,)
    with pytest.raises(SensorError, match="unknown sensor kind"):
        open_sensor("thermometer")


# --- replay -------------------------------------------------------------------------------------


def test_replay_reads_csv_rows_in_order_and_loops(tmp_path):
    path = tmp_path / "walk.csv"
    path.write_text("ax,ay\n1,2\n3,4\n")
    sensor = ReplaySensor(path)
    assert sensor.channels == ("ax", "ay")
    got = [sensor.read().tolist() for _ in range(3)]
    assert got == [[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]]
    once = ReplaySensor(path, loop=False)
    once.read(), once.read()
    with pytest.raises(SensorError, match="no more samples"):
        once.read()


def test_replay_reads_npz_windows_as_a_stream(tmp_path):
    windows = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    np.savez(tmp_path / "d.npz", X=windows, y=np.array([0, 1]))
    sensor = ReplaySensor(tmp_path / "d.npz")
    assert sensor.channels == ("ch0", "ch1", "ch2")
    np.testing.assert_array_equal([sensor.read() for _ in range(8)], windows.reshape(8, 3))


@pytest.mark.parametrize("name, content, match", [
    ("bad.csv", "a,b\n1,x\n", "not a number"),
    ("short.csv", "a,b\n1\n", "every row needs 2"),
    ("nan.csv", "a\nnan\n", "NaN"),
    ("data.txt", "1\n", ".csv or .npz"),
    ("junk.npz", "not a zip", "not a readable NPZ"),
])
def test_a_bad_replay_file_is_a_clear_error(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(SensorError, match=match):
        ReplaySensor(tmp_path / name)
