"""A personal touch, measured: each device's accuracy with the federation's model and with its own tuning of it.

    add_personal_figures(report, scenario, gateways, devices, say)   # hw/emulate.py, after build_report

With `[personalization]` in a scenario (a classifier only), after the run each device takes its gateway's final
release (the newest in the gateway's lineage, read from its blob store) and tunes it as a device with
`[personalization]` does before inference: `agent.personalize.Personalizer`, the agent's own code and settings,
on the device's training windows only. Both models are then scored on the device's own test windows. The emulated
devices do not run inference themselves, so the emulator does this step for them, with their data and their
graph; it is the same computation a device does (agent/inference.py).

The report gets

    global_accuracy         the final release's accuracy, the mean over devices, each on its own test windows
    personalized_accuracy   the same with each device's tuned model
    personalization         the settings, `gain` (personalized - global), `round` per gateway, and `devices`:
                            per device its gateway, test and training windows, global and personalized
                            accuracy, and `tuned` (false: the tuning did not fit its training windows better
                            than the release, so the device runs the release, as an agent does)

Unlike the round figures (weighted by each device's number of test windows), these are plain means over
devices: what a device's owner sees. `error` says what stopped the computation; the run's record comes first.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .model_report import round_model
from .report_parts import as_dict, as_list, as_num, esc, fmt, table
from .scenario import Scenario

DIGITS = 4


def add_personal_figures(report: dict[str, Any], scenario: Scenario, gateways: list[Any],
                         devices: list[tuple[str, Path]], say: Callable[[str], None] = lambda _: None) -> None:
    """With [personalization]: `global_accuracy`, `personalized_accuracy` and `personalization` (in place).
    Never raises: a failure is the section's `error`."""
    if scenario.personalization is None:
        return
    section: dict[str, Any] = {**asdict(scenario.personalization), "gateways": {}, "devices": []}
    section["weights"] = list(section["weights"])
    report["personalization"] = section
    try:
        from agent.personalize import Personalizer
        from firmware_models.runtime import TrainableModel

        spec = scenario.model_spec
        manifest = json.loads((spec.folder / "manifest.json").read_text(encoding="utf-8"))
        model = TrainableModel(spec.folder / manifest.get("file", "model.tflite"), manifest=manifest)
        tuner = Personalizer(scenario.personalization, model, seed=scenario.seed)
        section["weights"] = list(tuner.names)
        paths = dict(devices)
        for g in gateways:
            releases = (report.get("gateways", {}).get(g.name) or {}).get("lineage", {}).get("releases") or []
            newest = next((r for r in releases if isinstance(r, dict) and r.get("model")), None)  # newest first
            release = None if newest is None else round_model(g.home / "blobs", newest["model"])
            if release is None:
                section["gateways"][g.name] = {"round": None, "missing": True}
                continue
            section["gateways"][g.name] = {"round": newest.get("round"), "model": newest["model"]}
            for name in g.devices:
                if name in paths:
                    section["devices"].append({"device": name, "gateway": g.name,
                                               **_device_figures(tuner, model, release, paths[name])})
        scored = [d for d in section["devices"] if d["test_windows"]]
        if scored:
            report["global_accuracy"] = _mean(d["global"] for d in scored)
            report["personalized_accuracy"] = _mean(d["personalized"] for d in scored)
            section["gain"] = round(report["personalized_accuracy"] - report["global_accuracy"], DIGITS)
            say(f"starling-emulate: personalization ({tuner.settings.steps} steps of {','.join(tuner.names)}) on "
                f"{len(scored)} devices: accuracy {report['global_accuracy']:.3f} global, "
                f"{report['personalized_accuracy']:.3f} personalized")
    except Exception as exc:  # noqa: BLE001 (the report says so; the run's record comes first)
        section["error"] = f"{type(exc).__name__}: {exc}"
        say(f"starling-emulate: personalization could not be measured: {section['error']}")


def _device_figures(tuner: Any, model: Any, release: dict[str, np.ndarray], path: Path) -> dict[str, Any]:
    """One device: the release and its tuning of it, each scored on the device's test windows."""
    with np.load(path, allow_pickle=False) as npz:
        x_train, y_train = npz["x_train"].astype(np.float32), npz["y_train"].astype(np.int32)
        x_test, y_test = npz["x_test"].astype(np.float32), npz["y_test"].astype(np.int32)
    if not len(x_test):
        return {"test_windows": 0, "global": None, "personalized": None}
    from agent.personalize import NotBetter

    model.set_weights(release)
    before = _accuracy(model, x_test, y_test)
    tuned = False
    if len(x_train):
        try:
            tuner.fit(release, x_train, y_train)  # the model now holds the tuned weights
            tuned = True
        except NotBetter:  # the device runs the release as it is: its personalized accuracy is the global one
            pass
    after = _accuracy(model, x_test, y_test) if tuned else before
    return {"test_windows": int(len(x_test)), "train_windows": int(len(x_train)), "tuned": tuned,
            "global": round(before, DIGITS), "personalized": round(after, DIGITS)}


def _accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(model.predict(x), axis=1) == y))


def _mean(values: Any) -> float:
    return round(float(np.mean(list(values))), DIGITS)


# --- the page (hw/report.py) ---------------------------------------------------------------------------------------

def personal_html(report: dict[str, Any]) -> str:
    """The page's "Personalization" part: the settings, the mean accuracy over devices with the final release and
    with each device's tuning of it, and a row per device; "" when the report has no `personalization`."""
    section = as_dict(report.get("personalization"))
    if not section:
        return ""
    gateways = {str(gw): as_dict(g) for gw, g in as_dict(section.get("gateways")).items()}
    releases = ", ".join(f"{esc(gw)}'s round {fmt(as_num(g.get('round')), 0)}" for gw, g in gateways.items()
                         if not g.get("missing"))
    weights = ", ".join(str(w) for w in as_list(section.get("weights"))) or "the output layer"
    lr = as_num(section.get("lr"))
    parts = ["<h2>Personalization</h2>\n",
             f"<p>Each device took its gateway's final model ({releases or '–'}) and tuned it on its own training "
             f"windows, as a device with [personalization] does before inference: "
             f"{fmt(as_num(section.get('steps')), 0)} SGD steps of {esc(weights)} at learning rate "
             f"{'–' if lr is None else f'{lr:g}'}."]
    devices = [d for d in as_list(section.get("devices")) if isinstance(d, dict)]
    before, after = as_num(report.get("global_accuracy")), as_num(report.get("personalized_accuracy"))
    if before is not None and after is not None:
        gain = as_num(section.get("gain"))
        scored = sum(1 for d in devices if as_num(d.get("test_windows")))
        parts.append(f" Mean over the {scored} devices, each on its own test windows: accuracy <b>{fmt(before)}</b> "
                     f"with the final model, <b>{fmt(after)}</b> personalized, a gain of "
                     f"<b>{_signed(after - before if gain is None else gain)}</b>.")
    parts.append("</p>\n")
    missing = [gw for gw, g in gateways.items() if g.get("missing")]
    if missing:
        parts.append(f'<p class="bad">No final model in the blob store of {esc(", ".join(missing))}: '
                     "its devices were not scored.</p>\n")
    if section.get("error"):
        parts.append(f'<p class="bad">Personalization could not be measured: {esc(section["error"])}</p>\n')
    rows = []
    for d in devices:
        g, p = as_num(d.get("global")), as_num(d.get("personalized"))
        rows.append([esc(d.get("device")), esc(d.get("gateway")), fmt(as_num(d.get("test_windows")), 0), fmt(g),
                     fmt(p), "–" if g is None or p is None else _signed(p - g)])
    if rows:
        parts.append(table(["device", "gateway", "test windows", "global model", "personalized", "difference"],
                           rows, [2, 3, 4, 5]))
    return "".join(parts)


def _signed(value: float) -> str:
    return f"{round(value, 3) + 0.0:+.3f}"  # + 0.0: no "-0.000"
