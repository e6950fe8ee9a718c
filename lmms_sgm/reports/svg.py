"""Hand-written SVG plots for the HTML report: no plotting library, no scripts, no fonts to fetch.

- :func:`scatter`: the harm-vs-capability trade-off (points with 95% intervals on both axes, the
  Pareto front drawn through the Pareto points, the operating point ringed);
- :func:`forest`: paired differences to the baseline with their intervals and a zero line
  (an interval crossing it is within noise, drawn grey);
- :func:`bars`: values with intervals, grouped (e.g. harmful rate per category and run).
"""
from __future__ import annotations

import math
from xml.sax.saxutils import escape

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd")
FONT = 'font-family="sans-serif"'


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1e-9
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    out, t = [], start
    while t <= hi + step * 1e-6:
        out.append(round(t, 12))
        t += step
    return out


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def _extent(values: list[float], pad: float = 0.08) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = hi - lo or max(abs(hi), 1e-3) * 0.2 or 0.1
    return lo - pad * span, hi + pad * span


class _Axes:
    def __init__(self, x0, x1, y0, y1, width, height, left=70, right=20, top=30, bottom=50):
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = left, right, top, bottom

    def x(self, v):
        return self.left + (v - self.x0) / (self.x1 - self.x0) * (self.width - self.left - self.right)

    def y(self, v):
        return self.height - self.bottom - (v - self.y0) / (self.y1 - self.y0) * (self.height - self.top - self.bottom)

    def frame(self, x_label, y_label, x_ticks, y_ticks, pct_x=False, pct_y=False) -> list[str]:
        out = [(f'<rect x="{self.left}" y="{self.top}" width="{self.width - self.left - self.right}" '
               f'height="{self.height - self.top - self.bottom}" fill="#fff" stroke="#888"/>')]
        for t in x_ticks:
            if self.x0 <= t <= self.x1:
                X = self.x(t)
                out.append(f'<line x1="{X:.1f}" y1="{self.top}" x2="{X:.1f}" y2="{self.height - self.bottom}" stroke="#eee"/>')
                out.append(f'<text x="{X:.1f}" y="{self.height - self.bottom + 16}" text-anchor="middle" font-size="11" {FONT}>'
                           f'{escape(f"{t:.0%}" if pct_x else _fmt(t))}</text>')
        for t in y_ticks:
            if self.y0 <= t <= self.y1:
                Y = self.y(t)
                out.append(f'<line x1="{self.left}" y1="{Y:.1f}" x2="{self.width - self.right}" y2="{Y:.1f}" stroke="#eee"/>')
                out.append(f'<text x="{self.left - 6}" y="{Y + 4:.1f}" text-anchor="end" font-size="11" {FONT}>'
                           f'{escape(f"{t:.0%}" if pct_y else _fmt(t))}</text>')
        out.append(f'<text x="{(self.left + self.width - self.right) / 2:.1f}" y="{self.height - 12}" text-anchor="middle" '
                   f'font-size="12" {FONT}>{escape(x_label)}</text>')
        cy = (self.top + self.height - self.bottom) / 2
        out.append(f'<text x="16" y="{cy:.1f}" text-anchor="middle" font-size="12" {FONT} '
                   f'transform="rotate(-90 16 {cy:.1f})">{escape(y_label)}</text>')
        return out


def _svg(width: int, height: int, body: list[str], title: str, kind: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="plot {kind}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
            + "".join(body) + "</svg>")


def scatter(points: list[dict], *, x_label: str, y_label: str, title: str, width: int = 680, height: int = 440) -> str:
    """``points``: ``{"label", "x", "y", "x_ci", "y_ci", "pareto", "chosen", "baseline"}`` (``x``:
    capability retention, ``y``: harmful rate); points without both coordinates are left out."""
    pts = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    if not pts:
        return _svg(width, 60, [(f'<text x="10" y="30" font-size="13" {FONT}>no run has both a harmful rate and a '
                                 'capability metric to plot</text>')], title, "scatter")
    xs = [v for p in pts for v in [p["x"], *(p.get("x_ci") or [])] if v is not None and math.isfinite(v)]
    ys = [v for p in pts for v in [p["y"], *(p.get("y_ci") or [])] if v is not None and math.isfinite(v)]
    x0, x1 = _extent(xs)
    y0, y1 = _extent(ys + [0.0])
    ax = _Axes(x0, x1, max(y0, min(ys + [0.0]) - 0.02), y1, width, height)
    body = ax.frame(x_label, y_label, ticks(x0, x1), ticks(ax.y0, y1), pct_x=True)
    series = list(dict.fromkeys(p["series"] for p in pts if p.get("series")))
    base = next((p for p in pts if p.get("baseline")), None)
    for k, name in enumerate(series):  # a sweep: each glasses' strengths joined, from the baseline (strength 0)
        line = ([base] if base else []) + sorted((p for p in pts if p.get("series") == name), key=lambda p: p.get("strength") or 0)
        body.append(f'<polyline class="series" fill="none" stroke="{colour(k)}" stroke-opacity="0.6" points="'
                    + " ".join(f"{ax.x(p['x']):.1f},{ax.y(p['y']):.1f}" for p in line) + '"/>')
    front = sorted((p for p in pts if p.get("pareto")), key=lambda p: p["x"])
    if len(front) > 1:
        body.append('<polyline class="pareto-front" fill="none" stroke="#999" stroke-dasharray="4 3" points="'
                    + " ".join(f"{ax.x(p['x']):.1f},{ax.y(p['y']):.1f}" for p in front) + '"/>')
    placed: list[tuple[float, float]] = []
    for i, p in enumerate(pts):
        c = "#333" if p.get("baseline") else colour(series.index(p["series"]) if p.get("series") in series else i)
        X, Y = ax.x(p["x"]), ax.y(p["y"])
        if p.get("y_ci"):
            body.append(
                f'<line x1="{X:.1f}" y1="{ax.y(p["y_ci"][0]):.1f}" x2="{X:.1f}" y2="{ax.y(p["y_ci"][1]):.1f}" '
                f'stroke="{c}" stroke-width="1.5"/>'
            )
        if p.get("x_ci"):
            body.append(
                f'<line x1="{ax.x(p["x_ci"][0]):.1f}" y1="{Y:.1f}" x2="{ax.x(p["x_ci"][1]):.1f}" y2="{Y:.1f}" '
                f'stroke="{c}" stroke-width="1.5"/>'
            )
        shape = (f'<rect class="point baseline" x="{X - 5:.1f}" y="{Y - 5:.1f}" width="10" height="10" fill="{c}"/>'
                 if p.get("baseline") else
                 f'<circle class="point{" pareto" if p.get("pareto") else ""}" cx="{X:.1f}" cy="{Y:.1f}" r="5" '
                 f'fill="{c if p.get("pareto") else "#fff"}" stroke="{c}" stroke-width="2"/>')
        body.append(shape)
        if p.get("chosen"):
            body.append(f'<circle class="operating-point" cx="{X:.1f}" cy="{Y:.1f}" r="10" fill="none" stroke="#d62728" stroke-width="2"/>')
        anchor = "end" if X > width * 0.7 else "start"
        dx = -9 if anchor == "end" else 9
        ly = Y - 7
        while any(abs(ly - y) < 12 and abs(X - x) < 90 for x, y in placed):  # coinciding points: stack labels
            ly += 12
        placed.append((X, ly))
        text = f"s={p['strength']:g}" if p.get("series") in series and p.get("strength") is not None else p["label"]
        body.append(f'<text x="{X + dx:.1f}" y="{ly:.1f}" text-anchor="{anchor}" font-size="11" {FONT}>{escape(text)}</text>')
    for k, name in enumerate(series):  # a sweep: points are labelled by strength, series by colour
        Y = ax.height - ax.bottom - 12 - 16 * (len(series) - 1 - k)
        body.append(f'<line x1="{ax.left + 10}" y1="{Y - 4}" x2="{ax.left + 30}" y2="{Y - 4}" stroke="{colour(k)}" stroke-width="2"/>'
                    f'<text x="{ax.left + 36}" y="{Y}" font-size="11" {FONT}>{escape(name)}</text>')
    legend = ["filled: Pareto-optimal", "open: dominated", "square: baseline", "red ring: operating point"]
    body.append(
        f'<text x="{ax.left + 6}" y="{ax.top - 10}" font-size="10" fill="#555" {FONT}>'
        f"{escape('; '.join(legend))}; bars: 95% intervals</text>"
    )
    return _svg(width, height, body, title, "scatter")


def forest(rows: list[dict], *, x_label: str, title: str, width: int = 680) -> str:
    """``rows``: ``{"label", "delta", "ci", "noise"}``: one line each, the interval as a bar."""
    rows = [r for r in rows if r.get("delta") is not None]
    if not rows:
        return _svg(width, 40, [f'<text x="10" y="25" font-size="13" {FONT}>no differences to plot</text>'], title, "forest")
    left = min(360, 12 + 6.2 * max(len(r["label"]) for r in rows))
    height = 50 + 22 * len(rows)
    vals = [v for r in rows for v in [r["delta"], *(r.get("ci") or [])] if v is not None and math.isfinite(v)] + [0.0]
    x0, x1 = _extent(vals)
    ax = _Axes(x0, x1, 0, len(rows), width, height, left=left, top=10, bottom=40)
    body = ax.frame(x_label, "", ticks(x0, x1), [])
    body.append(f'<line class="zero" x1="{ax.x(0):.1f}" y1="{ax.top}" x2="{ax.x(0):.1f}" y2="{height - ax.bottom}" stroke="#333"/>')
    for i, r in enumerate(rows):
        Y = ax.top + 11 + 22 * i
        c = "#999" if r.get("noise") else colour(r.get("colour", 0))
        body.append(f'<text x="{left - 8}" y="{Y + 4}" text-anchor="end" font-size="11" {FONT}>{escape(r["label"])}</text>')
        if r.get("ci"):
            body.append(f'<line x1="{ax.x(r["ci"][0]):.1f}" y1="{Y}" x2="{ax.x(r["ci"][1]):.1f}" y2="{Y}" stroke="{c}" stroke-width="3"/>')
        body.append(f'<circle cx="{ax.x(r["delta"]):.1f}" cy="{Y}" r="4" fill="{c}"/>')
    return _svg(width, height, body, title, "forest")


def bars(groups: list[dict], series: list[str], *, x_label: str, title: str, width: int = 680) -> str:
    """``groups``: ``{"label", "values": {series: (value, ci)}}``; horizontal bars per series."""
    groups = [g for g in groups if any(v is not None and v[0] is not None for v in g["values"].values())]
    if not groups:
        return _svg(width, 40, [f'<text x="10" y="25" font-size="13" {FONT}>nothing to plot</text>'], title, "bars")
    bar = 12
    per = bar * len(series) + 10
    left = min(300, 12 + 6.2 * max(len(g["label"]) for g in groups))
    height = 60 + per * len(groups)
    vals = [v for g in groups for val in g["values"].values() if val and val[0] is not None
            for v in [val[0], *(val[1] or [])] if v is not None] + [0.0]
    x1 = max(vals) * 1.08 or 1.0
    ax = _Axes(0.0, x1, 0, 1, width, height, left=left, top=26, bottom=40)
    body = ax.frame(x_label, "", ticks(0.0, x1), [])
    for k, s in enumerate(series):
        body.append(f'<rect x="{left + 120 * k}" y="6" width="10" height="10" fill="{colour(k)}"/>'
                    f'<text x="{left + 120 * k + 14}" y="15" font-size="11" {FONT}>{escape(s)}</text>')
    for i, g in enumerate(groups):
        Y0 = ax.top + 5 + per * i
        body.append(f'<text x="{left - 8}" y="{Y0 + per / 2:.1f}" text-anchor="end" font-size="11" {FONT}>{escape(g["label"])}</text>')
        for k, s in enumerate(series):
            v = g["values"].get(s)
            if not v or v[0] is None:
                continue
            Y = Y0 + bar * k
            body.append(f'<rect x="{left}" y="{Y}" width="{max(ax.x(v[0]) - left, 0.5):.1f}" height="{bar - 2}" fill="{colour(k)}"/>')
            if v[1]:
                body.append(
                    f'<line x1="{ax.x(v[1][0]):.1f}" y1="{Y + bar / 2 - 1}" x2="{ax.x(v[1][1]):.1f}" y2="{Y + bar / 2 - 1}" stroke="#222"/>'
                )
    return _svg(width, height, body, title, "bars")
