"""The sampler: steady rows from real drivers on a simulated bus, gaps for failed reads, and never
starved by training on the same process."""

from __future__ import annotations

import time

import numpy as np
import pytest

from agent.sample_store import SampleStore
from agent.sampler import Sampler
from agent.sensors.bme280 import Bme280
from agent.sensors.mpu6050 import Mpu6050
from hw.simbus import SimBme280, SimMpu6050, SimulatedBus


def imu(rate_hz: float = 200.0) -> Mpu6050:
    return Mpu6050(SimulatedBus({0x68: SimMpu6050(accel_g=(0.0, 0.0, 1.0), gyro_dps=(90.0, 0.0, 0.0))}),
                   rate_hz=rate_hz)


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class Flaky:
    """A sensor that fails its reads while `broken` is set, like a loose wire."""

    name, channels, rate_hz = "flaky", ("v",), 200.0

    def __init__(self) -> None:
        self.broken = False

    def read(self) -> np.ndarray:
        if self.broken:
            raise OSError(121, "Remote I/O error")
        return np.array([1.0], np.float32)

    def close(self) -> None:
        pass


def test_it_writes_rows_at_its_rate_with_the_chips_physical_values(tmp_path):
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        with Sampler([imu()], store, rate_hz=200.0, flush_s=0.2) as sampler:
            time.sleep(1.0)
        assert 160 <= sampler.counters.samples <= 210
        times, values = store.latest(1000)
        assert len(times) == sampler.counters.samples
        assert np.all(np.diff(times) > 0) and np.diff(times).max() < 0.05
        np.testing.assert_allclose(values[0], [0, 0, 1, np.pi / 2, 0, 0], atol=1e-3)  # 1 g down, 90 deg/s


def test_a_slow_sensor_is_read_at_its_own_rate_and_held_between_reads(tmp_path):
    chip = SimBme280.datasheet_example()
    env = Bme280(SimulatedBus({0x76: chip}), rate_hz=2.0)
    with SampleStore(tmp_path / "s.db", channels=9) as store:
        with Sampler([imu(), env], store, rate_hz=100.0, flush_s=0.2) as sampler:
            time.sleep(1.0)
        forced = [v for r, v in chip.writes if r == 0xF4 and v & 0b11 == 0b01]
        assert sampler.counters.samples >= 80
        assert 1 <= len(forced) <= 4  # about 2 Hz, not 100 Hz
        _, values = store.latest(1000)
        assert values[:, 6] == pytest.approx(25.08, abs=0.01)  # every row carries the held temperature


def test_a_failing_sensor_leaves_a_gap_is_counted_and_is_tried_again(tmp_path):
    flaky = Flaky()
    with SampleStore(tmp_path / "s.db", channels=1) as store:
        with Sampler([flaky], store, rate_hz=100.0, flush_s=0.1) as sampler:
            wait_for(lambda: sampler.counters.samples >= 30)
            flaky.broken = True
            time.sleep(0.5)
            failed = sampler.counters.failed_reads["flaky"]
            flaky.broken = False
            wait_for(lambda: sampler.counters.samples >= 90)
        assert failed >= 20 and sampler.alive() is False
        times, _ = store.latest(10_000)
        assert np.diff(times).max() >= 0.4  # the broken half second is a gap: no window is cut across it


def test_a_store_that_refuses_a_batch_costs_that_batch_not_the_sampler(tmp_path):
    flaky = Flaky()
    with SampleStore(tmp_path / "s.db", channels=1) as store:
        real_append = store.append_many
        calls = {"n": 0}

        def failing_once(times, values):
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(28, "No space left on device")
            real_append(times, values)

        store.append_many = failing_once
        with Sampler([flaky], store, rate_hz=100.0, flush_s=0.1) as sampler:
            wait_for(lambda: sampler.counters.samples >= 20)
        assert sampler.counters.failed_writes == 1 and len(store) == sampler.counters.samples


def test_training_on_the_same_process_does_not_starve_sampling(tmp_path):
    from firmware_models.runtime import TrainableModel

    model = TrainableModel.from_package()
    x = np.random.default_rng(0).normal(size=(32, *model.input_shape)).astype(np.float32)
    y = np.zeros(32, np.int32)
    with SampleStore(tmp_path / "s.db", channels=6) as store:
        with Sampler([imu()], store, rate_hz=200.0, flush_s=0.2) as sampler:
            started, steps = time.monotonic(), 0
            while time.monotonic() - started < 2.0:
                model.train_step(x, y, 0.01)
                steps += 1
        elapsed = time.monotonic() - started
        times, _ = store.latest(10_000)
    assert steps > 20  # it really trained meanwhile
    assert sampler.counters.samples >= 0.85 * 200 * elapsed
    assert np.diff(times).max() < 0.2


def test_sensors_that_do_not_fit_the_store_are_refused():
    with pytest.raises(ValueError, match="6 channels, the sample store holds 3"):
        Sampler([imu()], SampleStore(":memory:", channels=3), rate_hz=50.0)


def test_rows_with_a_non_finite_value_are_dropped_and_counted(tmp_path):
    class Nan(Flaky):
        def read(self):
            return np.array([np.nan if self.broken else 1.0], np.float32)

    sensor = Nan()
    with SampleStore(tmp_path / "s.db", channels=1) as store:
        with Sampler([sensor], store, rate_hz=100.0, flush_s=0.1) as sampler:
            wait_for(lambda: sampler.counters.samples >= 10)
            sensor.broken = True
            wait_for(lambda: sampler.counters.failed_reads.get("flaky", 0) >= 10)
            sensor.broken = False
            wait_for(lambda: len(store) >= 40)
        _, values = store.latest(1000)
    assert np.all(np.isfinite(values)) and len(values) == sampler.counters.samples


def test_a_driver_giving_the_wrong_number_of_values_costs_its_rows_not_the_sampler(tmp_path):
    class Wide(Flaky):
        def read(self):
            return np.zeros(2, np.float32)

    with SampleStore(tmp_path / "s.db", channels=1) as store:
        with Sampler([Wide()], store, rate_hz=100.0, flush_s=0.1) as sampler:
            wait_for(lambda: sampler.counters.failed_reads.get("flaky", 0) >= 10)
            assert sampler.alive()
        assert len(store) == 0
