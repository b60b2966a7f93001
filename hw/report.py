"""The emulator's report as a web page: report.json in, report.html and PNG plots out.

    python -m hw.report report.json [--out report.html]

`write_html_report(report, out_html)` writes one self-contained page (no
script, no style sheet or font from elsewhere) and its plots as PNG files in
the folder `<stem>_plots/` beside it, referenced by relative paths, so the page
and its folder can be copied or zipped together. It draws whatever the report
holds and says "not in this report" for what it does not:

    scenario, seconds, timed_out, broker       the run
    config {strategy, devices, rounds, ...}    the scenario as run
    rounds [{round, accuracy, loss, participants, rejected, bytes_up,
             bytes_down, seconds, skipped, t?}]
                                               the (first) gateway's rounds
    rejections {reason: count}                 its rejected updates
    ledger {height, verified, problem}         its ledger
    lineage {length, complete, gap, restarts_crossed: [{crossed}]}
                                               its final model's chain of releases on the ledger
    gateway {name, id, state, exit_code}       it
    gateways {name: {rounds: [...], rejections: {...}, state?, lineage?,
                     ledger: {height?, verified?,
                              height_series: [[t, height], ...],
                              finality_lag_series: [[t, lag], ...]}}}
                                               every gateway of a multi-gateway run
    faults [{t, kind, target, detail, t_end?}] the fault timeline
    attacks [{attack, fraction, devices, rejected: {reason: count}, target?, flagged_by?}]
    final_accuracy                             the headline (with the city tier: the city model's)
    city {tier, every, rule, epochs: [{epoch, round, digests: {gw: hex}, agreed, inputs: [{gateway,
          weight}], left_out: [{gateway, reason}], accuracy}], final_digests, final_accuracy, flagged,
          audits}  or  {tier: false, isolated_accuracy: {gw: acc}, isolated_mean}
                                               the city tier (hw/city_report.py): a table, and the
                                               city model's accuracy per epoch on the accuracy plot
    comparison [{name, strategy, defense, attack, final_accuracy, all_devices_accuracy, accuracy: [...],
                 seconds}]
    rounds[i].reconstruction_loss, .anomaly_auc, anomalies {...}
                                               a reconstruction model's figures (drawn by hw/model_report.py)

Any value may be missing or None (a round without evaluation has accuracy
None): it is left out of the plots and shown as "–" in the tables.

The time axis. Fault times `t` and the ledger series' times are seconds since
the run started. A round may say when it ended with `t` (seconds since the
run started, the same clock); when it does not, the round ends are the
cumulative sum of the rounds' `seconds`, starting at 0 (as if round 0 began
when the run did, which makes faults appear slightly late by the set-up time;
the page says which of the two it used). Plots over rounds place every fault
at the fractional round position of its time (interpolated between round
ends); plots over time place it at `t`. Either way a fault is a dashed
vertical line labelled "kind target" (and a shaded span up to `t_end` when
given), on every plot that has a time or round axis.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global
backend switch), deterministic (no dates or version in the PNG metadata), with math parsing
off so that a `$` in a device or gateway name is drawn as it is.
Without matplotlib the page is still written, with a note in place of plots.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

NOT_IN_REPORT = "not in this report"
PLOT_NAMES = ("accuracy", "model", "participation", "rejections", "bytes", "ledger", "attacks", "comparison")
MAX_LABEL = 40  # characters of a name shown in a plot legend or label
DPI = 100
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]
# By kind, else by the kind's first word: a crash (kill -9) and a clean stop of a gateway look different.
FAULT_COLOURS = {"gateway_restart": "#d62728", "gateway_stop": "#b8860b", "kill": "#d62728",
                 "restart": "#2ca02c", "partition": "#9467bd", "heal": "#17becf", "broker": "#ff7f0e",
                 "churn": "#8c564b"}


# --- reading the report, tolerantly -------------------------------------------------------------------------

def _num(value: Any) -> float | None:
    """A finite number, or None (for None, strings, bools, NaN and anything else)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _rounds(value: Any) -> list[dict]:
    return [r for r in _list(value) if isinstance(r, dict)]


def _counts(value: Any) -> dict[str, float]:
    """{reason: count} with the numeric counts only."""
    return {str(k): n for k, v in _dict(value).items() if (n := _num(v)) is not None}


def _series(value: Any) -> list[tuple[float, float]]:
    """[[t, y], ...] (or [{t, value}, ...]) as (t, y) pairs with both numeric, sorted by t."""
    points = []
    for item in _list(value):
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            t, y = _num(item[0]), _num(item[1])
        elif isinstance(item, dict):
            t = _num(item.get("t"))
            y = _num(next((item[k] for k in ("value", "height", "lag") if k in item), None))
        else:
            continue
        if t is not None and y is not None:
            points.append((t, y))
    return sorted(points)


def round_times(rounds: list[dict]) -> tuple[list[float], bool]:
    """Each round's end in seconds since the run started, and whether the rounds said so themselves.

    A round's own `t` wins; the others end `seconds` (0 when missing) after the previous end.
    """
    ends, explicit, clock = [], False, 0.0
    for r in rounds:
        t = _num(r.get("t"))
        if t is not None:
            explicit = True
            clock = t
        else:
            clock += max(0.0, _num(r.get("seconds")) or 0.0)
        ends.append(clock)
    return ends, explicit


def _round_index(rounds: list[dict]) -> list[float]:
    """The x of each round: its `round` when numeric, else its position."""
    xs = []
    for i, r in enumerate(rounds):
        n = _num(r.get("round"))
        xs.append(n if n is not None else (xs[-1] + 1 if xs else float(i)))
    return xs


def _faults(report: dict) -> list[dict]:
    out = []
    for f in _list(report.get("faults")):
        if isinstance(f, dict):
            out.append({"t": _num(f.get("t")), "t_end": _num(f.get("t_end")), "kind": f.get("kind"),
                        "target": f.get("target"), "detail": f.get("detail")})
    return sorted(out, key=lambda f: (f["t"] is None, f["t"] or 0.0))


def _gateways(report: dict) -> dict[str, dict]:
    """The per-gateway sections, or a single one made of the top-level keys when there are none."""
    gws = {str(k): _dict(v) for k, v in _dict(report.get("gateways")).items()}
    if gws:
        return gws
    if not _rounds(report.get("rounds")) and not _dict(report.get("ledger")):
        return {}
    name = _dict(report.get("gateway")).get("name") or "gateway"
    return {str(name): {"rounds": report.get("rounds"), "rejections": report.get("rejections"),
                        "ledger": report.get("ledger"), "state": _dict(report.get("gateway")).get("state"),
                        "lineage": report.get("lineage")}}


def _final_accuracy(rounds: list[dict]) -> float | None:
    for r in reversed(rounds):
        if (a := _num(r.get("accuracy"))) is not None:
            return a
    return None


def _city_epochs(report: dict) -> list[dict]:
    return [e for e in _list(_dict(report.get("city")).get("epochs")) if isinstance(e, dict)]


def _rounds_done(rounds: list[dict]) -> int:
    """Training rounds in `rounds`: round 0 is the initial model's evaluation, not a round of training."""
    return sum(1 for r in rounds if _num(r.get("round")) != 0)


def _total(rounds: list[dict], key: str) -> float | None:
    values = [v for r in rounds if (v := _num(r.get(key))) is not None]
    return sum(values) if values else None


def _accuracy_list(entry: dict) -> list[tuple[float, float | None]]:
    """A comparison entry's accuracy per round: from `accuracy` (numbers or round dicts) or `rounds`."""
    acc = entry.get("accuracy")
    if isinstance(acc, list):
        if acc and all(isinstance(a, dict) for a in acc):
            return list(zip(_round_index(acc), (_num(a.get("accuracy")) for a in acc)))
        return [(float(i), _num(a)) for i, a in enumerate(acc)]
    rounds = _rounds(entry.get("rounds"))
    return list(zip(_round_index(rounds), (_num(r.get("accuracy")) for r in rounds)))


# --- formatting ------------------------------------------------------------------------------------------

def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value: Any, digits: int = 3) -> str:
    """A number for a table (escaped text for anything else; "–" for missing)."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value.is_integer() and abs(value) < 1e15 and digits == 0:
            return f"{int(value):,}"
        return f"{value:.{digits}f}"
    return esc(value)


def fmt_lineage(value: Any) -> str:
    """A model's lineage on the ledger in a table cell: its releases, whether it is whole, the restarts it
    ran through (HTML)."""
    lineage = _dict(value)
    if not lineage:
        return "–"
    text = f"{fmt(_num(lineage.get('length')), 0)} releases"
    if lineage.get("complete") is True:
        text += ', <span class="good">complete</span>'
    elif lineage.get("complete") is False:
        gap = _dict(lineage.get("gap")).get("model")
        text += ', <span class="bad">broken</span>' + (f" at {esc(str(gap)[:16])}…" if gap else "")
    restarts = [r for r in _list(lineage.get("restarts_crossed")) if isinstance(r, dict)]
    if restarts:
        crossed = sum(1 for r in restarts if r.get("crossed") is True)
        text += f", through {crossed} of {len(restarts)} restarts"
    return text


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return "–"  # pragma: no cover


def _label(value: Any, limit: int = MAX_LABEL) -> str:
    """A name as plot text: one line, shortened (drawn with math parsing off, so `$` is literal)."""
    text = " ".join(("" if value is None else str(value)).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text or "?"


def _fault_label(f: dict) -> str:
    return _label(" ".join(str(p) for p in (f["kind"], f["target"]) if p not in (None, "")) or "fault", 28)


# --- plots -----------------------------------------------------------------------------------------------

class _Plotter:
    """Draws the figures into a folder; each method returns the PNG written or None (nothing to draw)."""

    def __init__(self, folder: Path, report: dict):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._Figure, self._Canvas = Figure, FigureCanvasAgg
        self.folder = folder
        self.report = report
        self.faults = [f for f in _faults(report) if f["t"] is not None]
        self.gateways = _gateways(report)

    def _figure(self, rows: int = 1, height: float = 3.4):
        fig = self._Figure(figsize=(9, height * rows), dpi=DPI)
        self._Canvas(fig)
        axes = [fig.add_subplot(rows, 1, i + 1) for i in range(rows)]
        for ax in axes:
            ax.grid(True, alpha=0.3)
        return fig, axes

    def _save(self, fig, name: str) -> Path:
        path = self.folder / f"{name}.png"
        fig.tight_layout()
        # metadata: no software version or date, so a report renders to the same bytes every time
        fig.savefig(path, format="png", dpi=DPI, metadata={"Software": None})
        return path

    # Fault markers ------------------------------------------------------------------------------------------

    def _mark_faults(self, ax, to_x=lambda t: t) -> None:
        """Dashed vertical lines (and spans to t_end) at the faults, labelled at the top of the axes."""
        if not self.faults:
            return
        transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
        seen: set[str] = set()
        for i, f in enumerate(self.faults):
            x = to_x(f["t"])
            if x is None:
                continue
            kind_key = str(f["kind"]).lower()
            colour = FAULT_COLOURS.get(kind_key) or FAULT_COLOURS.get(kind_key.split("_")[0], "#555555")
            kind = _label(f["kind"] or "fault")
            ax.axvline(x, color=colour, linestyle="--", linewidth=1.1, alpha=0.85,
                       label=f"fault: {kind}" if kind not in seen else None)
            seen.add(kind)
            if f["t_end"] is not None and (x_end := to_x(f["t_end"])) is not None and x_end > x:
                ax.axvspan(x, x_end, color=colour, alpha=0.08)
            ax.text(x, 0.98 - 0.1 * (i % 3), _fault_label(f), transform=transform, rotation=90,
                    va="top", ha="right", fontsize=7, color=colour, clip_on=True,
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.7, "pad": 1})

    def _round_mapper(self, rounds: list[dict]):
        """Seconds since start -> fractional round position, interpolated between round ends."""
        ends, _ = round_times(rounds)
        xs = _round_index(rounds)
        if not rounds:
            return lambda t: None
        first_start = ends[0] - max(0.0, _num(rounds[0].get("seconds")) or 0.0)
        ts, rs = [first_start] + ends, [xs[0] - 1.0] + xs
        # np.interp needs increasing times: keep the last point of each run of equal ones
        pts = sorted({t: r for t, r in zip(ts, rs)}.items())

        def to_x(t: float) -> float | None:
            import numpy as np

            if len(pts) == 1:
                return pts[0][1]
            return float(np.interp(t, [p[0] for p in pts], [p[1] for p in pts]))

        return to_x

    def _main_rounds(self) -> list[dict]:
        """The rounds that define the round axis: the top-level ones, else the longest gateway's."""
        rounds = _rounds(self.report.get("rounds"))
        if rounds:
            return rounds
        return max((_rounds(g.get("rounds")) for g in self.gateways.values()), key=len, default=[])

    def _per_round(self) -> list[tuple[str, list[dict]]]:
        """(label, rounds) for each gateway with rounds."""
        return [(name, rs) for name, g in self.gateways.items() if (rs := _rounds(g.get("rounds")))]

    def _finish_round_axis(self, ax, legend: bool = True) -> None:
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        self._mark_faults(ax, self._round_mapper(self._main_rounds()))
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")

    # The figures -------------------------------------------------------------------------------------------

    def accuracy(self) -> Path | None:
        series = self._per_round()
        if not any(_num(r.get("accuracy")) is not None for _, rs in series for r in rs):
            return None
        fig, (ax,) = self._figure()
        for i, (name, rs) in enumerate(series):
            pts = [(x, a) for x, r in zip(_round_index(rs), rs) if (a := _num(r.get("accuracy"))) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)],
                        label=_label(name))
        epochs = [(x, a) for e in _city_epochs(self.report)
                  if (x := _num(e.get("round"))) is not None and (a := _num(e.get("accuracy"))) is not None]
        if epochs:  # the city model of each epoch, on every device of the city
            ax.plot(*zip(*epochs), linestyle="none", marker="*", markersize=11, color="black",
                    label="city model, all devices")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title("Accuracy per round" + (" (gateways: on their own devices)" if epochs else ""))
        self._finish_round_axis(ax)
        return self._save(fig, "accuracy")

    def model(self) -> Path | None:
        from .model_report import draw

        return draw(self)

    def participation(self) -> Path | None:
        series = self._per_round()
        if not any(_num(r.get("participants")) is not None for _, rs in series for r in rs):
            return None
        fig, (ax,) = self._figure()
        for i, (name, rs) in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            xs = _round_index(rs)
            pts = [(x, p) for x, r in zip(xs, rs) if (p := _num(r.get("participants"))) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=colour,
                        label=f"{_label(name)} participants")
            skipped = [(x, s) for x, r in zip(xs, rs) if (s := _num(r.get("skipped"))) is not None]
            if any(s for _, s in skipped):
                ax.plot(*zip(*skipped), linestyle=":", marker="x", markersize=3, color=colour,
                        label=f"{_label(name)} skipped")
        ax.set_ylabel("devices")
        ax.set_ylim(bottom=0)
        ax.set_title("Participation per round (accepted updates; skipped = sat the round out)")
        self._finish_round_axis(ax)
        return self._save(fig, "participation")

    def rejections(self) -> Path | None:
        by_gateway = {name: _counts(g.get("rejections")) for name, g in self.gateways.items()}
        reasons = sorted({r for c in by_gateway.values() for r in c})
        series = self._per_round()
        per_round = any(_num(r.get("rejected")) for _, rs in series for r in rs)
        if not reasons and not per_round:
            return None
        fig, (ax_reason, ax_round) = self._figure(rows=2)
        if reasons:
            import numpy as np

            names = [n for n, c in by_gateway.items() if c]
            width = 0.8 / max(1, len(names))
            y = np.arange(len(reasons))
            for i, name in enumerate(names):
                counts = [by_gateway[name].get(r, 0) for r in reasons]
                ax_reason.barh(y + i * width - 0.4 + width / 2, counts, height=width,
                               color=PALETTE[i % len(PALETTE)], label=_label(name))
            ax_reason.set_yticks(y, [_label(r) for r in reasons], fontsize=8)
            ax_reason.invert_yaxis()
            ax_reason.set_xlabel("rejected updates (whole run)")
            if len(names) > 1:
                ax_reason.legend(fontsize=7)
        else:
            ax_reason.text(0.5, 0.5, "no rejection reasons in this report", ha="center", va="center",
                           transform=ax_reason.transAxes)
        ax_reason.set_title("Rejected updates by reason")
        for i, (name, rs) in enumerate(series):
            pts = [(x, v) for x, r in zip(_round_index(rs), rs) if (v := _num(r.get("rejected"))) is not None]
            if pts:
                ax_round.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)],
                              label=_label(name))
        ax_round.set_ylabel("rejected")
        ax_round.set_ylim(bottom=0)
        ax_round.set_title("Rejected updates per round")
        self._finish_round_axis(ax_round)
        return self._save(fig, "rejections")

    def bytes(self) -> Path | None:
        series = self._per_round()
        keys = ("bytes_up", "bytes_down")
        if not any(_num(r.get(k)) is not None for _, rs in series for r in rs for k in keys):
            return None
        fig, (ax,) = self._figure()
        for i, (name, rs) in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            xs = _round_index(rs)
            for key, style in (("bytes_up", "-"), ("bytes_down", "--")):
                pts = [(x, v / 1024) for x, r in zip(xs, rs) if (v := _num(r.get(key))) is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle=style, marker="o", markersize=3, color=colour,
                            label=f"{_label(name)} {'up' if key == 'bytes_up' else 'down'}")
        ax.set_ylabel("KiB")
        ax.set_ylim(bottom=0)
        ax.set_title("Bytes per round (up: devices to gateway; down: gateway to devices)")
        self._finish_round_axis(ax)
        return self._save(fig, "bytes")

    def ledger(self) -> Path | None:
        heights = {n: _series(_dict(g.get("ledger")).get("height_series")) for n, g in self.gateways.items()}
        lags = {n: _series(_dict(g.get("ledger")).get("finality_lag_series"))
                for n, g in self.gateways.items()}
        if not any(heights.values()) and not any(lags.values()):
            return None
        fig, (ax_h, ax_l) = self._figure(rows=2)
        for ax, data, title, unit in ((ax_h, heights, "Ledger height per gateway", "vertices"),
                                      (ax_l, lags, "Finality lag per gateway", "lag")):
            for i, (name, pts) in enumerate(data.items()):
                if pts:
                    ax.step(*zip(*pts), where="post", marker=".", markersize=3,
                            color=PALETTE[i % len(PALETTE)], label=_label(name))
            if not any(data.values()):
                ax.text(0.5, 0.5, f"{title.lower()}: {NOT_IN_REPORT}", ha="center", va="center",
                        transform=ax.transAxes)
            ax.set_title(title)
            ax.set_ylabel(unit)
            ax.set_xlabel("seconds since the run started")
            ax.set_ylim(bottom=0)
            self._mark_faults(ax)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best")
        return self._save(fig, "ledger")

    def attacks(self) -> Path | None:
        attacks = [a for a in _list(self.report.get("attacks")) if isinstance(a, dict)]
        reasons = sorted({r for a in attacks for r in _counts(a.get("rejected"))})
        if not reasons:
            return None
        import numpy as np

        fig, (ax,) = self._figure()
        width = 0.8 / len(reasons)
        x = np.arange(len(attacks))
        for i, reason in enumerate(reasons):
            counts = [_counts(a.get("rejected")).get(reason, 0) for a in attacks]
            ax.bar(x + i * width - 0.4 + width / 2, counts, width=width, color=PALETTE[i % len(PALETTE)],
                   label=_label(reason))
        labels = [_label(f"{a.get('attack')} ({fmt(_num(a.get('fraction')), 2)})") for a in attacks]
        ax.set_xticks(x, labels, fontsize=8, rotation=15, ha="right")
        ax.set_ylabel("rejected updates")
        ax.set_title("Rejected updates per attack, by reason")
        ax.legend(fontsize=7)
        return self._save(fig, "attacks")

    def comparison(self) -> Path | None:
        runs = [c for c in _list(self.report.get("comparison")) if isinstance(c, dict)]
        curves = [(c, [(x, a) for x, a in _accuracy_list(c) if a is not None]) for c in runs]
        finals = [(c, _num(c.get("final_accuracy"))) for c in runs]
        if not any(pts for _, pts in curves) and not any(f is not None for _, f in finals):
            return None
        fig, (ax_curve, ax_final) = self._figure(rows=2)
        for i, (c, pts) in enumerate(curves):
            if pts:
                ax_curve.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)],
                              label=_label(c.get("name")))
        if not any(pts for _, pts in curves):
            ax_curve.text(0.5, 0.5, f"accuracy per round: {NOT_IN_REPORT}", ha="center", va="center",
                          transform=ax_curve.transAxes)
        ax_curve.set_title("Accuracy per round, by run")
        ax_curve.set_xlabel("round")
        ax_curve.set_ylabel("accuracy")
        ax_curve.set_ylim(0, 1.02)
        ax_curve.xaxis.get_major_locator().set_params(integer=True)
        if ax_curve.get_legend_handles_labels()[0]:
            ax_curve.legend(fontsize=7)
        names = [_label(c.get("name")) for c, _ in finals]
        values = [f if f is not None else 0.0 for _, f in finals]
        colours = [PALETTE[i % len(PALETTE)] for i in range(len(finals))]
        bars = ax_final.barh(range(len(finals)), values, color=colours)
        for bar, (_, f) in zip(bars, finals):
            ax_final.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {fmt(f)}",
                          va="center", fontsize=8)
        ax_final.set_yticks(range(len(finals)), names, fontsize=8)
        ax_final.invert_yaxis()
        ax_final.set_xlim(0, 1.1)
        ax_final.set_xlabel("final accuracy")
        ax_final.set_title("Final accuracy, by run")
        return self._save(fig, "comparison")


# --- the page --------------------------------------------------------------------------------------------

CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1000px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
img { max-width: 100%; border: 1px solid #eee; }
.absent { color: #888; font-style: italic; }
.bad { color: #b00; font-weight: bold; } .good { color: #070; font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
"""


def _table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; the cells are already HTML (escape them with esc/fmt)."""
    numeric = set(numeric)
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def _absent(what: str) -> str:
    return f'<p class="absent">{esc(what)}: {NOT_IN_REPORT}.</p>\n'


def _img(plots: dict[str, Path], name: str, alt: str, folder_rel: str) -> str:
    if name not in plots:
        return ""
    src = quote(f"{folder_rel}/{plots[name].name}")  # a relative URL: a space or '#' in the stem stays a path
    return f'<p><img src="{esc(src)}" alt="{esc(alt)}"></p>\n'


def _summary(report: dict) -> list[tuple[str, str]]:
    rounds = _rounds(report.get("rounds"))
    gws = _gateways(report)
    all_rounds = [r for g in gws.values() for r in _rounds(g.get("rounds"))] or rounds
    config = _dict(report.get("config"))
    ledger = _dict(report.get("ledger"))
    gateway = _dict(report.get("gateway"))
    verified = ledger.get("verified")
    finals = [a for g in gws.values() if (a := _final_accuracy(_rounds(g.get("rounds")))) is not None]
    rejected = sum(_counts(report.get("rejections")).values()) if not report.get("gateways") else \
        sum(sum(_counts(g.get("rejections")).values()) for g in gws.values())
    rows = [
        ("scenario", esc(report.get("scenario") or config.get("name") or "–")),
        ("strategy", esc(config.get("strategy") or "–")),
        ("gateways", fmt(len(gws)) if gws else "–"),
        ("devices", fmt(config.get("devices"))),
        ("rounds completed", fmt(_rounds_done(rounds)) if rounds else "–"),
        ("final accuracy", fmt(_final_accuracy(rounds) if rounds else (finals[-1] if finals else None))),
    ]
    city = _dict(report.get("city"))
    if "final_accuracy" in report:  # the headline (with the city tier: the city model's on every device)
        rows[-1] = ("final accuracy" + (" (the city model, on all devices)" if city.get("tier") else ""),
                    fmt(_num(report.get("final_accuracy"))))
    if len(finals) > 1:
        rows.append(("final accuracy per gateway (min – max)",
                     f"{fmt(min(finals))} – {fmt(max(finals))}"))
    best = [a for r in all_rounds if (a := _num(r.get("accuracy"))) is not None]
    rows += [
        ("best accuracy", fmt(max(best)) if best else "–"),
        ("accepted updates", fmt(_total(all_rounds, "participants"), 0)),
        ("rejected updates", fmt(rejected, 0) if rejected or report.get("rejections") is not None else "–"),
        ("bytes up / down",
         f"{fmt_bytes(_total(all_rounds, 'bytes_up'))} / {fmt_bytes(_total(all_rounds, 'bytes_down'))}"),
        ("ledger height", fmt(ledger.get("height"))),
        ("ledger verified", "–" if verified is None else
         ('<span class="good">yes</span>' if verified else
          f'<span class="bad">no</span> {esc(ledger.get("problem") or "")}')),
        ("gateway state", esc(gateway.get("state") or "–")),
        ("model lineage", fmt_lineage(report.get("lineage"))),
        ("faults", fmt(len(_list(report.get("faults")))) if "faults" in report else "–"),
        ("run time", f"{fmt(_num(report.get('seconds')), 1)} s"),
    ]
    if report.get("timed_out"):
        rows.append(("timed out", '<span class="bad">yes</span>'))
    return rows


def _short(digest: Any) -> str:
    return esc(str(digest)[:12]) if digest else "–"


def _city_html(city: dict) -> str:
    """The city tier, compactly: a row per epoch (digests, inputs, left out, accuracy on all devices), the final
    digests, flagged gateways and audits; or each isolated gateway's final model on every device."""
    if city.get("error"):
        return f'<p class="bad">The city evaluation failed: {esc(city["error"])}</p>\n'
    note = f'<p class="note">{esc(city["note"])}</p>\n' if city.get("note") else ""
    over = (f'<p class="note">Accuracy on the test windows of every device in the city: {fmt(city.get("devices"))} '
            f'devices, {fmt(city.get("windows"))} windows.</p>\n') if city.get("windows") else ""
    if not city.get("tier"):
        accuracy = _dict(city.get("isolated_accuracy"))
        if not accuracy:
            return note + _absent("isolated gateways' accuracy on all devices")
        rows = [[esc(gw), fmt(_num(a))] for gw, a in accuracy.items()]
        rows.append(["<b>mean</b>", fmt(_num(city.get("isolated_mean")))])
        return (note + "<p>No city tier: each gateway's final model, on every device of the city.</p>\n"
                + _table(["gateway", "accuracy on all devices"], rows, [1]) + over)
    tier = (f'<p>A city epoch every {fmt(city.get("every"))} rounds, rule {esc(city.get("rule") or "–")}, '
            f'audit share {fmt(_num(city.get("audit_share")), 2)}.</p>\n')
    parts = [note, tier]
    if city.get("problem"):
        parts.append(f'<p class="bad">{esc(city["problem"])}</p>\n')
    rows = []
    for e in _city_epochs({"city": city}):
        digests = _dict(e.get("digests"))
        distinct = sorted({str(d) for d in digests.values()})
        models = (f'<span class="good">one</span> ({_short(distinct[0])})' if e.get("agreed") else
                  '<span class="bad">' + "; ".join(
                      f"{_short(d)}: {esc(', '.join(gw for gw, x in digests.items() if str(x) == d))}"
                      for d in distinct) + "</span>")
        taken = [i for i in _list(e.get("inputs")) if isinstance(i, dict)]
        total = sum(w for i in taken if (w := _num(i.get("weight"))) is not None)
        inputs = ", ".join(esc(i.get("gateway")) + (f" {fmt(w / total, 2)}" if total and (w := _num(i.get("weight")))
                                                     is not None else "") for i in taken)
        left = ", ".join(f"{esc(x.get('gateway'))} ({esc(x.get('reason'))})"
                         for x in _list(e.get("left_out")) if isinstance(x, dict))
        rows.append([fmt(e.get("epoch")), fmt(e.get("round")), models, inputs or "–", left or "–",
                     fmt(_num(e.get("accuracy")))])
    parts.append(_table(["epoch", "round", "city model", "inputs (share of the weight)", "left out",
                         "accuracy, all devices"],
                        rows, [0, 1, 5]) if rows else _absent("city epochs"))
    finals = _dict(city.get("final_digests"))
    distinct = {str(d) for d in finals.values()}
    flagged = _dict(city.get("flagged"))
    audits = _dict(city.get("audits"))
    summary = [
        ("final city model", "–" if not finals else
         f'<span class="good">one digest</span> {_short(next(iter(distinct)))}' if len(distinct) == 1 else
         f'<span class="bad">{len(distinct)} digests</span> ' + "; ".join(f"{esc(gw)} {_short(d)}"
                                                                          for gw, d in finals.items())),
        ("final accuracy, all devices", fmt(_num(city.get("final_accuracy")))),
        ("flagged (mismatch evidence)", "; ".join(
            f"{esc(gw)} by {esc(', '.join(map(str, _list(_dict(f).get('accusers')))) or '?')} "
            f"({esc(_dict(f).get('kind') or 'mismatch')}: {esc(_dict(f).get('reason') or '–')})"
            for gw, f in flagged.items()) or "none"),
        ("audits", ", ".join(f"{k} {fmt(_num(audits.get(k)), 0)}" for k in
                             ("checked", "match", "mismatch", "unverifiable", "missing_inputs")) if audits else "–"),
    ]
    alone = {gw: n for gw, n in _dict(city.get("alone")).items() if _num(n)}
    if alone:
        summary.append(("epochs merged alone (no record)", ", ".join(f"{esc(gw)} {fmt(n)}" for gw, n in alone.items())))
    if city.get("missing_models"):
        missing = ", ".join(str(d)[:12] for d in _list(city["missing_models"]))
        summary.append(("models no blob store held", esc(missing)))
    parts.append(_table(["", "value"], ([esc(k), v] for k, v in summary)))
    parts.append(over)
    return "".join(parts)


def render_html(report: dict, plots: dict[str, Path], folder_rel: str, plot_note: str | None = None) -> str:
    """The page, given the plots already written (name -> path) in the folder at `folder_rel`."""
    report = _dict(report)
    title = f"Starling emulator report: {report.get('scenario') or 'run'}"
    rounds_main = _rounds(report.get("rounds"))
    gws = _gateways(report)
    parts = ["<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
             f"<title>{esc(title)}</title>\n"
             f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"]
    if plot_note:
        parts.append(f'<p class="note">{esc(plot_note)}</p>\n')

    parts.append("<h2>Summary</h2>\n")
    parts.append(_table(["", "value"], ([esc(k), v] for k, v in _summary(report))))

    # Time axis note
    any_rounds = rounds_main or next((rs for g in gws.values() if (rs := _rounds(g.get("rounds")))), [])
    if any_rounds and (_faults(report) or report.get("gateways")):
        _, explicit = round_times(any_rounds)
        parts.append('<p class="note">Time axis: ' + (
            "round ends as reported by the gateway (seconds since the run started)." if explicit else
            "round ends derived as the cumulative sum of the rounds' durations from the run's start, "
            "so faults may appear slightly later than they were, by the set-up time.") +
            " Faults on per-round plots sit at the fractional round in progress at their time.</p>\n")

    parts.append("<h2>Accuracy</h2>\n")
    parts.append(_img(plots, "accuracy", "accuracy per round", folder_rel) or _absent("accuracy per round"))
    from .model_report import model_html

    parts.append(model_html(report, plots, folder_rel))  # a reconstruction model's loss and anomaly AUC, if any
    parts.append("<h2>Participation</h2>\n")
    parts.append(_img(plots, "participation", "participation per round", folder_rel)
                 or _absent("participation"))
    parts.append("<h2>Rejected updates</h2>\n")
    rejections = _counts(report.get("rejections"))
    by_gateway = {n: _counts(g.get("rejections")) for n, g in _dict(report.get("gateways")).items()
                  if isinstance(g, dict)}
    reasons = sorted({r for c in by_gateway.values() for r in c})
    if reasons:  # a multi-gateway run: a column per gateway, and the total
        names = list(by_gateway)
        parts.append(_table(["reason", *(esc(n) for n in names), "total"],
                            ([esc(r), *(fmt(by_gateway[n].get(r, 0), 0) for n in names),
                              fmt(sum(c.get(r, 0) for c in by_gateway.values()), 0)] for r in reasons),
                            range(1, len(names) + 2)))
    elif rejections:
        parts.append(_table(["reason", "updates"],
                            ([esc(k), fmt(v, 0)] for k, v in sorted(rejections.items())), [1]))
    elif "rejections" in report or by_gateway:
        parts.append("<p>No update was rejected.</p>\n")
    parts.append(_img(plots, "rejections", "rejected updates by reason", folder_rel)
                 or ("" if "rejections" in report or by_gateway else _absent("rejected updates")))
    parts.append("<h2>Bytes</h2>\n")
    parts.append(_img(plots, "bytes", "bytes per round", folder_rel) or _absent("bytes per round"))

    parts.append("<h2>Gateways and ledgers</h2>\n")
    if gws:
        rows = []
        for name, g in gws.items():
            rs = _rounds(g.get("rounds"))
            led = _dict(g.get("ledger"))
            heights = _series(led.get("height_series"))
            lags = _series(led.get("finality_lag_series"))
            height = _num(led.get("height"))
            height = height if height is not None else (heights[-1][1] if heights else None)
            rows.append([esc(name), esc(g.get("state") or "–"), fmt(_rounds_done(rs)) if rs else "–",
                         fmt(_final_accuracy(rs)), fmt(_total(rs, "participants"), 0),
                         fmt(sum(_counts(g.get("rejections")).values()), 0) if "rejections" in g else "–",
                         fmt(height, 0), fmt(max(v for _, v in lags), 1) if lags else "–",
                         fmt(led.get("verified")), fmt_lineage(g.get("lineage"))])
        parts.append(_table(["gateway", "state", "rounds", "final accuracy", "accepted", "rejected",
                             "ledger height", "max finality lag", "verified", "model lineage"], rows,
                            [2, 3, 4, 5, 6, 7]))
    else:
        parts.append(_absent("per-gateway results"))
    parts.append(_img(plots, "ledger", "ledger height and finality lag per gateway", folder_rel)
                 or _absent("ledger height and finality lag over time"))
    if "city" in report and len(gws) > 1:
        parts.append("<h2>City</h2>\n")
        parts.append(_city_html(_dict(report.get("city"))))

    parts.append("<h2>Faults</h2>\n")
    faults = _faults(report)
    if faults:
        parts.append(_table(["t (s)", "until (s)", "kind", "target", "detail"],
                            ([fmt(f["t"], 1), fmt(f["t_end"], 1), esc(f["kind"]), esc(f["target"]),
                              esc(f["detail"] if not isinstance(f["detail"], (dict, list)) else
                                  json.dumps(f["detail"], sort_keys=True))] for f in faults), [0, 1]))
    elif "faults" in report:
        parts.append("<p>No fault was injected.</p>\n")
    else:
        parts.append(_absent("fault timeline"))

    parts.append("<h2>Attacks</h2>\n")
    attacks = [a for a in _list(report.get("attacks")) if isinstance(a, dict)]
    if attacks:
        rows = []
        for a in attacks:
            rej = _counts(a.get("rejected"))
            devices = a.get("devices")
            by = ", ".join(map(str, _list(a.get("flagged_by")))) or "nobody"
            target = f" at {esc(a['target'])}, flagged by {esc(by)}" if a.get("target") else ""  # a gateway attack
            rows.append([esc(a.get("attack")) + target, fmt(_num(a.get("fraction")), 2),
                         fmt(len(devices)) if isinstance(devices, list) else fmt(_num(devices), 0),
                         fmt(sum(rej.values()), 0) if rej else "–",
                         ", ".join(f"{esc(k)}: {fmt(v, 0)}" for k, v in sorted(rej.items())) or "–"])
        parts.append(_table(["attack", "fraction", "devices", "rejected", "by reason"], rows, [1, 2, 3]))
        parts.append(_img(plots, "attacks", "rejected updates per attack", folder_rel))
    else:
        parts.append(_absent("attacks"))

    parts.append("<h2>Comparison</h2>\n")
    comparison = [c for c in _list(report.get("comparison")) if isinstance(c, dict)]
    if comparison:
        parts.append(_table(["run", "strategy", "weights / defense", "attack", "final accuracy", "on all devices"],
                            ([esc(c.get("name")), esc(c.get("strategy") or "–"), esc(c.get("defense") or "–"),
                              esc(c.get("attack") or "none"), fmt(_num(c.get("final_accuracy"))),
                              fmt(_num(c.get("all_devices_accuracy")))]
                             for c in comparison), [4, 5]))
        parts.append(_img(plots, "comparison", "accuracy by run", folder_rel))
    else:
        parts.append(_absent("strategy comparison"))

    if rounds_main:
        parts.append("<h2>Rounds</h2>\n<details><summary>every round</summary>\n")
        keys = ["round", "accuracy", "loss", "participants", "skipped", "rejected", "bytes_up", "bytes_down",
                "seconds"]
        digits = {"accuracy": 3, "loss": 3, "seconds": 2}
        parts.append(_table(keys,
                            ([fmt(_num(r.get(k)), digits.get(k, 0)) for k in keys] for r in rounds_main),
                            range(len(keys))))
        parts.append("</details>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts)


def plots_folder(out_html: Path) -> Path:
    return out_html.parent / f"{out_html.stem}_plots"


def write_html_report(report: dict, out_html: Path) -> list[Path]:
    """Write `out_html` and its PNG plots (in `<stem>_plots/` beside it); return the files written."""
    out_html = Path(out_html)
    report = _dict(report)
    folder = plots_folder(out_html)
    plots: dict[str, Path] = {}
    note = None
    try:
        plotter = _Plotter(folder, report)
    except ImportError:
        plotter = None
        note = "Plots need matplotlib (pip install 'starling[emulator]'); this page has the tables only."
    if plotter is not None:
        import matplotlib

        folder.mkdir(parents=True, exist_ok=True)
        # Names are user text: never parse them as math ($...$), never hand them to TeX.
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            for name in PLOT_NAMES:
                path = getattr(plotter, name)()
                if path is not None:
                    plots[name] = path
        for name in PLOT_NAMES:  # an earlier render's plot that this report no longer has
            stale = folder / f"{name}.png"
            if name not in plots and stale.exists():
                stale.unlink()
    page = render_html(report, plots, folder.name, note)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_name(out_html.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_html)
    return [out_html, *plots.values()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hw.report",
                                     description="Render an emulator report.json as report.html "
                                                 "with PNG plots.")
    parser.add_argument("report", help="the report.json written by starling-emulate")
    parser.add_argument("--out", help="the HTML file to write (default: the report's name with .html)")
    args = parser.parse_args(argv)
    src = Path(args.report)
    try:
        report = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"hw.report: cannot read {src}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(report, dict):
        print(f"hw.report: {src} is not a JSON object", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else src.with_suffix(".html")
    for path in write_html_report(report, out):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
