"""A reconstruction model's figures in the emulator's report: per round, its error on the normal test windows and
how well that error finds the injected anomalies.

    add_model_figures(report, scenario, gateways, devices, say)   # hw/emulate.py, after build_report
    html = model_html(report, plots, folder_rel)                  # hw/report.py's page; draw(plotter): hw/report_plots.py

Where a classifier's figures come from: its devices' own federated evaluation, each round, of the model the
gateway released in that round (`accuracy` and `loss` of result.json's rounds, weighted by the gateway's rule). A
reconstruction model (`task` "reconstruction": imu_autoencoder) has no accuracy; its devices report `loss`, their
mean reconstruction error over their test windows, injected anomalies included. The emulator knows more than a
device: which of those windows it faulted (the replay file's `anomaly_test`, hw/partition.py). So after the run
the model each round evaluated (the newest release of the gateway's lineage up to that round, per the ledger,
read from the gateway's blob store, which keeps every round's model in such a run) is run over every test window
of that gateway's devices with the devices' own TFLite graph, and each of its rounds gets:

    reconstruction_loss   the mean per-window reconstruction error (normalized units, the model's own score)
                          over the normal test windows
    anomaly_auc           with [dataset] anomalies: the ROC AUC of that error as the anomaly score, faulted
                          against normal windows, pooled over the gateway's devices (rank-based, ties half)

The report's `anomalies` (with [dataset] anomalies) holds the settings, the test windows and the faulted ones by
kind, and per gateway its last round's AUC overall and by kind (each kind's windows against the normal ones);
`missing_models` names round models no blob store held, `error` what stopped the evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from .anomalies import KIND_CODES, auc
from .model_tables import RECONSTRUCTION, SYNTHETIC
from .report_parts import (
    PALETTE,
    as_dict,
    as_list,
    as_num,
    as_rounds,
    esc,
    fmt,
    img,
    plot_label,
    round_index,
    table,
)
from .scenario import Scenario

ROUND_KEYS = ("reconstruction_loss", "anomaly_auc")
DIGITS = 4


def add_model_figures(report: dict[str, Any], scenario: Scenario, gateways: list[Any],
                      devices: list[tuple[str, Path]], say: Callable[[str], None] = lambda _: None) -> None:
    """For a reconstruction model: each gateway's rounds get ROUND_KEYS (in place: the top-level `rounds` are the
    first gateway's), and the report `anomalies` when the scenario injects them. Never raises: a failure is the
    section's `error` (the run's record comes first)."""
    if scenario.model == SYNTHETIC or scenario.model_spec.task != RECONSTRUCTION:
        return
    section: dict[str, Any] = {**asdict(scenario.anomalies), "kinds": list(scenario.anomalies.kinds),
                               "gateways": {}} if scenario.anomalies else {}
    try:
        from agent.model_source import load_model

        _, model = load_model(scenario.model)
        windows = dict(_test_windows(path) for _, path in devices)
        if section:
            kinds = np.concatenate([k for _, k in windows.values()]) if windows else np.zeros(0, np.int8)
            section["windows"] = int(len(kinds))
            section["faulted"] = {kind: int(np.sum(kinds == code)) for kind, code in KIND_CODES.items()
                                  if kind in scenario.anomalies.kinds}
        paths = dict(devices)
        missing: list[str] = []
        for g in gateways:
            gateway = report.get("gateways", {}).get(g.name) or {}
            mine = [windows[str(paths[name])] for name in g.devices if str(paths.get(name)) in windows]
            if not mine or not gateway.get("rounds"):
                continue
            x = np.concatenate([w for w, _ in mine])
            kinds = np.concatenate([k for _, k in mine])
            final = _score_rounds(model, gateway, x, kinds, g.home / "blobs", bool(section), missing)
            if section and final is not None:
                section["gateways"][g.name] = final
        say(f"starling-emulate: each round's model scored on the test windows of {len(windows)} devices"
            + (f" ({sum(section['faulted'].values())} of {section['windows']} faulted)" if section else ""))
        if missing:
            section["missing_models"] = sorted(set(missing))
            say(f"starling-emulate: {len(section['missing_models'])} round models were no longer in a blob store")
    except Exception as exc:  # noqa: BLE001 (the report says so; the run's record comes first)
        section["error"] = f"{type(exc).__name__}: {exc}"
        say(f"starling-emulate: the round models could not be scored: {section['error']}")
    if scenario.anomalies:
        report["anomalies"] = section


def _test_windows(path: Path) -> tuple[str, tuple[np.ndarray, np.ndarray]]:
    """A device's replay file -> (its path, (its test windows, their fault codes: 0 where none was injected))."""
    with np.load(path, allow_pickle=False) as npz:
        x = npz["x_test"].astype(np.float32)
        kinds = npz["anomaly_test"] if "anomaly_test" in npz.files else np.zeros(len(x), np.int8)
    return str(path), (x, kinds)


def _score_rounds(model: Any, gateway: dict[str, Any], x: np.ndarray, kinds: np.ndarray, blobs: Path,
                  anomalies: bool, missing: list[str]) -> dict[str, Any] | None:
    """Score every round of `gateway` (its report section) on (x, kinds); return its last scored round's AUC
    overall and by kind (None: no round was scored)."""
    releases = [r for r in ((gateway.get("lineage") or {}).get("releases") or [])
                if isinstance(r, dict) and isinstance(r.get("round"), int)]  # newest first (the ledger's walk)
    errors_of: dict[str, np.ndarray | None] = {}
    last = None
    for record in gateway["rounds"]:
        digest = next((r["model"] for r in releases if r["round"] <= record.get("round", -1)), None)
        if digest is None:
            continue
        if digest not in errors_of:
            weights = round_model(blobs, digest)
            if weights is None:
                missing.append(digest)
                errors_of[digest] = None
            else:
                model.set_weights(weights)
                errors_of[digest] = model.reconstruction_error(x).astype(np.float64)
        errors = errors_of[digest]
        if errors is None:
            continue
        normal = kinds == 0
        record["reconstruction_loss"] = round(float(errors[normal].mean()), DIGITS) if normal.any() else None
        if anomalies:
            record["anomaly_auc"] = _rounded(auc(errors, ~normal))
            last = (record.get("round"), errors)
    if last is None:
        return None
    round_, errors = last
    by_kind = {}
    for kind, code in KIND_CODES.items():
        pick = (kinds == 0) | (kinds == code)
        if np.any(kinds == code):
            by_kind[kind] = _rounded(auc(errors[pick], kinds[pick] == code))
    return {"round": round_, "anomaly_auc": _rounded(auc(errors, kinds != 0)), "by_kind": by_kind}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DIGITS)


def round_model(blobs: Path, digest: str) -> dict[str, np.ndarray] | None:
    """The model `digest` (hex) from a gateway's blob store (read-only); None if it does not hold it."""
    from gateway.blobs import BlobStore
    from protocol.schemas import decode_model

    try:
        data = BlobStore(blobs, read_only=True).get(bytes.fromhex(digest))
    except (FileNotFoundError, ValueError):
        return None
    return None if data is None else decode_model(data)


# --- the page (hw/report.py) ---------------------------------------------------------------------------------------

def draw(plotter: Any) -> Path | None:
    """Reconstruction loss and anomaly AUC per round, a line per gateway; None when the report has neither."""
    series = plotter._per_round()
    present = [key for key in ROUND_KEYS if any(as_num(r.get(key)) is not None for _, rs in series for r in rs)]
    if not present:
        return None
    fig, axes = plotter._figure(rows=len(present), height=3.0)
    titles = {"reconstruction_loss": ("Reconstruction error per round (normal test windows)", None),
              "anomaly_auc": ("Anomaly AUC per round (the error as the score of the injected faults)", (0.0, 1.02))}
    for ax, key in zip(axes, present):
        for i, (name, rs) in enumerate(series):
            pts = [(x, v) for x, r in zip(round_index(rs), rs) if (v := as_num(r.get(key))) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)], label=plot_label(name))
        label, limits = titles[key]
        ax.set_ylabel(key)
        ax.set_title(label)
        if limits:
            ax.set_ylim(*limits)
        plotter._finish_round_axis(ax)
    return plotter._save(fig, "model")


def model_html(report: dict[str, Any], plots: dict[str, Path], folder_rel: str) -> str:
    """The page's "Reconstruction and anomalies" part: the plot and the last round's AUC by kind; "" when the
    report has no reconstruction figures."""
    rounds = [r for g in as_dict(report.get("gateways")).values() if isinstance(g, dict)
              for r in as_rounds(g.get("rounds"))] or as_rounds(report.get("rounds"))
    section = as_dict(report.get("anomalies"))
    if not section and not any(as_num(r.get(key)) is not None for r in rounds for key in ROUND_KEYS):
        return ""
    parts = ["<h2>Reconstruction and anomalies</h2>\n",
             img(plots, "model", "reconstruction error and anomaly AUC per round", folder_rel)]
    if section:
        kinds = [str(k) for k in as_list(section.get("kinds"))]
        faulted = as_dict(section.get("faulted"))
        parts.append(f"<p>Injected: {esc(', '.join(kinds))} in {fmt(as_num(section.get('share')), 2)} of each "
                     f"device's test windows (magnitude {fmt(as_num(section.get('magnitude')), 2)}): "
                     + esc(", ".join(f"{k} {faulted.get(k, 0)}" for k in kinds))
                     + f" of {fmt(as_num(section.get('windows')), 0)} windows.</p>\n")
        rows = [[esc(gw), fmt(as_num(g.get("round")), 0), fmt(as_num(g.get("anomaly_auc")))]
                + [fmt(as_num(as_dict(g.get("by_kind")).get(k))) for k in kinds]
                for gw, g in as_dict(section.get("gateways")).items() if isinstance(g, dict)]
        if rows:
            parts.append(table(["gateway", "last round", "anomaly AUC", *(f"AUC {esc(k)}" for k in kinds)], rows,
                                range(1, 3 + len(kinds))))
        if section.get("error"):
            parts.append(f'<p class="bad">{esc(section["error"])}</p>\n')
    return "".join(parts)
