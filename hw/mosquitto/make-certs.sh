#!/usr/bin/env bash
# Throwaway TLS material for a Starling broker: a CA, a server certificate and,
# optionally, a client certificate. For tests and labs ONLY: a city issues
# broker and device certificates from its own PKI (with revocation, key
# custody and rotation), never from a CA key lying next to the broker.
#
#   hw/mosquitto/make-certs.sh [-d DAYS] OUT_DIR SERVER_NAME[,NAME...] [CLIENT_CN]
#
#   OUT_DIR      created if missing (mode 0700). An existing ca.crt + ca.key
#                there is reused, so running again adds a server or client
#                certificate signed by the same CA.
#   SERVER_NAME  host name(s) and/or IP address(es) clients connect to,
#                comma-separated; each goes into the subjectAltName (clients
#                check the SAN, not the CN). The first is also the CN.
#   CLIENT_CN    optional: also write CLIENT_CN.crt / CLIENT_CN.key. With
#                `use_identity_as_username true` the CN is the MQTT username,
#                so use the device id (or gw-<gateway id> for a gateway).
#   -d DAYS      validity, default 365.
#
# Writes: ca.crt ca.key server.crt server.key [CLIENT_CN.crt CLIENT_CN.key].
# Keys are ECDSA P-256 and mode 0600. Copy ca.crt, server.crt and server.key
# to the broker's conf dir (default /etc/starling/mosquitto/) and ca.crt to
# the clients.
set -euo pipefail

usage() {
    sed -n '7,18p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit "${1:-2}"
}

days=365
while getopts ":d:h" opt; do
    case "$opt" in
        d) days="$OPTARG" ;;
        h) usage 0 ;;
        *) usage ;;
    esac
done
shift $((OPTIND - 1))
[ $# -ge 2 ] && [ $# -le 3 ] || usage
out="$1"
names="$2"
client_cn="${3:-}"

[[ "$days" =~ ^[1-9][0-9]*$ ]] || { echo "make-certs: DAYS must be a positive integer, not '$days'" >&2; exit 2; }
[[ "$names" =~ ^[A-Za-z0-9.:,_-]+$ ]] || { echo "make-certs: bad SERVER_NAME '$names'" >&2; exit 2; }
if [ -n "$client_cn" ] && ! [[ "$client_cn" =~ ^[A-Za-z0-9._-]+$ ]]; then
    echo "make-certs: CLIENT_CN may only hold letters, digits, '.', '_' and '-', not '$client_cn'" >&2
    exit 2
fi
command -v openssl >/dev/null || { echo "make-certs: openssl is not installed" >&2; exit 1; }

umask 077
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# subjectAltName entries: IP:... for IPv4/IPv6 literals, DNS:... otherwise.
san=""
IFS=',' read -r -a name_list <<< "$names"
for name in "${name_list[@]}"; do
    [ -n "$name" ] || continue
    if [[ "$name" =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ || "$name" == *:* ]]; then
        san+="${san:+,}IP:$name"
    else
        san+="${san:+,}DNS:$name"
    fi
done
server_cn="${name_list[0]}"

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; chmod 600 "$1"; }
serial() { echo "0x$(openssl rand -hex 16)"; }

# sign KEY CN EXTENSIONS OUT: a leaf certificate signed by the CA. The
# extensions satisfy strict verifiers (Python's VERIFY_X509_STRICT among them).
sign() {
    local key="$1" cn="$2" ext="$3" crt="$4"
    openssl req -new -key "$key" -subj "/CN=$cn" -out "$work/req.csr"
    printf '%s\n' "basicConstraints = critical, CA:FALSE" \
        "keyUsage = critical, digitalSignature" \
        "subjectKeyIdentifier = hash" \
        "authorityKeyIdentifier = keyid" \
        "$ext" > "$work/ext.cnf"
    openssl x509 -req -in "$work/req.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "$(serial)" \
        -days "$days" -sha256 -extfile "$work/ext.cnf" -out "$crt" 2>/dev/null
    chmod 644 "$crt"
}

if [ ! -s "$out/ca.key" ] || [ ! -s "$out/ca.crt" ]; then
    newkey "$out/ca.key"
    openssl req -x509 -new -key "$out/ca.key" -subj "/CN=Starling throwaway test CA" -days "$days" -sha256 \
        -set_serial "$(serial)" \
        -addext "basicConstraints = critical, CA:TRUE, pathlen:0" \
        -addext "keyUsage = critical, keyCertSign, cRLSign" \
        -addext "subjectKeyIdentifier = hash" \
        -out "$out/ca.crt"
    chmod 644 "$out/ca.crt"
fi

newkey "$out/server.key"
sign "$out/server.key" "$server_cn" "extendedKeyUsage = serverAuth
subjectAltName = $san" "$out/server.crt"

if [ -n "$client_cn" ]; then
    newkey "$out/$client_cn.key"
    sign "$out/$client_cn.key" "$client_cn" "extendedKeyUsage = clientAuth" "$out/$client_cn.crt"
fi

openssl verify -CAfile "$out/ca.crt" "$out/server.crt" >/dev/null
echo "make-certs: wrote CA, server ($san)${client_cn:+ and client $client_cn} into $out"
