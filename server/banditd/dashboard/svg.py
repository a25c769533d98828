"""Tiny inline-SVG chart builders for the dashboard.

The dashboard must work on machines without internet access and under a strict content
security policy, so charts are plain SVG strings built here rather than a JavaScript
charting library from a CDN. Every label that can come from a user (arm ids in legends,
bar labels, titles) goes through `esc`, and every number goes through `_finite`: NaN and
infinities are skipped rather than turned into "NaN" coordinates that break the drawing.
Degenerate inputs (no data, one point, all-equal values) widen the axis range instead of
dividing by zero.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from datetime import UTC, datetime

# Colour-blind-friendly categorical palette (Tableau 10); arms cycle through it.
PALETTE = (
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
)
# Plot margins in SVG user units: room for y tick labels on the left, time labels below.
LEFT, RIGHT, TOP, BOTTOM = 56, 14, 12, 34
LEGEND_ROW = 16
LABEL_MAX = 32
# Candidate time-axis steps in seconds; the smallest giving at most 7 ticks wins.
TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600,
              43200, 86400, 172800, 604800, 2592000)

Series = Sequence[tuple[str, str, Sequence[tuple[float, float]]]]


def esc(value: object) -> str:
    """HTML/XML-escape anything for text or a quoted attribute (inline SVG shares HTML's rules)."""
    return html.escape(str(value), quote=True)


def colour(index: int) -> str:
    """The palette colour for the index-th arm, cycling so any number of arms gets one."""
    return PALETTE[index % len(PALETTE)]


def _finite(value: object) -> float | None:
    """A float for a finite number, None for anything else (None, NaN, inf, strings, bools)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _n(value: float) -> str:
    """A coordinate: one decimal is plenty at SVG scale and keeps the markup small."""
    return f"{value:.1f}"


def _short(label: str) -> str:
    """Truncate long labels (the full text stays in the <title> tooltip)."""
    return label if len(label) <= LABEL_MAX else label[: LABEL_MAX - 1] + "…"


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not hi > lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(count, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1.0, 2.0, 5.0, 10.0) if m * mag >= raw)
    first = math.floor(lo / step + 1e-9)
    last = math.ceil(hi / step - 1e-9)
    return [i * step for i in range(first, last + 1)]


def _tick_label(value: float, step: float, percent: bool) -> str:
    """A tick label with just enough decimals for the tick step."""
    if percent:
        value, step = value * 100, step * 100
    if abs(value) < step / 2:
        value = 0.0  # no "-0.0" from float noise
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 0
    if abs(value) >= 10_000 and decimals == 0:
        text = f"{value / 1000:.0f}k" if abs(value) < 10_000_000 else f"{value / 1e6:.0f}M"
    else:
        text = f"{value:.{decimals}f}"
    return text + ("%" if percent else "")


def time_ticks(x0: float, x1: float) -> list[tuple[float, str]]:
    """(unix seconds, label) ticks for a UTC time axis, labelled HH:MM (or finer/coarser)."""
    span = max(x1 - x0, 1e-9)
    step = next((s for s in TIME_STEPS if span / s <= 6), TIME_STEPS[-1])
    if step < 60:
        fmt = "%H:%M:%S"
    elif step >= 86400:
        fmt = "%m-%d"
    elif span > 86400:
        fmt = "%m-%d %H:%M"
    else:
        fmt = "%H:%M"
    ticks = []
    t = math.ceil(x0 / step) * step
    while t <= x1 + 1e-9:
        try:
            ticks.append((float(t), datetime.fromtimestamp(t, tz=UTC).strftime(fmt)))
        except (OverflowError, OSError, ValueError):
            pass
        t += step
    return ticks


def _open(width: int, height: int, chart_id: str, title: str) -> str:
    """The <svg> element: fixed viewBox, scales to its container width through CSS."""
    ident = f' id="{esc(chart_id)}"' if chart_id else ""
    label = esc(title or chart_id or "chart")
    return (f'<svg{ident} class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{label}" font-size="11">'
            f"<title>{label}</title>")


def _empty(width: int, height: int, chart_id: str, title: str, message: str = "no data yet") -> str:
    """A chart-sized placeholder, so the page layout (and the element id) stays stable."""
    return (_open(width, height, chart_id, title)
            + f'<rect class="frame" x="0.5" y="0.5" width="{width - 1}" height="{height - 1}" fill="none" '
            f'stroke="#ddd"/><text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle" '
            f'fill="#888">{esc(message)}</text></svg>')


def _legend(entries: Sequence[tuple[str, str]], width: int, y: float) -> tuple[str, int]:
    """Swatch + label per entry, wrapped into rows; returns markup and the number of rows."""
    parts: list[str] = []
    x, row = float(LEFT), 0
    for label, fill in entries:
        short = _short(label)
        w = 22 + 6.5 * len(short)
        if x + w > width and x > LEFT:
            x, row = float(LEFT), row + 1
        ty = y + row * LEGEND_ROW
        parts.append(f'<g class="legend-item"><title>{esc(label)}</title>'
                     f'<rect x="{_n(x)}" y="{_n(ty - 9)}" width="10" height="10" fill="{esc(fill)}"/>'
                     f'<text x="{_n(x + 14)}" y="{_n(ty)}">{esc(short)}</text></g>')
        x += w + 10
    return "".join(parts), (row + 1 if entries else 0)


def _legend_rows(entries: Sequence[tuple[str, str]], width: int) -> int:
    """Rows the legend will need, so the SVG height can be fixed before drawing."""
    return _legend(entries, width, 0)[1]


class _Frame:
    """Maps data coordinates into the plot area and draws axes with tick labels."""

    def __init__(self, width: int, height: int, x0: float, x1: float, y0: float, y1: float) -> None:
        if not x1 > x0:
            x0, x1 = x0 - 60, x1 + 60
        if not y1 > y0:
            y1 = y0 + (abs(y0) or 1.0)
        self.width, self.height = width, height
        self.x0, self.x1, self.y0, self.y1 = x0, x1, y0, y1
        self.pw, self.ph = width - LEFT - RIGHT, height - TOP - BOTTOM

    def x(self, value: float) -> float:
        return LEFT + (value - self.x0) / (self.x1 - self.x0) * self.pw

    def y(self, value: float) -> float:
        return TOP + self.ph - (value - self.y0) / (self.y1 - self.y0) * self.ph

    def axes(self, y_ticks: list[float], percent: bool, y_label: str, time_axis: bool = True) -> str:
        """Grid lines, y labels, time labels and the y-axis title."""
        step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
        out = ['<g class="axes" fill="#555" stroke-width="1">']
        for v in y_ticks:
            yy = self.y(v)
            out.append(f'<line x1="{LEFT}" x2="{LEFT + self.pw}" y1="{_n(yy)}" y2="{_n(yy)}" stroke="#eee"/>'
                       f'<text x="{LEFT - 6}" y="{_n(yy + 4)}" text-anchor="end">'
                       f"{esc(_tick_label(v, step, percent))}</text>")
        base = TOP + self.ph
        out.append(f'<line x1="{LEFT}" x2="{LEFT + self.pw}" y1="{base}" y2="{base}" stroke="#999"/>')
        if time_axis:
            for t, label in time_ticks(self.x0, self.x1):
                xx = self.x(t)
                out.append(f'<line x1="{_n(xx)}" x2="{_n(xx)}" y1="{base}" y2="{base + 4}" stroke="#999"/>'
                           f'<text x="{_n(xx)}" y="{base + 16}" text-anchor="middle">{esc(label)}</text>')
            out.append(f'<text x="{LEFT + self.pw}" y="{base + 30}" text-anchor="end">time (UTC)</text>')
        if y_label:
            out.append(f'<text x="12" y="{_n(TOP + self.ph / 2)}" text-anchor="middle" '
                       f'transform="rotate(-90 12 {_n(TOP + self.ph / 2)})">{esc(y_label)}</text>')
        out.append("</g>")
        return "".join(out)


def _clean(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Finite points sorted by x."""
    out = []
    for p in points:
        x, y = _finite(p[0]), _finite(p[1])
        if x is not None and y is not None:
            out.append((x, y))
    return sorted(out)


def line_chart(series: Series, *, width: int = 640, height: int = 220, y_label: str = "",
               y_max: float | None = None, percent: bool = False, chart_id: str = "", title: str = "") -> str:
    """One line per (label, colour, [(unix seconds, y)]) series over a UTC time axis.

    The y axis starts at 0 (or the data minimum when negative) and ends at y_max or the
    data maximum, rounded out to nice ticks; `percent` labels fractions as percentages.
    """
    cleaned = [(label, col, _clean(pts)) for label, col, pts in series]
    xs = [x for _, _, pts in cleaned for x, _ in pts]
    ys = [y for _, _, pts in cleaned for _, y in pts]
    if not xs:
        return _empty(width, height, chart_id, title)
    entries = [(label, col) for label, col, _ in cleaned]
    rows = _legend_rows(entries, width)
    lo = min(0.0, min(ys))
    hi = max(ys) if y_max is None else max(y_max, max(ys))
    ticks = nice_ticks(lo, hi)
    frame = _Frame(width, height, min(xs), max(xs), ticks[0], ticks[-1])
    total = height + rows * LEGEND_ROW
    out = [_open(width, total, chart_id, title), frame.axes(ticks, percent, y_label)]
    for label, col, pts in cleaned:
        if not pts:
            continue
        out.append(f'<g class="series"><title>{esc(label)}</title>')
        if len(pts) == 1:
            out.append(f'<circle cx="{_n(frame.x(pts[0][0]))}" cy="{_n(frame.y(pts[0][1]))}" r="3" '
                       f'fill="{esc(col)}"/>')
        else:
            d = " ".join(f"{'M' if i == 0 else 'L'}{_n(frame.x(x))},{_n(frame.y(y))}" for i, (x, y) in enumerate(pts))
            out.append(f'<path d="{d}" fill="none" stroke="{esc(col)}" stroke-width="2" '
                       f'stroke-linejoin="round"/>')
        out.append("</g>")
    legend, _ = _legend(entries, width, height + 6)
    out.append(legend + "</svg>")
    return "".join(out)


def stacked_area(series: Series, *, width: int = 640, height: int = 220, y_label: str = "",
                 percent: bool = True, chart_id: str = "", title: str = "") -> str:
    """Stacked bands (first series at the bottom), e.g. each arm's share of traffic over time.

    Series may sample different times: a series without a value at some time counts 0
    there. One sampled time is drawn as a flat band across the axis range.
    """
    cleaned = [(label, col, dict(_clean(pts))) for label, col, pts in series]
    times = sorted({x for _, _, pts in cleaned for x in pts})
    if not times:
        return _empty(width, height, chart_id, title)
    draw_times = times if len(times) > 1 else [times[0] - 60, times[0] + 60]
    sample = times if len(times) > 1 else [times[0], times[0]]
    bottoms = [0.0] * len(draw_times)
    bands: list[tuple[str, str, list[float], list[float]]] = []
    for label, col, pts in cleaned:
        tops = [b + max(0.0, pts.get(t, 0.0)) for b, t in zip(bottoms, sample, strict=True)]
        bands.append((label, col, bottoms, tops))
        bottoms = tops
    hi = max(bottoms)
    ticks = nice_ticks(0.0, max(hi, 1.0) if percent else hi)
    frame = _Frame(width, height, draw_times[0], draw_times[-1], ticks[0], ticks[-1])
    entries = [(label, col) for label, col, _ in cleaned]
    rows = _legend_rows(entries, width)
    out = [_open(width, height + rows * LEGEND_ROW, chart_id, title), frame.axes(ticks, percent, y_label)]
    for label, col, low, top in bands:
        upper = [f"{_n(frame.x(t))},{_n(frame.y(v))}" for t, v in zip(draw_times, top, strict=True)]
        lower = [f"{_n(frame.x(t))},{_n(frame.y(v))}" for t, v in zip(draw_times, low, strict=True)]
        out.append(f'<polygon points="{" ".join(upper + lower[::-1])}" fill="{esc(col)}" fill-opacity="0.85" '
                   f'stroke="#fff" stroke-width="0.5"><title>{esc(label)}</title></polygon>')
    legend, _ = _legend(entries, width, height + 6)
    out.append(legend + "</svg>")
    return "".join(out)


def bar_chart(bars: Sequence[tuple[str, float]], *, width: int = 640, height: int = 220, y_label: str = "",
              colour: str = PALETTE[0], chart_id: str = "", title: str = "") -> str:
    """Vertical bars over categorical labels (e.g. latency histogram buckets).

    Labels are thinned out when they would overlap; every bar keeps a <title> with its
    label and value for hover.
    """
    values = [max(0.0, _finite(v) or 0.0) for _, v in bars]
    if not bars:
        return _empty(width, height, chart_id, title)
    ticks = nice_ticks(0.0, max(values) or 1.0)
    frame = _Frame(width, height, 0.0, float(len(bars)), ticks[0], ticks[-1])
    slot = frame.pw / len(bars)
    every = max(1, math.ceil(max(len(label) for label, _ in bars) * 6.5 / max(slot, 1.0)))
    out = [_open(width, height, chart_id, title), frame.axes(ticks, False, y_label, time_axis=False)]
    base = TOP + frame.ph
    for i, ((label, _), value) in enumerate(zip(bars, values, strict=True)):
        x = frame.x(float(i)) + slot * 0.1
        top = frame.y(value)
        out.append(f'<rect x="{_n(x)}" y="{_n(top)}" width="{_n(slot * 0.8)}" height="{_n(base - top)}" '
                   f'fill="{esc(colour)}"><title>{esc(label)}: {esc(f"{value:g}")}</title></rect>')
        if i % every == 0:
            out.append(f'<text x="{_n(x + slot * 0.4)}" y="{base + 16}" text-anchor="middle" fill="#555">'
                       f"{esc(_short(label))}</text>")
    out.append("</svg>")
    return "".join(out)


def interval_bar(mean: float, low: float, high: float, *, lo_bound: float = 0.0, hi_bound: float = 1.0,
                 width: int = 160, height: int = 14, colour: str = PALETTE[0]) -> str:
    """A one-line whisker (low–high) with a dot at the mean, on a scale shared by all arms.

    Values outside [lo_bound, hi_bound] are clamped; non-finite values are not drawn.
    """
    if not hi_bound > lo_bound:
        hi_bound = lo_bound + (abs(lo_bound) or 1.0)
    pad = 4.0

    def x(v: float) -> float:
        v = min(max(v, lo_bound), hi_bound)
        return pad + (v - lo_bound) / (hi_bound - lo_bound) * (width - 2 * pad)

    mid = height / 2
    out = [f'<svg class="interval" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
           f'width="{width}" height="{height}" aria-hidden="true">'
           f'<line x1="{pad}" x2="{width - pad}" y1="{_n(mid)}" y2="{_n(mid)}" stroke="#eee"/>']
    lo, hi, m = _finite(low), _finite(high), _finite(mean)
    if lo is not None and hi is not None:
        out.append(f'<line x1="{_n(x(lo))}" x2="{_n(x(hi))}" y1="{_n(mid)}" y2="{_n(mid)}" '
                   f'stroke="{esc(colour)}" stroke-width="3" stroke-linecap="round" stroke-opacity="0.5"/>')
    if m is not None:
        out.append(f'<circle cx="{_n(x(m))}" cy="{_n(mid)}" r="4" fill="{esc(colour)}"/>')
    out.append("</svg>")
    return "".join(out)
