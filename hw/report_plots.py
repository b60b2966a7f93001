"""The emulator's web page's plots: a PNG per figure the report can fill, drawn into the page's folder.

    plotter = Plotter(folder, report)        # ImportError without matplotlib
    plots = plotter.write_all()              # {name: PNG path}, for PLOT_NAMES the report has data for

Each figure is a method of `Plotter` named as in PLOT_NAMES, returning the PNG written or None (nothing to
draw); a section of the page drawn by another module hands its figure to a function given the plotter (`model`:
hw/model_report.py's `draw`). Plots over rounds and over time mark the report's faults as hw/report.py's
docstring says.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), deterministic (no
dates or version in the PNG metadata), with math parsing off so that a `$` in a device or gateway name is drawn
as it is.
"""

from __future__ import annotations

from pathlib import Path

from .model_report import draw as draw_model
from .report_parts import (
    NOT_IN_REPORT,
    PALETTE,
    as_counts,
    as_dict,
    as_list,
    as_num,
    as_rounds,
    as_series,
    city_epochs,
    faults_of,
    fmt,
    gateways_of,
    plot_label,
    round_index,
    round_times,
)

PLOT_NAMES = ("accuracy", "model", "participation", "rejections", "bytes", "ledger", "attacks", "comparison")
DPI = 100
# By kind, else by the kind's first word: a crash (kill -9) and a clean stop of a gateway look different.
FAULT_COLOURS = {"gateway_restart": "#d62728", "gateway_stop": "#b8860b", "kill": "#d62728",
                 "restart": "#2ca02c", "partition": "#9467bd", "heal": "#17becf", "broker": "#ff7f0e",
                 "churn": "#8c564b"}


def _accuracy_list(entry: dict) -> list[tuple[float, float | None]]:
    """A comparison entry's accuracy per round: from `accuracy` (numbers or round dicts) or `rounds`."""
    acc = entry.get("accuracy")
    if isinstance(acc, list):
        if acc and all(isinstance(a, dict) for a in acc):
            return list(zip(round_index(acc), (as_num(a.get("accuracy")) for a in acc)))
        return [(float(i), as_num(a)) for i, a in enumerate(acc)]
    rounds = as_rounds(entry.get("rounds"))
    return list(zip(round_index(rounds), (as_num(r.get("accuracy")) for r in rounds)))


def _fault_label(f: dict) -> str:
    return plot_label(" ".join(str(p) for p in (f["kind"], f["target"]) if p not in (None, "")) or "fault", 28)


class Plotter:
    """Draws the figures into a folder; each method returns the PNG written or None (nothing to draw)."""

    def __init__(self, folder: Path, report: dict):
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self._Figure, self._Canvas = Figure, FigureCanvasAgg
        self.folder = folder
        self.report = report
        self.faults = [f for f in faults_of(report) if f["t"] is not None]
        self.gateways = gateways_of(report)

    def write_all(self) -> dict[str, Path]:
        """Every figure the report has data for, in PLOT_NAMES order: {name: PNG}; an earlier render's PNG of a
        figure this report no longer has is removed."""
        import matplotlib

        self.folder.mkdir(parents=True, exist_ok=True)
        plots: dict[str, Path] = {}
        # Names are user text: never parse them as math ($...$), never hand them to TeX.
        with matplotlib.rc_context({"text.parse_math": False, "text.usetex": False}):
            for name in PLOT_NAMES:
                path = getattr(self, name)()
                if path is not None:
                    plots[name] = path
        for name in PLOT_NAMES:
            stale = self.folder / f"{name}.png"
            if name not in plots and stale.exists():
                stale.unlink()
        return plots

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
            kind = plot_label(f["kind"] or "fault")
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
        xs = round_index(rounds)
        if not rounds:
            return lambda t: None
        first_start = ends[0] - max(0.0, as_num(rounds[0].get("seconds")) or 0.0)
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
        rounds = as_rounds(self.report.get("rounds"))
        if rounds:
            return rounds
        return max((as_rounds(g.get("rounds")) for g in self.gateways.values()), key=len, default=[])

    def _per_round(self) -> list[tuple[str, list[dict]]]:
        """(label, rounds) for each gateway with rounds."""
        return [(name, rs) for name, g in self.gateways.items() if (rs := as_rounds(g.get("rounds")))]

    def _finish_round_axis(self, ax, legend: bool = True) -> None:
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        self._mark_faults(ax, self._round_mapper(self._main_rounds()))
        if legend and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")

    # The figures -------------------------------------------------------------------------------------------

    def accuracy(self) -> Path | None:
        series = self._per_round()
        if not any(as_num(r.get("accuracy")) is not None for _, rs in series for r in rs):
            return None
        fig, (ax,) = self._figure()
        for i, (name, rs) in enumerate(series):
            pts = [(x, a) for x, r in zip(round_index(rs), rs) if (a := as_num(r.get("accuracy"))) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)],
                        label=plot_label(name))
        epochs = [(x, a) for e in city_epochs(self.report)
                  if (x := as_num(e.get("round"))) is not None and (a := as_num(e.get("accuracy"))) is not None]
        if epochs:  # the city model of each epoch, on every device of the city
            ax.plot(*zip(*epochs), linestyle="none", marker="*", markersize=11, color="black",
                    label="city model, all devices")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.set_title("Accuracy per round" + (" (gateways: on their own devices)" if epochs else ""))
        self._finish_round_axis(ax)
        return self._save(fig, "accuracy")

    def model(self) -> Path | None:
        return draw_model(self)  # a reconstruction model's loss and anomaly AUC per round

    def participation(self) -> Path | None:
        series = self._per_round()
        if not any(as_num(r.get("participants")) is not None for _, rs in series for r in rs):
            return None
        fig, (ax,) = self._figure()
        for i, (name, rs) in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            xs = round_index(rs)
            pts = [(x, p) for x, r in zip(xs, rs) if (p := as_num(r.get("participants"))) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, color=colour,
                        label=f"{plot_label(name)} participants")
            skipped = [(x, s) for x, r in zip(xs, rs) if (s := as_num(r.get("skipped"))) is not None]
            if any(s for _, s in skipped):
                ax.plot(*zip(*skipped), linestyle=":", marker="x", markersize=3, color=colour,
                        label=f"{plot_label(name)} skipped")
        ax.set_ylabel("devices")
        ax.set_ylim(bottom=0)
        ax.set_title("Participation per round (accepted updates; skipped = sat the round out)")
        self._finish_round_axis(ax)
        return self._save(fig, "participation")

    def rejections(self) -> Path | None:
        by_gateway = {name: as_counts(g.get("rejections")) for name, g in self.gateways.items()}
        reasons = sorted({r for c in by_gateway.values() for r in c})
        series = self._per_round()
        per_round = any(as_num(r.get("rejected")) for _, rs in series for r in rs)
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
                               color=PALETTE[i % len(PALETTE)], label=plot_label(name))
            ax_reason.set_yticks(y, [plot_label(r) for r in reasons], fontsize=8)
            ax_reason.invert_yaxis()
            ax_reason.set_xlabel("rejected updates (whole run)")
            if len(names) > 1:
                ax_reason.legend(fontsize=7)
        else:
            ax_reason.text(0.5, 0.5, "no rejection reasons in this report", ha="center", va="center",
                           transform=ax_reason.transAxes)
        ax_reason.set_title("Rejected updates by reason")
        for i, (name, rs) in enumerate(series):
            pts = [(x, v) for x, r in zip(round_index(rs), rs) if (v := as_num(r.get("rejected"))) is not None]
            if pts:
                ax_round.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)],
                              label=plot_label(name))
        ax_round.set_ylabel("rejected")
        ax_round.set_ylim(bottom=0)
        ax_round.set_title("Rejected updates per round")
        self._finish_round_axis(ax_round)
        return self._save(fig, "rejections")

    def bytes(self) -> Path | None:
        series = self._per_round()
        keys = ("bytes_up", "bytes_down")
        if not any(as_num(r.get(k)) is not None for _, rs in series for r in rs for k in keys):
            return None
        fig, (ax,) = self._figure()
        for i, (name, rs) in enumerate(series):
            colour = PALETTE[i % len(PALETTE)]
            xs = round_index(rs)
            for key, style in (("bytes_up", "-"), ("bytes_down", "--")):
                pts = [(x, v / 1024) for x, r in zip(xs, rs) if (v := as_num(r.get(key))) is not None]
                if pts:
                    ax.plot(*zip(*pts), linestyle=style, marker="o", markersize=3, color=colour,
                            label=f"{plot_label(name)} {'up' if key == 'bytes_up' else 'down'}")
        ax.set_ylabel("KiB")
        ax.set_ylim(bottom=0)
        ax.set_title("Bytes per round (up: devices to gateway; down: gateway to devices)")
        self._finish_round_axis(ax)
        return self._save(fig, "bytes")

    def ledger(self) -> Path | None:
        heights = {n: as_series(as_dict(g.get("ledger")).get("height_series")) for n, g in self.gateways.items()}
        lags = {n: as_series(as_dict(g.get("ledger")).get("finality_lag_series"))
                for n, g in self.gateways.items()}
        if not any(heights.values()) and not any(lags.values()):
            return None
        fig, (ax_h, ax_l) = self._figure(rows=2)
        for ax, data, title, unit in ((ax_h, heights, "Ledger height per gateway", "vertices"),
                                      (ax_l, lags, "Finality lag per gateway", "lag")):
            for i, (name, pts) in enumerate(data.items()):
                if pts:
                    ax.step(*zip(*pts), where="post", marker=".", markersize=3,
                            color=PALETTE[i % len(PALETTE)], label=plot_label(name))
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
        attacks = [a for a in as_list(self.report.get("attacks")) if isinstance(a, dict)]
        reasons = sorted({r for a in attacks for r in as_counts(a.get("rejected"))})
        if not reasons:
            return None
        import numpy as np

        fig, (ax,) = self._figure()
        width = 0.8 / len(reasons)
        x = np.arange(len(attacks))
        for i, reason in enumerate(reasons):
            counts = [as_counts(a.get("rejected")).get(reason, 0) for a in attacks]
            ax.bar(x + i * width - 0.4 + width / 2, counts, width=width, color=PALETTE[i % len(PALETTE)],
                   label=plot_label(reason))
        labels = [plot_label(f"{a.get('attack')} ({fmt(as_num(a.get('fraction')), 2)})") for a in attacks]
        ax.set_xticks(x, labels, fontsize=8, rotation=15, ha="right")
        ax.set_ylabel("rejected updates")
        ax.set_title("Rejected updates per attack, by reason")
        ax.legend(fontsize=7)
        return self._save(fig, "attacks")

    def comparison(self) -> Path | None:
        runs = [c for c in as_list(self.report.get("comparison")) if isinstance(c, dict)]
        curves = [(c, [(x, a) for x, a in _accuracy_list(c) if a is not None]) for c in runs]
        finals = [(c, as_num(c.get("final_accuracy"))) for c in runs]
        if not any(pts for _, pts in curves) and not any(f is not None for _, f in finals):
            return None
        fig, (ax_curve, ax_final) = self._figure(rows=2)
        for i, (c, pts) in enumerate(curves):
            if pts:
                ax_curve.plot(*zip(*pts), marker="o", markersize=3, color=PALETTE[i % len(PALETTE)],
                              label=plot_label(c.get("name")))
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
        names = [plot_label(c.get("name")) for c, _ in finals]
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
