#!/usr/bin/env bash
# Install what Starling needs from the system, only what is missing, under each distribution's own package names
# (read from /etc/os-release): Debian 12 and 13, Ubuntu 22.04 and 24.04, and their derivatives, with apt-get.
#
#   mosquitto, mosquitto-clients  the broker the emulator and the tests start (mosquitto_passwd is in mosquitto)
#   openssl                       the broker's TLS certificates (hw/mosquitto/make-certs.sh, the TLS tests)
#   gcc, g++, libc6-dev           the MCU export's C header is compiled as C11 and C++17 by the tests
#   make, systemd (systemd-analyze: the unit file tests)
#   a Python 3.11-3.13 with venv  for .venv and .venv-build (hw/find-python.sh): Debian 12's python3 is 3.11,
#                                 Debian 13's 3.13, Ubuntu 24.04's 3.12; on Ubuntu 22.04 (3.10) python3.11 is added
#   chromium                      the dashboard's browser test, on Debian. Ubuntu's chromium is a snap (its deb is a
#                                 stub), which Playwright cannot drive: there the Makefile installs Playwright's own
#                                 Chromium into the venv's cache instead (hw/install-browser.sh)
#
# Elsewhere it names what is missing and exits 1. Tests that lack a tool skip and say so; CI (STARLING_CI=1) fails.
set -euo pipefail
cd "$(dirname "$0")/.."

ID="" ID_LIKE="" PRETTY_NAME="this system"
# shellcheck disable=SC1091
[ -r /etc/os-release ] && . /etc/os-release
family=""
case " $ID $ID_LIKE " in
    *" ubuntu "*) family=ubuntu ;;
    *" debian "*) family=debian ;;
esac

have() { command -v "$1" >/dev/null 2>&1; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

packages=()
have mosquitto || test -x /usr/sbin/mosquitto || packages+=(mosquitto)
have mosquitto_passwd || test -x /usr/bin/mosquitto_passwd || packages+=(mosquitto)
have mosquitto_pub || packages+=(mosquitto-clients)
have openssl || packages+=(openssl)
have gcc || packages+=(gcc)
have g++ || packages+=(g++)
if [ -n "$family" ] && ! installed libc6-dev; then packages+=(libc6-dev); fi
have make || packages+=(make)
have systemd-analyze || packages+=(systemd)

# Python: one of 3.11-3.13 for the main environments, and the venv module of each Python the Makefile uses
# (Debian and Ubuntu ship it apart, as pythonX.Y-venv).
python_packages() {
    if ! have python3; then
        echo python3 python3-venv
        return
    fi
    local kind py
    if ! bash hw/find-python.sh full >/dev/null 2>&1; then
        echo python3.11 python3.11-venv  # Ubuntu 22.04 has it (universe); elsewhere apt-get says there is none
    fi
    for kind in full tflite; do
        py="$(bash hw/find-python.sh "$kind" 2>/dev/null)" || continue
        "$py" -c "import ensurepip, venv" >/dev/null 2>&1 ||
            echo "python$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-venv"
    done
}
# shellcheck disable=SC2207
packages+=($(python_packages))

# Chromium for the dashboard's browser test: Debian's package; not Ubuntu's snap stub (see above).
if [ "$family" = debian ] && ! bash hw/install-browser.sh --check; then packages+=(chromium); fi

if [ ${#packages[@]} -eq 0 ]; then exit 0; fi
mapfile -t packages < <(printf '%s\n' "${packages[@]}" | awk '!seen[$0]++')
if [ -z "$family" ]; then
    echo "install-system.sh: $PRETTY_NAME is neither Debian nor Ubuntu (no apt-get here)." >&2
    echo "  Install the equivalents of these Debian packages, then run make again: ${packages[*]}" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
    have sudo || { echo "install-system.sh: not root and no sudo; as root: apt-get install ${packages[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
echo "install-system.sh ($PRETTY_NAME): apt-get install ${packages[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${packages[@]}" >/dev/null
# The packaged broker service is not needed: Starling starts its own brokers on free ports.
$SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true

# A python3 that came with this run may be older than 3.11, or lack its venv module: one more pass.
# shellcheck disable=SC2207
more=($(python_packages))
if [ ${#more[@]} -gt 0 ]; then
    echo "install-system.sh: apt-get install ${more[*]}"
    $SUDO apt-get install -y -qq "${more[@]}" >/dev/null
fi
bash hw/find-python.sh full >/dev/null  # says why, and fails, when there is still no Python 3.11-3.13
