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
                 seconds, global_accuracy?, personalized_accuracy?}]
    rounds[i].reconstruction_loss, .anomaly_auc, anomalies {...}
                                               a reconstruction model's figures (drawn by hw/model_report.py)
    global_accuracy, personalized_accuracy, personalization {steps, lr, weights, gateways: {gw: {round, model}},
                     devices: [{device, gateway, test_windows, global, personalized}], gain, error?}
                                               each device's accuracy with the final model and with its own
                                               tuning of it (a table by hw/personal_report.py)

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

The plots are hw/report_plots.py's (matplotlib, deterministic PNGs). Without
matplotlib the page is still written, with a note in place of plots.

This module puts the page together, part after part in the page's order; the
parts that belong to one feature are that feature's module's (hw/model_report.py,
hw/personal_report.py), and what all of them share (reading the report
tolerantly, formatting, HTML pieces) is hw/report_parts.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model_report import model_html
from .personal_report import personal_html
from .report_parts import (
    CSS,
    NOT_IN_REPORT,
    absent,
    as_counts,
    as_dict,
    as_list,
    as_num,
    as_rounds,
    as_series,
    city_epochs,
    esc,
    faults_of,
    fmt,
    fmt_bytes,
    fmt_lineage,
    gateways_of,
    img,
    last_accuracy,
    round_times,
    rounds_done,
    table,
    total_of,
)
from .report_plots import Plotter

__all__ = ["NOT_IN_REPORT", "main", "plots_folder", "render_html", "round_times", "write_html_report"]


def write_html_report(report: dict, out_html: Path) -> list[Path]:
    """Write `out_html` and its PNG plots (in `<stem>_plots/` beside it); return the files written."""
    out_html = Path(out_html)
    report = as_dict(report)
    folder = plots_folder(out_html)
    plots: dict[str, Path] = {}
    note = None
    try:
        plotter = Plotter(folder, report)
    except ImportError:
        note = "Plots need matplotlib (pip install 'starling[emulator]'); this page has the tables only."
    else:
        plots = plotter.write_all()
    page = render_html(report, plots, folder.name, note)
    out_html.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_html.with_name(out_html.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_html)
    return [out_html, *plots.values()]


def plots_folder(out_html: Path) -> Path:
    return out_html.parent / f"{out_html.stem}_plots"


def render_html(report: dict, plots: dict[str, Path], folder_rel: str, plot_note: str | None = None) -> str:
    """The page, given the plots already written (name -> path) in the folder at `folder_rel`."""
    report = as_dict(report)
    title = f"Starling emulator report: {report.get('scenario') or 'run'}"

    def plot(name: str, alt: str, missing: str | None = None) -> str:
        """The plot `name`, else the note that the report lacks `missing` (None: nothing)."""
        return img(plots, name, alt, folder_rel) or (absent(missing) if missing else "")

    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{esc(title)}</title>\n"
        f"<style>{CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n",
        f'<p class="note">{esc(plot_note)}</p>\n' if plot_note else "",
        "<h2>Summary</h2>\n",
        table(["", "value"], ([esc(k), v] for k, v in _summary(report))),
        _time_axis_note(report),
        "<h2>Accuracy</h2>\n",
        plot("accuracy", "accuracy per round", "accuracy per round"),
        model_html(report, plots, folder_rel),  # a reconstruction model's loss and anomaly AUC, if any
        personal_html(report),  # each device's accuracy with its own tuning of the final model, if any
        "<h2>Participation</h2>\n",
        plot("participation", "participation per round", "participation"),
        _rejections_html(report, plot),
        "<h2>Bytes</h2>\n",
        plot("bytes", "bytes per round", "bytes per round"),
        _gateways_html(report, plot),
        _faults_html(report),
        _attacks_html(report, plot),
        _comparison_html(report, plot),
        _rounds_html(report),
        "</body>\n</html>\n",
    ])


# --- the page's parts, in its order ------------------------------------------------------------------------

def _summary(report: dict) -> list[tuple[str, str]]:
    rounds = as_rounds(report.get("rounds"))
    gws = gateways_of(report)
    all_rounds = [r for g in gws.values() for r in as_rounds(g.get("rounds"))] or rounds
    config = as_dict(report.get("config"))
    ledger = as_dict(report.get("ledger"))
    gateway = as_dict(report.get("gateway"))
    verified = ledger.get("verified")
    finals = [a for g in gws.values() if (a := last_accuracy(as_rounds(g.get("rounds")))) is not None]
    rejected = sum(as_counts(report.get("rejections")).values()) if not report.get("gateways") else \
        sum(sum(as_counts(g.get("rejections")).values()) for g in gws.values())
    rows = [
        ("scenario", esc(report.get("scenario") or config.get("name") or "–")),
        ("strategy", esc(config.get("strategy") or "–")),
        ("gateways", fmt(len(gws)) if gws else "–"),
        ("devices", fmt(config.get("devices"))),
        ("rounds completed", fmt(rounds_done(rounds)) if rounds else "–"),
        ("final accuracy", fmt(last_accuracy(rounds) if rounds else (finals[-1] if finals else None))),
    ]
    city = as_dict(report.get("city"))
    if "final_accuracy" in report:  # the headline (with the city tier: the city model's on every device)
        rows[-1] = ("final accuracy" + (" (the city model, on all devices)" if city.get("tier") else ""),
                    fmt(as_num(report.get("final_accuracy"))))
    if len(finals) > 1:
        rows.append(("final accuracy per gateway (min – max)",
                     f"{fmt(min(finals))} – {fmt(max(finals))}"))
    best = [a for r in all_rounds if (a := as_num(r.get("accuracy"))) is not None]
    rows += [
        ("best accuracy", fmt(max(best)) if best else "–"),
        ("accepted updates", fmt(total_of(all_rounds, "participants"), 0)),
        ("rejected updates", fmt(rejected, 0) if rejected or report.get("rejections") is not None else "–"),
        ("bytes up / down",
         f"{fmt_bytes(total_of(all_rounds, 'bytes_up'))} / {fmt_bytes(total_of(all_rounds, 'bytes_down'))}"),
        ("ledger height", fmt(ledger.get("height"))),
        ("ledger verified", "–" if verified is None else
         ('<span class="good">yes</span>' if verified else
          f'<span class="bad">no</span> {esc(ledger.get("problem") or "")}')),
        ("gateway state", esc(gateway.get("state") or "–")),
        ("model lineage", fmt_lineage(report.get("lineage"))),
        ("faults", fmt(len(as_list(report.get("faults")))) if "faults" in report else "–"),
        ("run time", f"{fmt(as_num(report.get('seconds')), 1)} s"),
    ]
    if report.get("timed_out"):
        rows.append(("timed out", '<span class="bad">yes</span>'))
    return rows


def _time_axis_note(report: dict) -> str:
    """How the plots place faults on the round axis: by the rounds' own times, or by their summed durations."""
    any_rounds = as_rounds(report.get("rounds")) or next(
        (rs for g in gateways_of(report).values() if (rs := as_rounds(g.get("rounds")))), [])
    if not any_rounds or not (faults_of(report) or report.get("gateways")):
        return ""
    _, explicit = round_times(any_rounds)
    return ('<p class="note">Time axis: ' + (
        "round ends as reported by the gateway (seconds since the run started)." if explicit else
        "round ends derived as the cumulative sum of the rounds' durations from the run's start, "
        "so faults may appear slightly later than they were, by the set-up time.") +
        " Faults on per-round plots sit at the fractional round in progress at their time.</p>\n")


def _rejections_html(report: dict, plot: Callable[..., str]) -> str:
    """Rejected updates by reason: a column per gateway and the total in a multi-gateway run."""
    parts = ["<h2>Rejected updates</h2>\n"]
    rejections = as_counts(report.get("rejections"))
    by_gateway = {n: as_counts(g.get("rejections")) for n, g in as_dict(report.get("gateways")).items()
                  if isinstance(g, dict)}
    reasons = sorted({r for c in by_gateway.values() for r in c})
    if reasons:  # a multi-gateway run: a column per gateway, and the total
        names = list(by_gateway)
        parts.append(table(["reason", *(esc(n) for n in names), "total"],
                           ([esc(r), *(fmt(by_gateway[n].get(r, 0), 0) for n in names),
                             fmt(sum(c.get(r, 0) for c in by_gateway.values()), 0)] for r in reasons),
                           range(1, len(names) + 2)))
    elif rejections:
        parts.append(table(["reason", "updates"],
                           ([esc(k), fmt(v, 0)] for k, v in sorted(rejections.items())), [1]))
    elif "rejections" in report or by_gateway:
        parts.append("<p>No update was rejected.</p>\n")
    said = "rejections" in report or by_gateway
    parts.append(plot("rejections", "rejected updates by reason", None if said else "rejected updates"))
    return "".join(parts)


def _gateways_html(report: dict, plot: Callable[..., str]) -> str:
    """A row per gateway (its rounds, accuracy, updates, ledger, lineage), the ledger plot, and the city tier."""
    parts = ["<h2>Gateways and ledgers</h2>\n"]
    gws = gateways_of(report)
    if gws:
        rows = []
        for name, g in gws.items():
            rs = as_rounds(g.get("rounds"))
            led = as_dict(g.get("ledger"))
            heights = as_series(led.get("height_series"))
            lags = as_series(led.get("finality_lag_series"))
            height = as_num(led.get("height"))
            height = height if height is not None else (heights[-1][1] if heights else None)
            rows.append([esc(name), esc(g.get("state") or "–"), fmt(rounds_done(rs)) if rs else "–",
                         fmt(last_accuracy(rs)), fmt(total_of(rs, "participants"), 0),
                         fmt(sum(as_counts(g.get("rejections")).values()), 0) if "rejections" in g else "–",
                         fmt(height, 0), fmt(max(v for _, v in lags), 1) if lags else "–",
                         fmt(led.get("verified")), fmt_lineage(g.get("lineage"))])
        parts.append(table(["gateway", "state", "rounds", "final accuracy", "accepted", "rejected",
                            "ledger height", "max finality lag", "verified", "model lineage"], rows,
                           [2, 3, 4, 5, 6, 7]))
    else:
        parts.append(absent("per-gateway results"))
    parts.append(plot("ledger", "ledger height and finality lag per gateway",
                      "ledger height and finality lag over time"))
    if "city" in report and len(gws) > 1:
        parts.append("<h2>City</h2>\n")
        parts.append(_city_html(as_dict(report.get("city"))))
    return "".join(parts)


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
        accuracy = as_dict(city.get("isolated_accuracy"))
        if not accuracy:
            return note + absent("isolated gateways' accuracy on all devices")
        rows = [[esc(gw), fmt(as_num(a))] for gw, a in accuracy.items()]
        rows.append(["<b>mean</b>", fmt(as_num(city.get("isolated_mean")))])
        return (note + "<p>No city tier: each gateway's final model, on every device of the city.</p>\n"
                + table(["gateway", "accuracy on all devices"], rows, [1]) + over)
    tier = (f'<p>A city epoch every {fmt(city.get("every"))} rounds, rule {esc(city.get("rule") or "–")}, '
            f'audit share {fmt(as_num(city.get("audit_share")), 2)}.</p>\n')
    parts = [note, tier]
    if city.get("problem"):
        parts.append(f'<p class="bad">{esc(city["problem"])}</p>\n')
    rows = []
    for e in city_epochs({"city": city}):
        digests = as_dict(e.get("digests"))
        distinct = sorted({str(d) for d in digests.values()})
        models = (f'<span class="good">one</span> ({_short(distinct[0])})' if e.get("agreed") else
                  '<span class="bad">' + "; ".join(
                      f"{_short(d)}: {esc(', '.join(gw for gw, x in digests.items() if str(x) == d))}"
                      for d in distinct) + "</span>")
        taken = [i for i in as_list(e.get("inputs")) if isinstance(i, dict)]
        total = sum(w for i in taken if (w := as_num(i.get("weight"))) is not None)
        inputs = ", ".join(esc(i.get("gateway")) + (f" {fmt(w / total, 2)}" if total and (w := as_num(i.get("weight")))
                                                     is not None else "") for i in taken)
        left = ", ".join(f"{esc(x.get('gateway'))} ({esc(x.get('reason'))})"
                         for x in as_list(e.get("left_out")) if isinstance(x, dict))
        rows.append([fmt(e.get("epoch")), fmt(e.get("round")), models, inputs or "–", left or "–",
                     fmt(as_num(e.get("accuracy")))])
    parts.append(table(["epoch", "round", "city model", "inputs (share of the weight)", "left out",
                         "accuracy, all devices"],
                        rows, [0, 1, 5]) if rows else absent("city epochs"))
    finals = as_dict(city.get("final_digests"))
    distinct = {str(d) for d in finals.values()}
    flagged = as_dict(city.get("flagged"))
    audits = as_dict(city.get("audits"))
    summary = [
        ("final city model", "–" if not finals else
         f'<span class="good">one digest</span> {_short(next(iter(distinct)))}' if len(distinct) == 1 else
         f'<span class="bad">{len(distinct)} digests</span> ' + "; ".join(f"{esc(gw)} {_short(d)}"
                                                                          for gw, d in finals.items())),
        ("final accuracy, all devices", fmt(as_num(city.get("final_accuracy")))),
        ("flagged (mismatch evidence)", "; ".join(
            f"{esc(gw)} by {esc(', '.join(map(str, as_list(as_dict(f).get('accusers')))) or '?')} "
            f"({esc(as_dict(f).get('kind') or 'mismatch')}: {esc(as_dict(f).get('reason') or '–')})"
            for gw, f in flagged.items()) or "none"),
        ("audits", ", ".join(f"{k} {fmt(as_num(audits.get(k)), 0)}" for k in
                             ("checked", "match", "mismatch", "unverifiable", "missing_inputs")) if audits else "–"),
    ]
    alone = {gw: n for gw, n in as_dict(city.get("alone")).items() if as_num(n)}
    if alone:
        summary.append(("epochs merged alone (no record)", ", ".join(f"{esc(gw)} {fmt(n)}" for gw, n in alone.items())))
    if city.get("missing_models"):
        missing = ", ".join(str(d)[:12] for d in as_list(city["missing_models"]))
        summary.append(("models no blob store held", esc(missing)))
    parts.append(table(["", "value"], ([esc(k), v] for k, v in summary)))
    parts.append(over)
    return "".join(parts)


def _faults_html(report: dict) -> str:
    parts = ["<h2>Faults</h2>\n"]
    faults = faults_of(report)
    if faults:
        parts.append(table(["t (s)", "until (s)", "kind", "target", "detail"],
                           ([fmt(f["t"], 1), fmt(f["t_end"], 1), esc(f["kind"]), esc(f["target"]),
                             esc(f["detail"] if not isinstance(f["detail"], (dict, list)) else
                                 json.dumps(f["detail"], sort_keys=True))] for f in faults), [0, 1]))
    elif "faults" in report:
        parts.append("<p>No fault was injected.</p>\n")
    else:
        parts.append(absent("fault timeline"))
    return "".join(parts)


def _attacks_html(report: dict, plot: Callable[..., str]) -> str:
    parts = ["<h2>Attacks</h2>\n"]
    attacks = [a for a in as_list(report.get("attacks")) if isinstance(a, dict)]
    if attacks:
        rows = []
        for a in attacks:
            rej = as_counts(a.get("rejected"))
            devices = a.get("devices")
            by = ", ".join(map(str, as_list(a.get("flagged_by")))) or "nobody"
            target = f" at {esc(a['target'])}, flagged by {esc(by)}" if a.get("target") else ""  # a gateway attack
            rows.append([esc(a.get("attack")) + target, fmt(as_num(a.get("fraction")), 2),
                         fmt(len(devices)) if isinstance(devices, list) else fmt(as_num(devices), 0),
                         fmt(sum(rej.values()), 0) if rej else "–",
                         ", ".join(f"{esc(k)}: {fmt(v, 0)}" for k, v in sorted(rej.items())) or "–"])
        parts.append(table(["attack", "fraction", "devices", "rejected", "by reason"], rows, [1, 2, 3]))
        parts.append(plot("attacks", "rejected updates per attack"))
    else:
        parts.append(absent("attacks"))
    return "".join(parts)


# A variant's figures beyond its final accuracy, a column each when some variant has them: [personalization]'s
# means over devices (hw/personal_report.py)
COMPARISON_EXTRAS = (("global_accuracy", "global model, device mean"),
                     ("personalized_accuracy", "personalized, device mean"))


def _comparison_html(report: dict, plot: Callable[..., str]) -> str:
    """A row per variant of a run of variants: its settings and final accuracy (and the extras it has)."""
    parts = ["<h2>Comparison</h2>\n"]
    comparison = [c for c in as_list(report.get("comparison")) if isinstance(c, dict)]
    if not comparison:
        return parts[0] + absent("strategy comparison")
    extras = [(key, head) for key, head in COMPARISON_EXTRAS if any(key in c for c in comparison)]
    header = ["run", "strategy", "weights / defense", "attack", "final accuracy", "on all devices",
              *(esc(head) for _, head in extras)]
    rows = ([esc(c.get("name")), esc(c.get("strategy") or "–"), esc(c.get("defense") or "–"),
             esc(c.get("attack") or "none"), fmt(as_num(c.get("final_accuracy"))),
             fmt(as_num(c.get("all_devices_accuracy"))), *(fmt(as_num(c.get(key))) for key, _ in extras)]
            for c in comparison)
    parts.append(table(header, rows, range(4, len(header))))
    parts.append(plot("comparison", "accuracy by run"))
    return "".join(parts)


def _rounds_html(report: dict) -> str:
    """Every round of the (first) gateway, folded away."""
    rounds = as_rounds(report.get("rounds"))
    if not rounds:
        return ""
    keys = ["round", "accuracy", "loss", "participants", "skipped", "rejected", "bytes_up", "bytes_down", "seconds"]
    digits = {"accuracy": 3, "loss": 3, "seconds": 2}
    return ("<h2>Rounds</h2>\n<details><summary>every round</summary>\n"
            + table(keys, ([fmt(as_num(r.get(k)), digits.get(k, 0)) for k in keys] for r in rounds), range(len(keys)))
            + "</details>\n")


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
