"""The pieces every part of the emulator's web page shares: reading report.json tolerantly, formatting, HTML.

    from .report_parts import as_dict, as_num, esc, fmt, table, ...

The page (hw/report.py) is put together from sections written by several modules: its plots
(hw/report_plots.py), a reconstruction model's figures (hw/model_report.py), personalization
(hw/personal_report.py). They all read the same report, the same way, and write the same kind of HTML; what
they share is here, and this module imports nothing of hw/ (of the project, only protocol.fields), so any of them
can import it at the top without a cycle.

    as_num, as_dict, as_list, as_rounds, as_counts, as_series
                            a report value as the type wanted, or empty (None) when it is anything else: any
                            value of a report may be missing, None or of another shape
    round_times, round_index, faults_of, gateways_of, city_epochs, last_accuracy, rounds_done, total_of
                            the report's rounds, faults, gateways and city epochs
    esc, fmt, fmt_lineage, fmt_bytes
                            text and numbers as HTML for a table cell ("–" for a missing value)
    plot_label              a name as a plot's text (one line, at most MAX_LABEL characters)
    CSS, table, absent, img the page's style sheet and its HTML pieces; the cells given to `table` are HTML
                            already (escape text with esc, numbers with fmt)
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from protocol.fields import is_finite_number

NOT_IN_REPORT = "not in this report"
MAX_LABEL = 40  # characters of a name shown in a plot legend or label
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


# --- reading the report, tolerantly -------------------------------------------------------------------------

def as_num(value: Any) -> float | None:
    """A finite number, or None (for None, strings, bools, NaN and anything else)."""
    return float(value) if is_finite_number(value) else None


def as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def as_rounds(value: Any) -> list[dict]:
    """The round records of a list (anything else in it left out)."""
    return [r for r in as_list(value) if isinstance(r, dict)]


def as_counts(value: Any) -> dict[str, float]:
    """{reason: count} with the numeric counts only."""
    return {str(k): n for k, v in as_dict(value).items() if (n := as_num(v)) is not None}


def as_series(value: Any) -> list[tuple[float, float]]:
    """[[t, y], ...] (or [{t, value}, ...]) as (t, y) pairs with both numeric, sorted by t."""
    points = []
    for item in as_list(value):
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            t, y = as_num(item[0]), as_num(item[1])
        elif isinstance(item, dict):
            t = as_num(item.get("t"))
            y = as_num(next((item[k] for k in ("value", "height", "lag") if k in item), None))
        else:
            continue
        if t is not None and y is not None:
            points.append((t, y))
    return sorted(points)


# --- the report's rounds, faults, gateways ---------------------------------------------------------------------

def round_times(rounds: list[dict]) -> tuple[list[float], bool]:
    """Each round's end in seconds since the run started, and whether the rounds said so themselves.

    A round's own `t` wins; the others end `seconds` (0 when missing) after the previous end.
    """
    ends, explicit, clock = [], False, 0.0
    for r in rounds:
        t = as_num(r.get("t"))
        if t is not None:
            explicit = True
            clock = t
        else:
            clock += max(0.0, as_num(r.get("seconds")) or 0.0)
        ends.append(clock)
    return ends, explicit


def round_index(rounds: list[dict]) -> list[float]:
    """The x of each round: its `round` when numeric, else its position."""
    xs = []
    for i, r in enumerate(rounds):
        n = as_num(r.get("round"))
        xs.append(n if n is not None else (xs[-1] + 1 if xs else float(i)))
    return xs


def faults_of(report: dict) -> list[dict]:
    """The fault timeline as {t, t_end, kind, target, detail} (times numeric or None), in time order."""
    out = []
    for f in as_list(report.get("faults")):
        if isinstance(f, dict):
            out.append({"t": as_num(f.get("t")), "t_end": as_num(f.get("t_end")), "kind": f.get("kind"),
                        "target": f.get("target"), "detail": f.get("detail")})
    return sorted(out, key=lambda f: (f["t"] is None, f["t"] or 0.0))


def gateways_of(report: dict) -> dict[str, dict]:
    """The per-gateway sections, or a single one made of the top-level keys when there are none."""
    gws = {str(k): as_dict(v) for k, v in as_dict(report.get("gateways")).items()}
    if gws:
        return gws
    if not as_rounds(report.get("rounds")) and not as_dict(report.get("ledger")):
        return {}
    name = as_dict(report.get("gateway")).get("name") or "gateway"
    return {str(name): {"rounds": report.get("rounds"), "rejections": report.get("rejections"),
                        "ledger": report.get("ledger"), "state": as_dict(report.get("gateway")).get("state"),
                        "lineage": report.get("lineage")}}


def city_epochs(report: dict) -> list[dict]:
    return [e for e in as_list(as_dict(report.get("city")).get("epochs")) if isinstance(e, dict)]


def last_accuracy(rounds: list[dict]) -> float | None:
    """The accuracy of the last round that has one."""
    for r in reversed(rounds):
        if (a := as_num(r.get("accuracy"))) is not None:
            return a
    return None


def rounds_done(rounds: list[dict]) -> int:
    """Training rounds in `rounds`: round 0 is the initial model's evaluation, not a round of training."""
    return sum(1 for r in rounds if as_num(r.get("round")) != 0)


def total_of(rounds: list[dict], key: str) -> float | None:
    """The sum of the rounds' numeric `key` (None when no round has one)."""
    values = [v for r in rounds if (v := as_num(r.get(key))) is not None]
    return sum(values) if values else None


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
    lineage = as_dict(value)
    if not lineage:
        return "–"
    text = f"{fmt(as_num(lineage.get('length')), 0)} releases"
    if lineage.get("complete") is True:
        text += ', <span class="good">complete</span>'
    elif lineage.get("complete") is False:
        gap = as_dict(lineage.get("gap")).get("model")
        text += ', <span class="bad">broken</span>' + (f" at {esc(str(gap)[:16])}…" if gap else "")
    restarts = [r for r in as_list(lineage.get("restarts_crossed")) if isinstance(r, dict)]
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


def plot_label(value: Any, limit: int = MAX_LABEL) -> str:
    """A name as plot text: one line, shortened (drawn with math parsing off, so `$` is literal)."""
    text = " ".join(("" if value is None else str(value)).split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text or "?"


# --- HTML ------------------------------------------------------------------------------------------------

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


def table(header: Iterable[str], rows: Iterable[Iterable[str]], numeric: Iterable[int] = ()) -> str:
    """An HTML table; the cells are already HTML (escape them with esc/fmt); `numeric`: the right-aligned
    columns."""
    numeric = set(numeric)
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>\n" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}</table>\n"


def absent(what: str) -> str:
    """The page's note for a part the report does not have."""
    return f'<p class="absent">{esc(what)}: {NOT_IN_REPORT}.</p>\n'


def img(plots: dict[str, Path], name: str, alt: str, folder_rel: str) -> str:
    """The plot `name` (one of `plots`, name -> PNG written in the folder at `folder_rel`); "" when not drawn."""
    if name not in plots:
        return ""
    src = quote(f"{folder_rel}/{plots[name].name}")  # a relative URL: a space or '#' in the stem stays a path
    return f'<p><img src="{esc(src)}" alt="{esc(alt)}"></p>\n'
