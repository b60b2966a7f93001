#!/usr/bin/env bash
# Install the Mosquitto broker and its command-line clients (Debian/Ubuntu).
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq mosquitto mosquitto-clients >/dev/null
# The packaged service is not needed: Starling starts its own brokers on free ports.
$SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
