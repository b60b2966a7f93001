"""A small inline SVG chart of a gateway's accuracy per round, drawn on the server.

Built only from numbers this module formats itself (no text from the
network), so the page can insert it as markup. Presentation attributes
only (no `style`), so the page's Content-Security-Policy needs no inline styles.
"""

from __future__ import annotations

from collections.abc import Sequence

WIDTH, HEIGHT = 260, 70
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 28, 8, 6, 14


def accuracy_svg(points: Sequence[tuple[int, float]], width: int = WIDTH, height: int = HEIGHT) -> str:
    """`points` are (round, accuracy in [0, 1]) pairs in round order; accuracy is drawn on a fixed 0..1 axis."""
    inner_w = width - PAD_LEFT - PAD_RIGHT
    inner_h = height - PAD_TOP - PAD_BOTTOM
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" aria-label="accuracy per round">')]
    for level in (0.0, 0.5, 1.0):
        y = PAD_TOP + inner_h * (1.0 - level)
        parts.append(f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{width - PAD_RIGHT}" y2="{y:.1f}" stroke="#d0d7de" '
                     'stroke-width="1"/>')
        parts.append(f'<text x="{PAD_LEFT - 4}" y="{y + 3:.1f}" font-size="9" text-anchor="end" fill="#57606a">'
                     f'{level:.1f}</text>')
    usable = [(int(r), min(1.0, max(0.0, float(a)))) for r, a in points]
    if not usable:
        parts.append(f'<text x="{PAD_LEFT + inner_w / 2:.1f}" y="{PAD_TOP + inner_h / 2 + 3:.1f}" font-size="10" '
                     'text-anchor="middle" fill="#57606a">no evaluation yet</text></svg>')
        return "".join(parts)
    first, last = usable[0][0], usable[-1][0]
    span = max(1, last - first)

    def xy(round_: int, accuracy: float) -> tuple[float, float]:
        x = PAD_LEFT + (inner_w * (round_ - first) / span if last > first else inner_w / 2)
        return x, PAD_TOP + inner_h * (1.0 - accuracy)

    coords = [xy(r, a) for r, a in usable]
    if len(coords) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#0969da" stroke-width="1.5"/>')
    for (r, a), (x, y) in zip(usable, coords, strict=True):
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="#0969da"><title>round {r}: {a:.3f}</title>'
                     '</circle>')
    parts.append(f'<text x="{PAD_LEFT}" y="{height - 2}" font-size="9" fill="#57606a">round {first}</text>')
    parts.append(f'<text x="{width - PAD_RIGHT}" y="{height - 2}" font-size="9" text-anchor="end" fill="#57606a">'
                 f'round {last}</text>')
    parts.append("</svg>")
    return "".join(parts)
