"""The dashboard in a real headless Chromium (driven by Playwright) while a real run goes on.

The browser: $STARLING_CHROMIUM, else Debian's chromium, else Playwright's own
(`python -m playwright install chromium`; hw/install-browser.sh runs it where the
system has no Chromium, as on Ubuntu, whose chromium package is a snap stub).
Without one the test skips, naming what to install; under STARLING_CI=1 it fails.

A real emulator run (Mosquitto, one gateway, three agents on watch data,
FedAvg) in a thread; the real `starling-dashboard` process on its broker; the
page opened in Chromium. The page must show the gateway, follow its rounds
(round, accuracy chart), show three bad replies published on a real device's
reply topic as that device's rejections, the gateway's and a rejection-spike
alert, and count a malformed status without breaking. A full-page screenshot
goes to the test's tmp dir and, if STARLING_SCREENSHOT_DIR is set, there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from required_tools import needs

from hw.dashboard_demo import EmulatorRun, publish_bad_replies, start_dashboard, wait_for
from hw.scenario import Scenario

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

ROUNDS = 8
EPOCHS = 30  # about 2 s a round here: slow enough to watch, the whole run well under a minute
STRANGER = "5" * 32  # a gateway id nobody has


def _snap(path: str) -> bool:
    """Ubuntu's chromium and chromium-browser: a wrapper of the snap, or a stub that asks for it. Playwright cannot
    drive the snap's confined browser (it cannot reach Playwright's profile folder), so it is not used."""
    if os.path.realpath(path).startswith("/snap/"):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return True
    return head.startswith(b"#!") and b"snap" in head


def _chromium() -> str | None:
    """A Chromium to drive: $STARLING_CHROMIUM, Debian's, one on PATH that is no snap, or Playwright's own."""
    override = os.environ.get("STARLING_CHROMIUM")
    if override:
        return override if os.access(override, os.X_OK) else None
    for candidate in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK) and not _snap(candidate):
            return candidate
    with sync_api.sync_playwright() as playwright:  # Playwright's own, if `playwright install chromium` ran
        own = playwright.chromium.executable_path
    return own if os.access(own, os.X_OK) else None


CHROMIUM = _chromium()
pytestmark = needs(CHROMIUM is not None, "no Chromium: on Debian apt-get install chromium (hw/install-system.sh); "
                                         "elsewhere python -m playwright install chromium (hw/install-browser.sh)")


def _publish(host: str, port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{os.getpid()}")
    client.connect(host, port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def _int_or_none(text: str | None) -> int | None:
    head = (text or "").split("/")[0].strip()
    return int(head) if head.isdigit() else None


def test_the_page_follows_a_live_run_and_shows_an_injected_bad_update_as_a_rejection(tmp_path: Path):
    emulator = EmulatorRun(Scenario(name="dashboard", devices=3, subjects=(1, 2, 3), rounds=ROUNDS, epochs=EPOCHS),
                           tmp_path).start()
    dashboard = None
    try:
        info = emulator.info(timeout=120)
        host, port, gw = info["broker"]["host"], info["broker"]["port"], info["gateway"]["id"]
        dashboard = start_dashboard(f"mqtt://{host}:{port}", tmp_path / "dashboard.log")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
                page.goto(dashboard.url, timeout=30_000)

                # The gateway appears, with its name and a state.
                card = page.locator(f'.card[data-gateway="{gw}"]')
                card.wait_for(timeout=120_000)
                assert card.locator('[data-field="name"]').text_content() == "gw-1"
                assert page.locator('[data-field="broker"]').text_content() == "broker connected"
                assert card.locator('[data-field="online"]').text_content() == "yes"  # waiting or running

                # A malformed status from nowhere is counted, and the page keeps working.
                _publish(host, port, f"starling/{STRANGER}/status", b"{ not json")
                wait_for(lambda: "Ignored 1 malformed" in (page.locator("#malformed").text_content() or ""), 20,
                         "the malformed count on the page")

                # A real device's row, then three bad replies on its reply topic.
                row = page.locator("#devices tbody tr").first
                row.wait_for(timeout=60_000)
                device = row.get_attribute("data-device")
                assert device and len(device) == 32
                first_round = _int_or_none(card.locator('[data-field="round"]').text_content())
                publish_bad_replies(host, port, gw, device, count=3)

                # Rounds go by on the page: the round number climbs and the chart gains points.
                seen_rounds: list[int] = []

                def round_reaches_the_end() -> bool:
                    value = _int_or_none(card.locator('[data-field="round"]').text_content())
                    if value is not None and (not seen_rounds or value != seen_rounds[-1]):
                        seen_rounds.append(value)
                    return value == ROUNDS

                wait_for(round_reaches_the_end, 240, f"round {ROUNDS} on the page", every=0.2)
                assert len(seen_rounds) >= 3 and seen_rounds == sorted(seen_rounds), seen_rounds
                assert first_round is None or first_round < ROUNDS
                wait_for(lambda: card.locator('[data-field="accuracy-chart"] circle').count() == ROUNDS + 1, 30,
                         "one chart point per evaluated round")
                accuracy = float(card.locator('[data-field="accuracy"]').text_content())
                assert 0.3 < accuracy <= 1.0

                # The bad replies: on the device's row, on the gateway's card, and as an alert.
                device_row = page.locator(f'#devices tr[data-device="{device}"]')
                # (Under load an agent may also re-send an accepted reply before its receipt comes: `replay`.)
                wait_for(lambda: "malformed 3" in device_row.locator('[data-field="rejected"]').text_content(), 60,
                         "the device's rejections on the page")
                assert "malformed 3" in card.locator('[data-field="rejections"]').text_content()
                spike = page.locator('#alerts li[data-rule="rejection_spike"]')
                spike.wait_for(timeout=30_000)
                assert "malformed 3" in spike.text_content()
                wait_for(lambda: card.locator('[data-field="state"]').text_content() == "done", 120,
                         "the gateway's final state")
                assert int(card.locator('[data-field="ledger-height"]').text_content()) > ROUNDS
                assert card.locator('[data-field="online"]').text_content() == "run ended"

                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                if os.environ.get("STARLING_SCREENSHOT_DIR"):
                    out = Path(os.environ["STARLING_SCREENSHOT_DIR"])
                    out.mkdir(parents=True, exist_ok=True)
                    shutil.copy(shot, out / "dashboard.png")
                assert shot.stat().st_size > 10_000
                assert errors == [], errors
            finally:
                browser.close()
        report = emulator.finish(timeout=120)
        assert report is not None and report["gateway"]["state"] == "done"
        assert report["rejections"].get("malformed") == 3
        assert dashboard.stop() == 0
        log = dashboard.log.read_text()
        assert "dashboard.stop" in log and "Traceback" not in log
    finally:
        emulator.stop_event.set()
        if dashboard is not None and dashboard.process.poll() is None:
            dashboard.process.kill()
            dashboard.process.wait()
        emulator.finish(timeout=60)
