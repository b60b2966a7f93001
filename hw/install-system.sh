#!/usr/bin/env bash
# Install what Starling needs from the system (Debian/Ubuntu), only what is missing:
# the Mosquitto broker and its clients, Python's venv module, and systemd-analyze (the unit file tests).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
packages=()
command -v mosquitto >/dev/null 2>&1 || test -x /usr/sbin/mosquitto || packages+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || packages+=(mosquitto-clients)
python3 -m venv --help >/dev/null 2>&1 || packages+=(python3-venv)
command -v make >/dev/null 2>&1 || packages+=(make)
command -v systemd-analyze >/dev/null 2>&1 || packages+=(systemd)
# The dashboard's browser test drives Debian's chromium (Playwright never downloads one here).
test -x /usr/lib/chromium/chromium || command -v chromium >/dev/null 2>&1 || packages+=(chromium)
if [ ${#packages[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
    # The packaged broker service is not needed: Starling starts its own brokers on free ports.
    $SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
fi
