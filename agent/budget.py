"""How much a device gives to a round, and when it sits one out.

    [budget]
    max_train_s = 120.0          # training stops after this (0: only the task's deadline stops it)
    max_samples = 2000           # windows trained on per round, sampled afresh each round (0: all)
    max_cpu_temp_c = 80.0        # at or above this CPU temperature, skip the round ("cpu_hot")
    thermal_zone = "/sys/class/thermal/thermal_zone0/temp"   # millidegrees C, as Linux reports it
    low_power_file = "/run/starling/low-power"               # while this file exists, skip ("low_power")

A skipped round is answered with a signed skip (its reason, no update), so
the gateway stops waiting for this device at once and can count why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")


@dataclass(frozen=True)
class Budget:
    max_train_s: float = 0.0
    max_samples: int = 0
    max_cpu_temp_c: float = 80.0
    thermal_zone: Path | None = DEFAULT_THERMAL_ZONE
    low_power_file: Path | None = None

    def cpu_temp_c(self) -> float | None:
        """The CPU temperature, or None where the board does not report one."""
        if self.thermal_zone is None:
            return None
        try:
            return int(self.thermal_zone.read_text().strip()) / 1000.0
        except (OSError, ValueError):
            return None

    def skip_reason(self) -> str:
        """Why this device should sit the next training round out, or "" to take part."""
        if self.low_power_file is not None and self.low_power_file.exists():
            return "low_power"
        temperature = self.cpu_temp_c()
        if temperature is not None and temperature >= self.max_cpu_temp_c:
            return "cpu_hot"
        return ""
