#!/usr/bin/env bash
# Print the Python interpreter one of Starling's environments is made with, or say on stderr why there is none
# (exit 1). The Makefile calls it; hw/install-system.sh installs a Python when it finds none.
#
#   hw/find-python.sh full      Python 3.11 to 3.13, for .venv and .venv-build: the gateway's Flower (1.41, 1.42)
#                               needs 3.11 or newer; TensorFlow 2.21 (the build extra) has wheels for 3.10 to 3.13
#   hw/find-python.sh tflite    Python 3.8 to 3.11, for .venv-tflite-runtime: tflite-runtime 2.14 has wheels for those
#                               only (as on 32-bit Raspberry Pi OS, whose Python is 3.11)
#
# The system's python3 comes first when it fits, then python3.13 ... python3.8 (newest first for `full`,
# 3.11 first for `tflite`) from PATH.
set -euo pipefail
kind="${1:-full}"
case "$kind" in
    full) lo=11; hi=13; order="13 12 11" ;;
    tflite) lo=8; hi=11; order="11 10 9 8" ;;
    *) echo "find-python.sh: unknown kind $kind (full or tflite)" >&2; exit 2 ;;
esac
for candidate in python3 $(for m in $order; do echo "python3.$m"; done); do
    path="$(command -v "$candidate" 2>/dev/null)" || continue
    minor="$("$path" -c 'import sys; print(sys.version_info[1] if sys.version_info[0] == 3 else -1)' 2>/dev/null)" || continue
    if [ "$minor" -ge "$lo" ] && [ "$minor" -le "$hi" ]; then
        echo "$path"
        exit 0
    fi
done
have="$(command -v python3 >/dev/null 2>&1 && python3 -c 'import sys; print("python3 is %d.%d" % sys.version_info[:2])' || echo "no python3")"
case "$kind" in
    full) echo "find-python.sh: no Python 3.11 to 3.13 here ($have): Starling's gateway needs Flower 1.41 or 1.42," \
               "which needs Python 3.11 or newer. hw/install-system.sh installs one where the distribution has it" \
               "(Ubuntu 22.04: python3.11 python3.11-venv), or run make with PY=/path/to/python3.11" >&2 ;;
    tflite) echo "find-python.sh: no Python 3.8 to 3.11 here ($have): tflite-runtime 2.14 has wheels for those only" >&2 ;;
esac
exit 1
