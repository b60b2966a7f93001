#!/usr/bin/env bash
# Install the Starling agent on a device (Raspberry Pi OS / Debian) as a systemd service.
# Idempotent: run it again to upgrade; an existing config, key and state are kept.
#
#   sudo hw/install.sh --gateway-id ID --gateway-key HEX --broker HOST[:PORT] [options]
#
# Options:
#   --name NAME            the device's name on dashboards (default: the host name)
#   --ca FILE              broker CA certificate: TLS on (copied to /etc/starling/ca.crt)
#   --password-file FILE   MQTT password (copied to /etc/starling/mqtt.password, mode 600);
#                          the MQTT username is the device id, as the broker ACL expects
#   --sensor KIND          a sensor on I2C bus 1 at its default address: mpu6050 or bme280 (repeat for
#                          several); the agent samples them into /var/lib/starling/samples.db
#   --model NAME           the model to train (default imu_cnn); a classifier learns from the labels
#                          written to /var/lib/starling/labels.csv (start,end,label per line)
#   --replay FILE          instead of sensors: recorded windows (.npz: x_train, y_train, x_test, y_test)
#   --source DIR           install Starling from this checkout (default: the one holding this script)
#   --no-start             install, but do not enable or start the service
#
# What it makes: the system user `starling` (in group i2c when there is one), /opt/starling/venv
# with only the `agent` extra, /etc/starling/agent.toml (0640, group starling), /var/lib/starling
# (0700, owned by starling) with the device key, /etc/systemd/system/starling-agent.service.
#
# STARLING_ROOT=/some/dir puts all of that under that folder instead of / (image builds, tests):
# then no user is made, nothing is chowned and systemctl is not called.
set -euo pipefail

ROOT="${STARLING_ROOT:-}"
SOURCE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="$(hostname -s 2>/dev/null || echo device)"
GATEWAY_ID="" GATEWAY_KEY="" BROKER="" CA="" PASSWORD_FILE="" REPLAY="" MODEL="" START=1
SENSORS=()
PIP_ARGS="${STARLING_PIP_ARGS:-}"

die() { echo "install.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --gateway-id) GATEWAY_ID="${2:-}"; shift 2 ;;
        --gateway-key) GATEWAY_KEY="${2:-}"; shift 2 ;;
        --broker) BROKER="${2:-}"; shift 2 ;;
        --name) NAME="${2:-}"; shift 2 ;;
        --ca) CA="${2:-}"; shift 2 ;;
        --password-file) PASSWORD_FILE="${2:-}"; shift 2 ;;
        --replay) REPLAY="${2:-}"; shift 2 ;;
        --sensor) SENSORS+=("${2:-}"); shift 2 ;;
        --model) MODEL="${2:-}"; shift 2 ;;
        --source) SOURCE="${2:-}"; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[[ "$GATEWAY_ID" =~ ^[0-9a-f]{32}$ ]] || die "--gateway-id must be 32 lowercase hex characters"
[[ "$GATEWAY_KEY" =~ ^[0-9a-fA-F]{64}$ ]] || die "--gateway-key must be the gateway's public key, 64 hex characters"
[ -n "$BROKER" ] || die "--broker HOST[:PORT] is required"
HOST="${BROKER%%:*}"
PORT="${BROKER##*:}"; [ "$PORT" = "$BROKER" ] && PORT=$([ -n "$CA" ] && echo 8883 || echo 1883)
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--broker port must be a number"
[ -z "$CA" ] || [ -f "$CA" ] || die "--ca $CA is not a file"
[ -z "$PASSWORD_FILE" ] || [ -f "$PASSWORD_FILE" ] || die "--password-file $PASSWORD_FILE is not a file"
for SENSOR in "${SENSORS[@]}"; do
    case "$SENSOR" in mpu6050|bme280) ;; *) die "--sensor $SENSOR: known sensors are mpu6050 and bme280" ;; esac
done
[ -n "$REPLAY" ] || [ "${#SENSORS[@]}" -gt 0 ] || die "give --sensor KIND (mpu6050, bme280) or --replay FILE"
[ -z "$REPLAY" ] || [ "${#SENSORS[@]}" -eq 0 ] || die "--replay and --sensor exclude each other"
[ -z "$REPLAY" ] || [ -f "$REPLAY" ] || die "--replay $REPLAY is not a file"
[[ -z "$MODEL" || "$MODEL" =~ ^[a-z0-9_]+$ ]] || die "--model must be a model name such as imu_cnn"
[ -f "$SOURCE/pyproject.toml" ] || die "--source $SOURCE is not a Starling checkout"
if [ -z "$ROOT" ] && [ "$(id -u)" != 0 ]; then die "run as root (sudo), or set STARLING_ROOT"; fi

ETC="$ROOT/etc/starling"
STATE="$ROOT/var/lib/starling"
VENV="$ROOT/opt/starling/venv"
UNIT_DIR="$ROOT/etc/systemd/system"

echo "install.sh: user, folders"
if [ -z "$ROOT" ] && ! id starling >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/starling --no-create-home --shell /usr/sbin/nologin starling
fi
if [ -z "$ROOT" ] && getent group i2c >/dev/null 2>&1; then usermod -a -G i2c starling; fi
install -d -m 0755 "$ETC" "$UNIT_DIR" "$(dirname "$VENV")"
install -d -m 0700 "$STATE"

echo "install.sh: virtual environment with the agent extra only ($VENV)"
if [ ! -x "$VENV/bin/python" ]; then
    # The agent runs on Python 3.10 to 3.13 (tomli is installed on 3.10); Debian and Ubuntu ship venv apart.
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "the agent needs Python 3.10 or newer; python3 here is $(python3 -V 2>&1)"
    python3 -c 'import ensurepip, venv' 2>/dev/null ||
        die "python3 has no venv module: apt-get install python3-venv"
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086  # PIP_ARGS is a list of options
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PIP_ARGS "$SOURCE[agent]"

echo "install.sh: device key"
KEY="$STATE/device.key"
"$VENV/bin/starling-agent" keygen --key "$KEY" > "$STATE/device.json"  # keeps an existing key
DEVICE_ID="$("$VENV/bin/python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' "$STATE/device.json")"

echo "install.sh: config ($ETC/agent.toml)"
if [ -n "$CA" ]; then install -m 0644 "$CA" "$ETC/ca.crt"; fi
if [ -n "$PASSWORD_FILE" ]; then install -m 0600 "$PASSWORD_FILE" "$ETC/mqtt.password"; fi
if [ ! -f "$ETC/agent.toml" ]; then
    {
        echo "# Written by hw/install.sh; edit and restart the service (systemctl restart starling-agent)."
        echo "[device]"
        echo "name = \"$NAME\""
        echo "key = \"/var/lib/starling/device.key\""
        echo "state_dir = \"/var/lib/starling\""
        echo
        echo "[gateway]"
        echo "id = \"$GATEWAY_ID\""
        echo "public_key = \"$GATEWAY_KEY\""
        echo
        echo "[broker]"
        echo "host = \"$HOST\""
        echo "port = $PORT"
        if [ -n "$CA" ]; then echo "tls_ca = \"/etc/starling/ca.crt\""; fi
        if [ -n "$PASSWORD_FILE" ]; then
            echo "username = \"$DEVICE_ID\""
            echo "password_file = \"/etc/starling/mqtt.password\""
        fi
        if [ -n "$MODEL" ]; then
            echo
            echo "[model]"
            echo "name = \"$MODEL\""
        fi
        echo
        echo "[data]"
        if [ -n "$REPLAY" ]; then
            echo "replay = \"/var/lib/starling/replay.npz\""
        else
            echo "rate_hz = 50.0"
            echo "labels = \"/var/lib/starling/labels.csv\"   # start,end,label lines; rounds are skipped until it exists"
        fi
        for SENSOR in "${SENSORS[@]}"; do
            echo
            echo "[[sensor]]"
            echo "kind = \"$SENSOR\""
            echo "i2c_bus = 1"
        done
    } > "$ETC/agent.toml.tmp"
    chmod 0640 "$ETC/agent.toml.tmp"
    mv "$ETC/agent.toml.tmp" "$ETC/agent.toml"
fi
if [ -n "$REPLAY" ]; then install -m 0600 "$REPLAY" "$STATE/replay.npz"; fi

echo "install.sh: systemd unit"
install -m 0644 "$SOURCE/hw/systemd/starling-agent.service" "$UNIT_DIR/starling-agent.service"

if [ -z "$ROOT" ]; then
    chown -R starling:starling "$STATE"
    chgrp starling "$ETC/agent.toml"
    [ ! -f "$ETC/mqtt.password" ] || chown starling:starling "$ETC/mqtt.password"
    systemctl daemon-reload
    if [ "$START" = 1 ]; then systemctl enable --now starling-agent; fi
fi
echo "install.sh: done. device id $DEVICE_ID (the broker username and the id operators enroll)"
