#!/usr/bin/env bash
# A Chromium for the dashboard's browser test, where the system has none that Playwright can drive.
#
#   hw/install-browser.sh VENV_PYTHON
#   hw/install-browser.sh --check      exit 0 if the system has a Chromium Playwright can drive (no snap)
#
# Debian's chromium (hw/install-system.sh installs it) is used as it is: nothing to do. On Ubuntu the chromium
# package is a snap (its deb a stub) and Playwright cannot drive the snap's confined browser, so this installs
# Playwright's own Chromium (`python -m playwright install --with-deps chromium`: a download from Playwright's
# servers into ~/.cache/ms-playwright, and the libraries it needs with apt-get). If that fails (no network to
# those servers, no root), it says so and exits 0: the browser test then skips, naming what is missing
# (and fails under STARLING_CI=1).
set -euo pipefail
python="${1:?usage: hw/install-browser.sh VENV_PYTHON | --check}"

system_chromium() {
    test -x /usr/lib/chromium/chromium && return 0
    local c
    for c in chromium chromium-browser; do
        c="$(command -v "$c" 2>/dev/null)" || continue
        case "$(readlink -f "$c")" in /snap/*) continue ;; esac
        head -c 4096 "$c" 2>/dev/null | grep -q snap && continue
        return 0
    done
    return 1
}
if [ "$python" = --check ]; then system_chromium; exit; fi
[ -n "${STARLING_CHROMIUM:-}" ] && exit 0
system_chromium && exit 0
own="$("$python" -c 'from playwright.sync_api import sync_playwright
with sync_playwright() as p: print(p.chromium.executable_path)' 2>/dev/null)" || own=""
[ -n "$own" ] && [ -x "$own" ] && exit 0

echo "install-browser.sh: no system Chromium that Playwright can drive; installing Playwright's own"
deps="--with-deps"
if [ "$(id -u)" != 0 ] && ! command -v sudo >/dev/null 2>&1; then deps=""; fi
if ! "$python" -m playwright install $deps chromium; then
    echo "install-browser.sh: could not install Playwright's Chromium; the dashboard's browser test will skip." >&2
    echo "  On Debian: apt-get install chromium. Elsewhere, with network: $python -m playwright install --with-deps chromium" >&2
fi
exit 0
