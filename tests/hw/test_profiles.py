"""Device and link profiles: parsing, the seeded choice of devices, slow CPUs and memory caps."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from hw.links import LinkProfile
from hw.profiles import (
    MIN_MEMORY_MB,
    CpuThrottle,
    DeviceProfile,
    LinkSpec,
    assign,
    memory_cap,
    parse_device_profiles,
    parse_links,
)
from protocol.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHILD_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}

# --- parsing ---------------------------------------------------------------------------------


def test_device_profiles_parse_with_defaults_and_budget():
    slow, plain = parse_device_profiles([
        {"name": "pi", "fraction": 0.5, "cpu_slowdown": 4, "max_train_s": 20, "max_samples": 500,
         "memory_mb": 128},
        {"name": "plain", "count": 2},
    ])
    assert slow == DeviceProfile("pi", 0.5, None, 4.0, 20.0, 500, 128)
    assert isinstance(slow.cpu_slowdown, float) and isinstance(slow.max_train_s, float)
    assert plain == DeviceProfile("plain", None, 2)
    assert slow.budget_toml() == {"max_train_s": 20.0, "max_samples": 500}
    assert plain.budget_toml() == {}
    assert DeviceProfile("t", count=1, max_samples=10).budget_toml() == {"max_samples": 10}


def test_links_parse_with_outages():
    (link,) = parse_links([{"name": "lte", "count": 3, "latency_ms": 80, "jitter_ms": 20.5,
                            "bandwidth_kbps": 512, "loss": 0.02, "outages": [[30, 45], [60.5, 61]]}])
    assert link == LinkSpec("lte", None, 3, 80.0, 20.5, 512.0, 0.02, ((30.0, 45.0), (60.5, 61.0)))
    assert parse_links([]) == ()


def test_link_profile_converts_to_seconds_and_bytes_per_second():
    spec = LinkSpec("lte", count=1, latency_ms=80, jitter_ms=20, bandwidth_kbps=512, loss=0.1,
                    outages=((5.0, 9.0),))
    assert spec.profile() == LinkProfile(latency_s=0.08, jitter_s=0.02, bandwidth_bps=64_000, loss=0.1,
                                         outages=((5.0, 9.0),))
    assert LinkSpec("lan", count=1).profile() == LinkProfile()  # 0 = unlimited, no delay


GOOD_DEVICE = {"name": "pi", "count": 1}
BAD_DEVICES = [
    ({"colour": "red"}, "unknown key device_profile[1].colour"),
    ({"cpu_slowdown": 0.5}, "device_profile[1].cpu_slowdown must be >= 1, got 0.5"),
    ({"cpu_slowdown": True}, "device_profile[1].cpu_slowdown has the wrong type (bool)"),
    ({"cpu_slowdown": "2"}, "device_profile[1].cpu_slowdown has the wrong type (str)"),
    ({"cpu_slowdown": math.nan}, "device_profile[1].cpu_slowdown must be a finite number"),
    ({"max_train_s": math.inf}, "device_profile[1].max_train_s must be a finite number"),
    ({"max_train_s": -1.0}, "device_profile[1].max_train_s must not be negative"),
    ({"max_samples": 2.5}, "device_profile[1].max_samples has the wrong type (float)"),
    ({"max_samples": -3}, "device_profile[1].max_samples must not be negative"),
    ({"memory_mb": 16}, "device_profile[1].memory_mb must be 0 (no cap) or at least"),
    ({"count": 0}, "device_profile[1].count must be at least 1"),
    ({"count": 2, "fraction": 0.5},
     "device_profile[1]: give either fraction (of all devices) or count, not both"),
    ({"count": None}, "device_profile[1]: give either fraction (of all devices) or count, not neither"),
    ({"count": None, "fraction": 1.5}, "device_profile[1].fraction must be in (0, 1], got 1.5"),
    ({"count": None, "fraction": 0.0}, "device_profile[1].fraction must be in (0, 1], got 0.0"),
    ({"name": None}, "device_profile[1].name is required"),
    ({"name": "pi"}, "device_profile[1].name 'pi' is used twice"),
]


@pytest.mark.parametrize(("change", "message"), BAD_DEVICES, ids=[m for _, m in BAD_DEVICES])
def test_bad_device_profile_is_refused_naming_the_field(change, message):
    table = {"name": "other", "count": 1, **change}
    table = {k: v for k, v in table.items() if v is not None}
    with pytest.raises(ConfigError) as raised:
        parse_device_profiles([GOOD_DEVICE, table])
    assert message in str(raised.value)


BAD_LINKS = [
    ({"latency": 80}, "unknown key link[0].latency"),
    ({"latency_ms": -5}, "link[0].latency_ms must not be negative"),
    ({"bandwidth_kbps": math.inf}, "link[0].bandwidth_kbps must be a finite number"),
    ({"jitter_ms": False}, "link[0].jitter_ms has the wrong type (bool)"),
    ({"loss": 1.0}, "link[0].loss must be in [0, 1), got 1.0"),
    ({"loss": -0.1}, "link[0].loss must not be negative"),
    ({"outages": [30, 45]}, "link[0].outages must be [[start_s, end_s], ...]"),
    ({"outages": [[45, 30]]}, "link[0].outages must be [[start_s, end_s], ...] with 0 <= start_s < end_s"),
    ({"outages": [[-1, 3]]}, "link[0].outages must be"),
    ({"outages": [[1, 2, 3]]}, "link[0].outages must be"),
    ({"outages": [[1, math.nan]]}, "link[0].outages must be"),
    ({"outages": [[True, 2]]}, "link[0].outages must be"),
    ({"outages": "30-45"}, "link[0].outages has the wrong type (str)"),
]


@pytest.mark.parametrize(("change", "message"), BAD_LINKS, ids=[m for _, m in BAD_LINKS])
def test_bad_link_is_refused_naming_the_field(change, message):
    with pytest.raises(ConfigError) as raised:
        parse_links([{"name": "lte", "count": 1, **change}])
    assert message in str(raised.value)


def test_profiles_must_be_an_array_of_tables():
    with pytest.raises(ConfigError, match=r"link must be an array of tables"):
        parse_links({"name": "lte"})
    with pytest.raises(ConfigError, match=r"device_profile\[0\] must be a table"):
        parse_device_profiles(["pi"])


# --- which devices get which profile ---------------------------------------------------------


def test_assign_is_reproducible_disjoint_and_sized():
    names = [f"dev-{i}" for i in range(10)]
    specs = parse_device_profiles([{"name": "slow", "fraction": 0.3}, {"name": "tiny", "count": 2}])
    chosen = assign(names, specs, seed=1, salt=11)
    assert chosen == assign(names, specs, seed=1, salt=11)
    assert sorted(s.name for s in chosen.values()) == ["slow"] * 3 + ["tiny"] * 2  # a dict: disjoint
    others = [assign(names, specs, seed=s, salt=11) for s in range(2, 6)]
    assert any(set(o) != set(chosen) for o in others)  # the seed matters
    assert any(set(assign(names, specs, seed=s, salt=12)) != set(assign(names, specs, seed=s, salt=11))
               for s in range(5))  # another kind of profile (salt) is chosen independently
    assert assign(names, (), seed=1, salt=11) == {}


def test_assign_refuses_more_devices_than_the_fleet_has():
    specs = parse_links([{"name": "a", "fraction": 0.5}, {"name": "b", "count": 2}])
    assert len(assign(["x", "y", "z", "w"], specs, seed=0, salt=3)) == 4
    with pytest.raises(ConfigError, match=r"ask for 4 devices \(a: 2, b: 2\), the fleet has 3"):
        assign(["x", "y", "z"], specs, seed=0, salt=3)


# --- slow CPUs -------------------------------------------------------------------------------


def spin() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture
def children():
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        p.kill()
        p.wait(10)


def wait_for_state(pid: int, wanted: str, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if state(pid) == wanted:
            return True
        time.sleep(0.005)
    return False


def test_throttled_child_gets_a_fraction_of_the_cpu(children):
    full, slow = spin(), spin()
    children += [full, slow]
    with CpuThrottle() as throttle:
        throttle.add(full.pid, 1.0)
        throttle.add(slow.pid, 4.0)
        start, full0, slow0 = time.monotonic(), cpu_s(full.pid), cpu_s(slow.pid)
        time.sleep(1.5)
        wall, full_cpu, slow_cpu = time.monotonic() - start, cpu_s(full.pid) - full0, cpu_s(slow.pid) - slow0
    assert slow_cpu < 0.45 * wall  # it may run 1/4 of the time, whatever else the machine does
    assert slow_cpu < 0.6 * full_cpu, (slow_cpu, full_cpu)


def test_nothing_is_left_stopped_on_exit_or_remove(children):
    kept, removed = spin(), spin()
    children += [kept, removed]
    with CpuThrottle(period_s=0.05) as throttle:
        throttle.add(kept.pid, 50.0)  # stopped 98% of the time
        throttle.add(removed.pid, 50.0)
        assert wait_for_state(kept.pid, "T") and wait_for_state(removed.pid, "T")
        throttle.remove(removed.pid)
        assert not wait_for_state(removed.pid, "T", 0.15)  # three periods: never stopped again
        assert wait_for_state(kept.pid, "T")
    assert state(kept.pid) != "T"


def test_throttle_outlives_processes_that_exit_and_takes_new_ones(children):
    short = subprocess.Popen([sys.executable, "-c", "pass"])
    with CpuThrottle(period_s=0.05) as throttle:
        throttle.add(short.pid, 2.0)
        short.wait(10)  # exits and is reaped while throttled
        throttle.add(short.pid, 2.0)  # already gone: ignored
        time.sleep(0.1)
        later = spin()
        children.append(later)
        throttle.add(later.pid, 50.0)
        assert wait_for_state(later.pid, "T")
        for delay in (0.0, 0.01, 0.02, 0.03, 0.04, 0.05):  # somewhere in its run window, with a stop due
            throttle.add(later.pid, 2.0)
            time.sleep(delay)
            throttle.add(later.pid, 1.0)  # back to full speed: continued at once, never stopped again
            assert not wait_for_state(later.pid, "T", 0.12), delay
    with pytest.raises(ValueError):
        CpuThrottle().add(later.pid, 0.5)


# --- small memories --------------------------------------------------------------------------


def allocate(cap_mb: int, alloc_mb: int, code: str = "") -> subprocess.CompletedProcess[str]:
    code = code or f"import numpy as np; a = np.ones({alloc_mb} << 20, dtype=np.uint8); print(int(a.sum()))"
    return subprocess.run([sys.executable, "-c", code], preexec_fn=memory_cap(cap_mb), env=CHILD_ENV,
                          capture_output=True, text=True, timeout=60)


def test_memory_cap_refuses_twice_the_cap_and_allows_half():
    over = allocate(256, 512)
    assert over.returncode != 0 and "MemoryError" in over.stderr
    under = allocate(256, 128)
    assert under.returncode == 0, under.stderr
    assert int(under.stdout) == 128 << 20


def test_an_agent_that_loads_the_cnn_and_trains_fits_in_the_smallest_allowed_cap():
    pytest.importorskip("ai_edge_litert")
    code = ("import numpy as np\n"
            "from firmware_models.runtime import TrainableModel\n"
            "m = TrainableModel.from_package('imu_cnn')\n"
            "x = np.zeros((m.batch_size, *m.input_shape), np.float32)\n"
            "y = np.zeros(m.batch_size, np.int32)\n"
            "print(m.train_step(x, y, 0.01))\n")
    run = allocate(MIN_MEMORY_MB, 0, code)
    assert run.returncode == 0, run.stderr[-500:]
    assert allocate(MIN_MEMORY_MB // 2, 0, code).returncode != 0  # and the cap is what lets it run


def test_memory_cap_must_be_positive():
    with pytest.raises(ValueError):
        memory_cap(0)
