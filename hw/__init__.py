"""Hardware-in-the-loop emulator: datasets, device and link profiles, faults, scenarios."""
