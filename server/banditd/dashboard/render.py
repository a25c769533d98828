"""Server-side HTML for the dashboard: pure functions from plain dicts to strings.

The HTTP wiring and data gathering live elsewhere; keeping rendering pure makes it
testable without a server and lets the pages work offline (no CDN, no external fonts, no
JavaScript: charts are inline SVG from `svg.py`, the page refreshes itself with a meta tag).

Everything that reaches the page from users or clients (experiment and arm ids, unit ids,
alarm messages, audit details, reasons...) is escaped with `esc` at the point it is
written, in text and attributes alike. Numbers have fixed, documented formats because a
browser test parses them, and every numeric cell also carries its exact value in
`data-value` so tests and scrapers never parse display text. Missing sections and odd
values render placeholders or "—" rather than raising: a half-broken dashboard is more
useful during an incident than an error page.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from banditd.dashboard import svg
from banditd.dashboard.svg import esc

log = logging.getLogger(__name__)

STATIC_DIR: Path = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
REFRESH_S = 15
# Charts with thousands of lines are unreadable: the top arms get their own series.
MAX_CHART_ARMS = 10
OTHER_COLOUR = "#cccccc"
# The page shows at most this many events; the CSV export has all the caller passes.
MAX_EVENT_ROWS = 1000
DASH = "—"
NUM = ' class="num"'
CSV_HEADER = ("ts_ms", "time", "kind", "decision_id", "unit_id", "arm_id", "value", "propensity", "source")
# Spreadsheets run cells starting with these as formulas (CSV injection).
CSV_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n")


# ---------------------------------------------------------------- value helpers

def _num(value: object) -> float | None:
    """A float for any int/float (NaN included, formatted later as "—"), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _float(value: object) -> float:
    """A float for charts, NaN (skipped when drawing) for anything that is not a number."""
    f = _num(value)
    return math.nan if f is None else f


def _ok(value: object) -> float | None:
    """A float only for finite numbers: what can be formatted or charted."""
    f = _num(value)
    return f if f is not None and math.isfinite(f) else None


def _int(value: object) -> str:
    """Integers as plain digits, no thousands separators (parsed by tests)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    f = _ok(value)
    return str(int(f)) if f is not None else DASH


def _f4(value: object) -> str:
    f = _ok(value)
    return f"{f:.4f}" if f is not None else DASH


def _pct(value: object) -> str:
    f = _ok(value)
    return f"{100 * f:.1f}%" if f is not None else DASH


def _signed_pct(value: object) -> str:
    f = _ok(value)
    return f"{100 * f:+.1f}%" if f is not None else DASH


def _g(value: object) -> str:
    f = _ok(value)
    return f"{f:.4g}" if f is not None else DASH


def _repr(value: object) -> str | None:
    """Exact machine-readable value for data-* attributes (None when not a number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return repr(value)


def _time(ms: object, missing: str = DASH) -> str:
    """Epoch milliseconds as UTC ISO-8601, e.g. 2026-12-02 03:04:05Z."""
    f = _ok(ms)
    if f is None:
        return missing
    try:
        return datetime.fromtimestamp(f / 1000.0, tz=UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return missing


def _ago(ms: object, now_ms: int) -> str:
    """Coarse relative time, which is what on-call people read first."""
    f = _ok(ms)
    if f is None:
        return ""
    s = (now_ms - f) / 1000.0
    if s < 0:
        return "in the future"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{int(s // size)} {unit} ago"
    return f"{int(s)} s ago"


def _slug(value: object) -> str:
    """A CSS-class-safe token for known enums (state, status, verdict, kind)."""
    return re.sub(r"[^a-z0-9]+", "-", str(value).lower()).strip("-") or "unknown"


def _text(value: object) -> str:
    return "" if value is None else str(value)


def _dicts(value: object) -> list[dict[str, Any]]:
    """The dict items of a list section; anything else is treated as empty."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def _td(field: str, text: str, value: object = None, attrs: str = "", html: str = "") -> str:
    """A cell with data-field, data-value when `value` is numeric, escaped text (+ trusted html)."""
    v = _repr(value)
    data = f' data-value="{esc(v)}"' if v is not None else ""
    return f'<td data-field="{esc(field)}"{data}{attrs}>{esc(text)}{html}</td>'


def _range_attrs(low: object, high: object) -> str:
    """data-low/data-high with the exact values of an interval cell (absent when not numbers)."""
    return "".join(f' data-{k}="{esc(r)}"' for k, x in (("low", low), ("high", high)) if (r := _repr(x)) is not None)


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge badge-{esc(_slug(kind))}">{esc(text)}</span>'


def _table(table_id: str, headers: list[str], rows: list[str], empty: str, numeric: tuple[str, ...] = ()) -> str:
    """A table with a stable id; an empty one keeps the id and says why it is empty.

    Headers named in `numeric` are right-aligned like their (class="num") cells.
    """
    head = "".join(f"<th{NUM if h in numeric else ''}>{esc(h)}</th>" for h in headers)
    body = "".join(rows) or f'<tr class="empty"><td colspan="{len(headers)}">{esc(empty)}</td></tr>'
    return (f'<div class="table-wrap"><table id="{esc(table_id)}"><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _section(title: str, content: str, section_id: str = "") -> str:
    ident = f' id="{esc(section_id)}"' if section_id else ""
    return f"<section{ident}><h2>{esc(title)}</h2>{content}</section>"


def _placeholder(message: str) -> str:
    return f'<p class="empty">{esc(message)}</p>'


def _safe(name: str, build: Callable[[], str]) -> str:
    """Render one section; a bug or malformed data there must not take the whole page down."""
    try:
        return build()
    except Exception:
        log.exception("dashboard section %s failed to render", name)
        return _section(name, '<p class="error">This section could not be rendered (see the server log).</p>')


def _page(title: str, body: str, now_ms: int) -> str:
    return ("<!DOCTYPE html>\n"
            '<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="refresh" content="{REFRESH_S}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title>"
            '<link rel="stylesheet" href="/static/style.css"></head>'
            f"<body><main>{body}</main>"
            f"<footer>Rendered {esc(_time(now_ms))} · refreshes every {REFRESH_S} s</footer></body></html>\n")


# ---------------------------------------------------------------- index page

INDEX_COLUMNS = (
    ("id", "experiment"), ("policy", "policy"), ("state", "state"), ("arms", "arms"),
    ("active_arms", "active arms"), ("decisions", "decisions"), ("observations", "observations"),
    ("verdict", "verdict"), ("alarms", "alarms"), ("guardrail_breaches", "guardrail breaches"),
    ("best_arm_id", "best arm"),
)
INDEX_INTS = {"arms", "active_arms", "decisions", "observations", "alarms", "guardrail_breaches"}


def _index_row(exp: dict[str, Any]) -> str:
    eid = _text(exp.get("id"))
    cells = []
    for key, _ in INDEX_COLUMNS:
        value = exp.get(key)
        if key == "id":
            link = f'<a href="experiments/{esc(quote(eid, safe=""))}">{esc(eid)}</a>'
            cells.append(_td(key, "", html=link))
        elif key in INDEX_INTS:
            cells.append(_td(key, _int(value), value, NUM))
        elif key in ("state", "verdict") and value:
            cells.append(_td(key, "", html=_badge(_text(value), f"{key}-{value}")))
        else:
            cells.append(_td(key, _text(value) or DASH))
    attention = any((_ok(exp.get(k)) or 0) > 0 for k in ("alarms", "guardrail_breaches"))
    cls = ' class="attention"' if attention else ""
    return f'<tr data-experiment="{esc(eid)}"{cls}>{"".join(cells)}</tr>'


def render_index(experiments: list[dict[str, Any]], now_ms: int) -> str:
    """The experiment list, one row per experiment linking to its page."""
    items = _dicts(experiments)
    if items:
        rows = [_index_row(e) for e in items]
        numeric = tuple(h for k, h in INDEX_COLUMNS if k in INDEX_INTS)
        content = _table("experiments", [h for _, h in INDEX_COLUMNS], rows, "", numeric)
    else:
        content = _placeholder("No experiments yet. Create one with the client or `banditd` CLI, "
                               "and it will show up here.")
    body = f'<header><h1>banditd experiments</h1><p class="meta">{len(items)} experiment(s)</p></header>{content}'
    return _page("banditd experiments", body, now_ms)


# ---------------------------------------------------------------- experiment page

def _header(exp: dict[str, Any], now_ms: int) -> str:
    eid = _text(exp.get("id"))
    created = exp.get("created_ms")
    ago = _ago(created, now_ms)
    facts = [
        ("state", _badge(_text(exp.get("state")) or DASH, f"state-{exp.get('state')}")),
        ("policy", esc(_text(exp.get("policy")) or DASH)),
        ("reward_type", esc(_text(exp.get("reward_type")) or DASH)),
        ("version", esc(_int(exp.get("version")))),
        ("created", esc(_time(created) + (f" ({ago})" if ago else ""))),
        ("control_arm_id", esc(_text(exp.get("control_arm_id")) or DASH)),
        ("control_share", esc(_pct(exp.get("control_share")))),
        ("burn_in", esc(_int(exp.get("burn_in")))),
    ]
    labels = {"reward_type": "reward type", "control_arm_id": "control arm", "control_share": "control share",
              "burn_in": "burn-in"}
    dl = "".join(f'<div><dt>{esc(labels.get(k, k))}</dt><dd data-field="{k}">{v}</dd></div>' for k, v in facts)
    serving = _text(exp.get("serving_arm_id"))
    banner = (f'<p class="banner banner-fallback" id="fallback">Guardrail fallback: all traffic is served arm '
              f'<strong>{esc(serving)}</strong>.</p>') if serving else ""
    return (f'<header><p class="back"><a href="../">← all experiments</a></p><h1>{esc(eid)}</h1>'
            f'<dl class="facts">{dl}</dl>{banner}</header>')


def _verdict(verdict: object) -> str:
    if not isinstance(verdict, dict):
        return _section("Verdict", _placeholder("No verdict yet: not enough data to judge."), "verdict")
    v = _text(verdict.get("verdict"))
    stop = "stop the experiment" if verdict.get("stop") else "keep collecting data"
    best = _text(verdict.get("best_arm_id"))
    content = (f'<div class="verdict verdict-{esc(_slug(v))}"><p><strong data-field="verdict">{esc(v or DASH)}'
               f'</strong> · best arm <strong data-field="best_arm_id">{esc(best or DASH)}</strong> · '
               f'<span data-field="stop">{esc(stop)}</span></p>'
               f'<p data-field="reason">{esc(_text(verdict.get("reason")))}</p></div>')
    return _section("Verdict", content, "verdict")


LEADERBOARD_HEADERS = ["arm", "share", "observations", "pulls", "rewards", "mean", "interval", "", "P(best)",
                       "expected loss", "uplift vs reference"]


def _leaderboard(arms: list[dict[str, Any]], colours: dict[str, str], exp: dict[str, Any],
                 best: str) -> str:
    lows = [x for a in arms if (x := _ok(a.get("low"))) is not None]
    highs = [x for a in arms if (x := _ok(a.get("high"))) is not None]
    lo_bound, hi_bound = (min(lows), max(highs)) if lows and highs else (0.0, 1.0)
    control = _text(exp.get("control_arm_id"))
    rows = []
    for a in arms:
        arm = _text(a.get("arm_id"))
        low, high, mean = a.get("low"), a.get("high"), a.get("mean")
        ulo, uhi = a.get("uplift_low"), a.get("uplift_high")
        if _ok(ulo) is not None and _ok(uhi) is not None:
            uplift, uplift_attrs = f"{_signed_pct(ulo)} … {_signed_pct(uhi)}", _range_attrs(ulo, uhi)
        else:
            uplift, uplift_attrs = DASH, ""
        interval = f"{_f4(low)} – {_f4(high)}" if _ok(low) is not None and _ok(high) is not None else DASH
        bar = svg.interval_bar(_float(mean), _float(low), _float(high), lo_bound=lo_bound, hi_bound=hi_bound,
                               colour=colours.get(arm, svg.PALETTE[0]))
        classes = [c for c, on in (("inactive", not a.get("active", True)), ("best", arm == best and arm),
                                   ("control", arm == control and arm)) if on]
        cls = f' class="{" ".join(classes)}"' if classes else ""
        active = "true" if a.get("active", True) else "false"
        rows.append(
            f'<tr data-arm="{esc(arm)}" data-active="{active}"{cls}>' + _td("arm_id", arm)
            + _td("share", _pct(a.get("share")), a.get("share"), NUM)
            + "".join(_td(k, _int(a.get(k)), a.get(k), NUM) for k in ("observations", "pulls", "rewards"))
            + _td("mean", _f4(mean), mean, NUM)
            + _td("interval", interval, attrs=_range_attrs(low, high) + NUM)
            + f'<td class="bar">{bar}</td>'
            + _td("p_best", _pct(a.get("p_best")), a.get("p_best"), NUM)
            + _td("expected_loss", _f4(a.get("expected_loss")), a.get("expected_loss"), NUM)
            + _td("uplift", uplift, attrs=uplift_attrs + NUM) + "</tr>")
    note = ('<p class="note">share: share of recent decisions · interval: posterior credible interval of the '
            "mean · P(best): posterior probability the arm is best · expected loss: expected shortfall versus "
            "the best arm if this one is chosen · uplift: credible interval relative to the control arm, or "
            "without one to the best other arm.</p>")
    return _section("Leaderboard", _table("leaderboard", LEADERBOARD_HEADERS, rows, "No arms.",
                                               tuple(LEADERBOARD_HEADERS[1:7] + LEADERBOARD_HEADERS[8:])) + note)


def _vs_control(data: object) -> str:
    title = "Bandit vs random control"
    if not isinstance(data, dict):
        return _section(title, _placeholder("No random-control traffic to compare with (control share is 0 or "
                                            "no data yet)."), "vs-control")
    rows = []
    for key, name in (("control", "random control"), ("bandit", "bandit")):
        n, mean = data.get(f"{key}_decisions"), data.get(f"{key}_mean")
        rows.append(f"<tr><th>{esc(name)}</th>{_td(f'{key}_decisions', _int(n), n, NUM)}"
                    f"{_td(f'{key}_mean', _f4(mean), mean, NUM)}</tr>")
    lo, hi, mean = data.get("uplift_low"), data.get("uplift_high"), data.get("uplift_mean")
    table = _table("vs-control-table", ["", "decisions", "mean reward"], rows, "", ("decisions", "mean reward"))
    uplift = ('<table class="compact"><tbody><tr><th>uplift of the bandit over random allocation</th>'
              + _td("uplift_mean", _signed_pct(mean), mean, NUM)
              + _td("uplift", f"{_signed_pct(lo)} … {_signed_pct(hi)}", attrs=_range_attrs(lo, hi) + NUM)
              + "</tr></tbody></table>")
    return _section(title, table + uplift, "vs-control")


def _arm_colours(arms: list[dict[str, Any]], history: list[dict[str, Any]]) -> dict[str, str]:
    """Stable colour per arm: leaderboard order first, then arms only seen in history."""
    order: dict[str, None] = {}
    for a in arms:
        order.setdefault(_text(a.get("arm_id")), None)
    for snap in history:
        snap_arms = snap.get("arms")
        if isinstance(snap_arms, dict):
            for arm in snap_arms:
                order.setdefault(str(arm), None)
    return {arm: svg.colour(i) for i, arm in enumerate(order)}


def _history_charts(history: list[dict[str, Any]], colours: dict[str, str]) -> str:
    """Allocation, P(best) and posterior mean over time, for the top arms by latest P(best)."""
    per_arm: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for snap in history:
        t, snap_arms = _ok(snap.get("t")), snap.get("arms")
        if t is None or not isinstance(snap_arms, dict):
            continue
        for arm, stats in snap_arms.items():
            if not isinstance(stats, dict):
                continue
            tracks = per_arm.setdefault(str(arm), {"share": [], "p_best": [], "mean": []})
            for key, points in tracks.items():
                v = _ok(stats.get(key))
                if v is not None:
                    points.append((t, v))

    def rank(arm: str) -> tuple[float, float]:
        s = per_arm[arm]
        return (s["p_best"][-1][1] if s["p_best"] else 0.0, s["share"][-1][1] if s["share"] else 0.0)

    top = sorted(per_arm, key=rank, reverse=True)[:MAX_CHART_ARMS]
    top.sort(key=lambda arm: list(colours).index(arm) if arm in colours else len(colours))
    rest = [arm for arm in per_arm if arm not in top]

    def series(key: str) -> list[tuple[str, str, list[tuple[float, float]]]]:
        return [(arm, colours.get(arm, OTHER_COLOUR), per_arm[arm][key]) for arm in top]

    allocation = series("share")
    if rest:
        other: dict[float, float] = {}
        for arm in rest:
            for t, v in per_arm[arm]["share"]:
                other[t] = other.get(t, 0.0) + v
        allocation.append((f"other ({len(rest)} arms)", OTHER_COLOUR, sorted(other.items())))
    note = (_placeholder(f"Charts show the top {len(top)} of {len(per_arm)} arms by current P(best).")
            if rest else "")
    figures = [
        ("Allocation over time (share of decisions)",
         svg.stacked_area(allocation, y_label="share", chart_id="chart-allocation", title="allocation over time")),
        ("P(best) over time",
         svg.line_chart(series("p_best"), y_label="P(best)", y_max=1.0, percent=True, chart_id="chart-pbest",
                        title="probability of being best over time")),
        ("Posterior mean over time",
         svg.line_chart(series("mean"), y_label="mean reward", chart_id="chart-mean",
                        title="posterior mean over time")),
    ]
    body = "".join(f"<figure>{chart}<figcaption>{esc(cap)}</figcaption></figure>" for cap, chart in figures)
    return _section("Learning over time", note + f'<div class="charts">{body}</div>')


def _cumulative(points: list[dict[str, Any]]) -> str:
    series = [
        (label, col, [(t, v) for p in points if (t := _ok(p.get("t"))) is not None
                      and (v := _ok(p.get(key))) is not None])
        for key, label, col in (("reward", "cumulative reward", "#4e79a7"),
                                ("uniform", "uniform allocation (estimate)", "#9c9c9c"),
                                ("regret", "regret (estimate)", "#e15759"))
    ]
    chart = svg.line_chart(series, y_label="cumulative", chart_id="chart-cumulative",
                           title="cumulative reward, uniform-allocation estimate and regret")
    caption = ("Cumulative reward collected, what uniform random allocation would have collected "
               "(estimate), and estimated regret against always playing the best arm.")
    return _section("Cumulative reward", f"<figure>{chart}<figcaption>{esc(caption)}</figcaption></figure>")


def _alarms(alarms: object) -> str:
    if alarms is None:
        content = _placeholder("Diagnostics unavailable.")
    elif not _dicts(alarms):
        content = '<p class="ok">No alarms: the learning loop looks healthy.</p>'
    else:
        items = "".join(f'<li data-code="{esc(_text(a.get("code")))}"><code>{esc(_text(a.get("code")))}</code> '
                        f"{esc(_text(a.get('message')))}</li>" for a in _dicts(alarms))
        content = f'<ul class="alarms">{items}</ul>'
    return _section("Learning-loop alarms", content, "alarms")


def _guardrails(rails: list[dict[str, Any]], now_ms: int) -> str:
    rows = []
    for g in rails:
        status = _text(g.get("status")) or "no data"
        last = g.get("last_breach_ms")
        ago = _ago(last, now_ms)
        rows.append(
            f'<tr data-metric="{esc(_text(g.get("metric")))}" class="status-{esc(_slug(status))}">'
            + _td("metric", _text(g.get("metric")))
            + _td("threshold", _g(g.get("threshold")), g.get("threshold"), NUM)
            + _td("action", _text(g.get("action")) or DASH)
            + _td("fallback_arm_id", _text(g.get("fallback_arm_id")) or DASH)
            + _td("status", "", html=_badge(status, f"status-{status}"))
            + _td("value", _f4(g.get("value")), g.get("value"), NUM)
            + _td("last_breach_ms", _time(last) + (f" ({ago})" if ago else ""), last) + "</tr>")
    headers = ["metric", "threshold", "action", "fallback arm", "status", "current value", "last breach"]
    return _section("Guardrails", _table("guardrails", headers, rows, "No guardrails configured.",
                                         ("threshold", "current value")))


def _ms(seconds: float) -> str:
    return f"{seconds:g}s" if seconds >= 1 else f"{seconds * 1000:g}ms"


def _latency(data: object) -> str:
    title = "Decision latency"
    if not isinstance(data, dict):
        chart = svg.bar_chart([], chart_id="chart-latency", title="decision latency histogram")
        return _section(title, chart + _placeholder("No latency data."))
    bounds = [b for b in (_ok(x) for x in (data.get("bounds") or [])) if b is not None]
    counts = [(_ok(c) or 0.0) for c in (data.get("counts") or [])]
    counts = (counts + [0.0] * (len(bounds) + 1))[: len(bounds) + 1]
    labels = [f"≤{_ms(b)}" for b in bounds] + [f">{_ms(bounds[-1])}" if bounds else "all"]
    chart = svg.bar_chart(list(zip(labels, counts, strict=True)), y_label="decisions",
                          chart_id="chart-latency", title="decision latency histogram")
    pcts = []
    for k in ("p50", "p95", "p99"):
        v, r = _ok(data.get(k)), _repr(data.get(k))
        value = f' data-value="{esc(r)}"' if r is not None else ""
        text = f"{1000 * v:.2f} ms" if v is not None else DASH
        pcts.append(f'<div><dt>{k}</dt><dd data-field="{k}"{value}>{esc(text)}</dd></div>')
    return _section(title, f'<figure>{chart}<figcaption>Decision latency histogram</figcaption></figure>'
                           f'<dl class="facts" id="latency-percentiles">{"".join(pcts)}</dl>')


def _events(events: list[dict[str, Any]], qid: str) -> str:
    rows = []
    for e in events[:MAX_EVENT_ROWS]:
        kind = _text(e.get("kind"))
        rows.append(
            f'<tr class="kind-{esc(_slug(kind))}">' + _td("ts_ms", _time(e.get("ts_ms")), e.get("ts_ms"))
            + _td("kind", kind) + _td("decision_id", _text(e.get("decision_id")))
            + _td("unit_id", _text(e.get("unit_id"))) + _td("arm_id", _text(e.get("arm_id")))
            + _td("value", _g(e.get("value")), e.get("value"), NUM)
            + _td("propensity", _f4(e.get("propensity")), e.get("propensity"), NUM)
            + _td("source", _text(e.get("source"))) + "</tr>")
    more = (_placeholder(f"Showing the newest {MAX_EVENT_ROWS} of {len(events)} events; export the CSV for all.")
            if len(events) > MAX_EVENT_ROWS else "")
    link = f'<p><a class="button" href="{esc(qid)}/events.csv" download>Export CSV</a></p>'
    headers = ["time", "kind", "decision", "unit", "arm", "value", "propensity", "source"]
    table = _table("events", headers, rows, "No events yet.", ("value", "propensity"))
    return _section("Recent events", link + table + more)


def _audit(entries: list[dict[str, Any]]) -> str:
    rows = ["<tr>" + _td("ts_ms", _time(a.get("ts_ms")), a.get("ts_ms")) + _td("action", _text(a.get("action")))
            + _td("actor", _text(a.get("actor"))) + _td("details", _text(a.get("details")), attrs=' class="details"')
            + "</tr>" for a in entries]
    return _section("Audit log", _table("audit", ["time", "action", "actor", "details"], rows, "No audit entries."))


def render_experiment(view: dict[str, Any], now_ms: int) -> str:
    """One experiment's page (served at /experiments/{id}; links are relative to that)."""
    exp = view.get("experiment") if isinstance(view, dict) else None
    exp = exp if isinstance(exp, dict) else {}
    view = view if isinstance(view, dict) else {}
    eid = _text(exp.get("id"))
    qid = quote(eid, safe="")
    arms = _dicts(view.get("leaderboard"))
    history = _dicts(view.get("history"))
    colours = _arm_colours(arms, history)
    verdict = view.get("verdict")
    best = _text(verdict.get("best_arm_id")) if isinstance(verdict, dict) else ""
    parts = [
        _safe("Header", lambda: _header(exp, now_ms)),
        _safe("Verdict", lambda: _verdict(verdict)),
        _safe("Leaderboard", lambda: _leaderboard(arms, colours, exp, best)),
        _safe("Bandit vs random control", lambda: _vs_control(view.get("bandit_vs_control"))),
        _safe("Learning over time", lambda: _history_charts(history, colours)),
        _safe("Cumulative reward", lambda: _cumulative(_dicts(view.get("cumulative")))),
        _safe("Learning-loop alarms", lambda: _alarms(view.get("alarms"))),
        _safe("Guardrails", lambda: _guardrails(_dicts(view.get("guardrails")), now_ms)),
        _safe("Decision latency", lambda: _latency(view.get("latency"))),
        _safe("Recent events", lambda: _events(_dicts(view.get("events")), qid)),
        _safe("Audit log", lambda: _audit(_dicts(view.get("audit")))),
    ]
    return _page(f"{eid} · banditd", "".join(parts), now_ms)


# ---------------------------------------------------------------- CSV export

def _csv_text(value: object) -> str:
    """Text cell, defused: a leading ' stops spreadsheets from evaluating it as a formula."""
    s = _text(value)
    return "'" + s if s.startswith(CSV_FORMULA_START) else s


def _csv_number(value: object) -> str:
    """Numbers we produced stay numeric (negative rewards keep their sign); others are text."""
    if value is None:
        return ""
    r = _repr(value)
    return r if r is not None else _csv_text(value)


def events_csv(events: list[dict[str, Any]]) -> str:
    """The events table as CSV, safe to open in a spreadsheet."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for e in _dicts(events):
        writer.writerow([
            _csv_number(e.get("ts_ms")), _time(e.get("ts_ms"), missing=""),
            *(_csv_text(e.get(k)) for k in ("kind", "decision_id", "unit_id", "arm_id")),
            _csv_number(e.get("value")), _csv_number(e.get("propensity")), _csv_text(e.get("source")),
        ])
    return buf.getvalue()


# ---------------------------------------------------------------- static files

def static_file(name: str) -> tuple[bytes, str] | None:
    """Bytes and content type of a file shipped in STATIC_DIR, or None.

    Only plain names listed in the folder are served: no separators, no dot-files, no
    `..`, so a request path can never reach outside the folder.
    """
    if not name or "/" in name or "\\" in name or "\x00" in name or name.startswith("."):
        return None
    ctype = CONTENT_TYPES.get(Path(name).suffix.lower())
    if ctype is None:
        return None
    try:
        if name not in {p.name for p in STATIC_DIR.iterdir() if p.is_file()}:
            return None
        return (STATIC_DIR / name).read_bytes(), ctype
    except OSError:
        return None
