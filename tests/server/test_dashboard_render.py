"""The dashboard's pure rendering layer: formats, escaping, placeholders, CSV and static files.

Pages are parsed with the stdlib HTML parser into a small tree, which also checks that
every element is closed in order (a stray quote or tag from unescaped input would break
that), so assertions are about elements and attributes rather than substrings.
"""

from __future__ import annotations

import csv
import io
import math
from html.parser import HTMLParser
from typing import Any

import pytest

from banditd.dashboard import STATIC_DIR, events_csv, render_experiment, render_index, static_file, svg

NOW_MS = 1_796_180_645_000  # 2026-12-02 03:04:05Z
T0 = NOW_MS / 1000 - 3600
HOSTILE = '"><img src=x onerror=alert(1)><script>alert(1)</script>'
SCRIPT = "<script>alert(1)</script>"
VOID = {"meta", "link", "br", "img", "input", "hr", "wbr", "source", "col", "area", "base", "embed"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.texts: list[str] = []

    def walk(self) -> list[Node]:
        out = [self]
        for c in self.children:
            out.extend(c.walk())
        return out

    def find_all(self, tag: str | None = None, **attrs: str | None) -> list[Node]:
        return [n for n in self.walk()[1:] if (tag is None or n.tag == tag)
                and all(n.attrs.get(k.replace("_", "-")) == v if v is not None else k.replace("_", "-") in n.attrs
                        for k, v in attrs.items())]

    def one(self, tag: str | None = None, **attrs: str | None) -> Node:
        found = self.find_all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


class Tree(HTMLParser):
    """Builds a Node tree; fails on any end tag that does not close the innermost element."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.cur = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.cur.children.append(Node(tag, dict(attrs), self.cur))

    def handle_endtag(self, tag: str) -> None:
        assert self.cur.tag == tag, f"</{tag}> closes <{self.cur.tag}>"
        assert self.cur.parent is not None
        self.cur = self.cur.parent

    def handle_data(self, data: str) -> None:
        # Text is kept in document order by attaching it as a pseudo-child.
        text = Node("#text", {}, self.cur)
        text.texts.append(data)
        self.cur.children.append(text)


def parse(page: str) -> Node:
    tree = Tree()
    tree.feed(page)
    tree.close()
    assert tree.cur is tree.root, f"unclosed <{tree.cur.tag}>"
    return tree.root


def text(node: Node) -> str:
    return "".join(n.texts[0] for n in node.walk() if n.tag == "#text")


def arm(arm_id: str, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "arm_id": arm_id, "active": True, "share": 0.5, "observations": 12345, "pulls": 12400, "rewards": 3000,
        "reward_sum": 3000.0, "mean": 0.24301, "low": 0.2355, "high": 0.25071, "p_best": 0.973,
        "expected_loss": 0.00012, "uplift_low": -0.0123, "uplift_high": 0.4567,
    }
    base.update(kw)
    return base


def sample_view(arm_b: str = "b", exp_id: str = "checkout-button", message: str = "rewards stopped") -> dict[str, Any]:
    history = [{"t": T0 + 60 * i, "arms": {
        "a": {"share": 0.5 - 0.01 * i, "observations": 10 * i, "reward_sum": 1.0 * i, "mean": 0.1, "low": 0.05,
              "high": 0.15, "p_best": 0.5 - 0.01 * i},
        arm_b: {"share": 0.5 + 0.01 * i, "observations": 10 * i, "reward_sum": 2.0 * i, "mean": 0.2, "low": 0.15,
                "high": 0.25, "p_best": 0.5 + 0.01 * i},
    }} for i in range(30)]
    return {
        "experiment": {"id": exp_id, "policy": "thompson", "state": "running", "reward_type": "binary",
                       "created_ms": NOW_MS - 86_400_000, "version": 7, "control_arm_id": "a", "control_share": 0.1,
                       "burn_in": 100, "serving_arm_id": ""},
        "verdict": {"verdict": "ship", "reason": f"{arm_b} beats control", "best_arm_id": arm_b, "stop": True},
        "leaderboard": [
            arm("a", share=0.25, uplift_low=None, uplift_high=None, p_best=0.027, active=False),
            arm(arm_b, mean=float("nan"), share=0.75),
        ],
        "bandit_vs_control": {"control_decisions": 1000, "bandit_decisions": 9000, "control_mean": 0.1,
                              "bandit_mean": 0.2, "uplift_low": 0.5, "uplift_high": 1.5, "uplift_mean": 1.0},
        "history": history,
        "cumulative": [{"t": T0 + 60 * i, "reward": 2.0 * i, "uniform": 1.5 * i, "regret": 0.1 * i}
                       for i in range(30)],
        "alarms": [{"code": "REWARDS_SILENT", "message": message}],
        "guardrails": [{"metric": "error_rate", "threshold": 0.05, "action": "fallback", "fallback_arm_id": "a",
                        "status": "breached", "value": 0.07, "last_breach_ms": NOW_MS - 120_000}],
        "latency": {"bounds": [0.0005, 0.001, 0.005, 0.01], "counts": [10, 50, 30, 5, 1], "p50": 0.0009,
                    "p95": 0.004, "p99": 0.009},
        "events": [
            {"ts_ms": NOW_MS - 1000, "kind": "reward", "decision_id": "d1", "unit_id": "u1", "arm_id": arm_b,
             "value": -1.5, "propensity": None, "source": "api"},
            {"ts_ms": NOW_MS - 2000, "kind": "decision", "decision_id": "d1", "unit_id": "u1", "arm_id": arm_b,
             "value": None, "propensity": 0.75, "source": "api"},
        ],
        "audit": [{"ts_ms": NOW_MS - 5000, "action": "pause", "actor": "alice", "details": '{"why": "test"}'}],
    }


def cells(row: Node) -> dict[str, Node]:
    return {td.attrs["data-field"] or "": td for td in row.find_all("td", data_field=None)}


def test_leaderboard_formats() -> None:
    page = render_experiment(sample_view(), NOW_MS)
    doc = parse(page)
    board = doc.one("table", id="leaderboard")
    rows = board.find_all("tr", data_arm=None)
    assert [r.attrs["data-arm"] for r in rows] == ["a", "b"]
    a, b = cells(rows[0]), cells(rows[1])
    assert text(a["arm_id"]) == "a"
    assert text(a["observations"]) == "12345" and a["observations"].attrs["data-value"] == "12345"
    assert text(a["pulls"]) == "12400" and text(a["rewards"]) == "3000"
    assert text(a["share"]) == "25.0%" and a["share"].attrs["data-value"] == repr(0.25)
    assert text(a["mean"]) == "0.2430" and float(a["mean"].attrs["data-value"] or "") == 0.24301
    assert text(a["interval"]) == "0.2355 – 0.2507"
    assert a["interval"].attrs["data-low"] == repr(0.2355) and a["interval"].attrs["data-high"] == repr(0.25071)
    assert text(a["p_best"]) == "2.7%" and text(a["expected_loss"]) == "0.0001"
    assert text(a["uplift"]) == "—"
    assert text(b["uplift"]) == "-1.2% … +45.7%"
    assert text(b["mean"]) == "—"  # NaN
    assert text(b["share"]) == "75.0%" and text(b["p_best"]) == "97.3%"
    # Every numeric cell carries its exact value.
    for row in (a, b):
        for field in ("share", "observations", "pulls", "rewards", "mean", "p_best", "expected_loss"):
            assert "data-value" in row[field].attrs, field
    assert rows[0].attrs["data-active"] == "false" and "inactive" in (rows[0].attrs["class"] or "")
    assert "best" in (rows[1].attrs["class"] or "")
    # An interval bar per arm, not inside a data-field cell (keeps cell texts clean).
    assert len(board.find_all("svg", **{"class": "interval"})) == 2


def test_interval_bar_draws_zero_values() -> None:
    view = sample_view()
    view["leaderboard"] = [arm("z", mean=0.0, low=0.0, high=0.1), arm("y", mean=0.05, low=0.01, high=0.2)]
    board = parse(render_experiment(view, NOW_MS)).one("table", id="leaderboard")
    bars = board.find_all("svg", **{"class": "interval"})
    assert [len(b.find_all("circle")) for b in bars] == [1, 1]
    assert [len(b.find_all("line")) for b in bars] == [2, 2]  # axis + whisker


def test_experiment_page_sections_and_links() -> None:
    page = render_experiment(sample_view(), NOW_MS)
    doc = parse(page)
    assert doc.one("meta", http_equiv="refresh").attrs["content"] == "15"
    assert doc.one("link", rel="stylesheet").attrs["href"] == "/static/style.css"
    assert "checkout-button" in text(doc.one("head").one("title"))
    for chart in ("chart-allocation", "chart-pbest", "chart-cumulative", "chart-latency"):
        svg_el = doc.one("svg", id=chart)
        assert svg_el.find_all("path") or svg_el.find_all("polygon") or svg_el.find_all("rect")
    assert len(doc.one("svg", id="chart-allocation").find_all("polygon")) == 2
    assert len(doc.one("svg", id="chart-pbest").find_all("path")) == 2
    assert len(doc.one("svg", id="chart-cumulative").find_all("path")) == 3
    assert "02:" in text(doc.one("svg", id="chart-pbest"))  # HH:MM time ticks around 02:04-03:04 UTC
    assert len(doc.one("svg", id="chart-latency").find_all("rect", fill=None)) >= 5
    assert text(doc.one("dd", data_field="p50")) == "0.90 ms" and text(doc.one("dd", data_field="p99")) == "9.00 ms"
    assert doc.one("section", id="vs-control")
    assert text(doc.one("td", data_field="uplift_mean")) == "+100.0%"
    assert text(doc.one("td", data_field="control_decisions")) == "1000"
    assert "REWARDS_SILENT" in text(doc.one("section", id="alarms"))
    guard = doc.one("table", id="guardrails").one("tr", data_metric="error_rate")
    assert text(cells(guard)["status"]) == "breached"
    assert text(cells(guard)["last_breach_ms"]).startswith("2026-12-02 03:02:05Z")
    events = doc.one("table", id="events").find_all("tr", **{"class": None})
    assert len([r for r in events if r.find_all("td")]) == 2
    assert text(cells(events[0])["value"]) == "-1.5" and text(cells(events[0])["propensity"]) == "—"
    assert text(cells(events[0])["ts_ms"]) == "2026-12-02 03:04:04Z"
    assert doc.one("a", href="checkout-button/events.csv")
    assert doc.one("a", href="../")
    assert text(doc.one("table", id="audit")).count("alice") == 1
    verdict = doc.one("section", id="verdict")
    assert verdict.find_all("div", **{"class": "verdict verdict-ship"})
    assert "could not be rendered" not in page


def test_index_page() -> None:
    exps = [{"id": "a/b c", "policy": "ucb", "state": "paused", "arms": 3, "active_arms": 2, "decisions": 123456,
             "observations": 100, "verdict": "", "alarms": 1, "guardrail_breaches": 0, "best_arm_id": "x"}]
    doc = parse(render_index(exps, NOW_MS))
    row = doc.one("tr", data_experiment="a/b c")
    c = cells(row)
    assert c["id"].one("a").attrs["href"] == "experiments/a%2Fb%20c"
    assert text(c["decisions"]) == "123456" and c["decisions"].attrs["data-value"] == "123456"
    assert text(c["state"]) == "paused" and text(c["verdict"]) == "—"
    empty = render_index([], NOW_MS)
    assert "No experiments yet" in empty
    parse(empty)


def assert_no_markup(page: str) -> Node:
    doc = parse(page)
    assert not doc.find_all("script") and not doc.find_all("img")
    assert SCRIPT not in page and "<img" not in page
    for node in doc.walk():
        assert not any(k.startswith("on") for k in node.attrs), node.attrs
    return doc


@pytest.mark.parametrize("hostile", [HOSTILE, SCRIPT, "'><svg onload=alert(1)>"])
def test_hostile_ids_are_escaped(hostile: str) -> None:
    view = sample_view(arm_b=hostile, exp_id=hostile, message=hostile)
    view["guardrails"][0]["metric"] = hostile
    view["audit"][0]["details"] = hostile
    view["events"][0]["unit_id"] = hostile
    page = render_experiment(view, NOW_MS)
    doc = assert_no_markup(page)
    assert "&lt;script&gt;" in page or "&lt;svg" in page
    # The hostile id round-trips as data, in attributes and texts.
    assert doc.one("tr", data_arm=hostile)
    assert doc.one("table", id="guardrails").one("tr", data_metric=hostile)
    assert text(doc.one("h1")) == hostile
    assert hostile in text(doc.one("head").one("title"))
    # The SVG legends show it (possibly truncated) as text, never as markup.
    legend = doc.one("svg", id="chart-pbest").find_all("g", **{"class": "legend-item"})
    assert any(text(g).startswith(svg._short(hostile).rstrip("…")) for g in legend)
    # Links quote the id; nothing of it survives unencoded in the href.
    href = doc.find_all("a", download=None)[0].attrs["href"] or ""
    assert href.endswith("/events.csv") and "<" not in href and '"' not in href and " " not in href
    index = render_index([{"id": hostile, "policy": hostile, "state": hostile, "verdict": hostile,
                           "best_arm_id": hostile}], NOW_MS)
    idoc = assert_no_markup(index)
    assert idoc.one("tr", data_experiment=hostile)


def test_svg_labels_escaped() -> None:
    chart = svg.line_chart([(SCRIPT, '"red" onload="x', [(T0, 1.0), (T0 + 60, 2.0)])], chart_id='"><b>')
    doc = assert_no_markup(chart)
    assert doc.one("svg").attrs["id"] == '"><b>'
    assert not doc.find_all("b")
    bars = svg.bar_chart([(SCRIPT, 3.0)], chart_id="lat")
    assert_no_markup(bars)


def test_events_csv_escaping_and_formula_protection() -> None:
    events = [
        {"ts_ms": NOW_MS, "kind": "reward", "decision_id": "=HYPERLINK(\"http://x\")", "unit_id": "+1",
         "arm_id": "-2", "value": -1.5, "propensity": 0.25, "source": "@sum"},
        {"ts_ms": NOW_MS, "kind": "decision", "decision_id": "\tcmd", "unit_id": "\rx", "arm_id": SCRIPT,
         "value": None, "propensity": None, "source": 'a,"b"\nc'},
    ]
    out = events_csv(events)
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0] == ["ts_ms", "time", "kind", "decision_id", "unit_id", "arm_id", "value", "propensity",
                       "source"]
    assert rows[1] == [str(NOW_MS), "2026-12-02 03:04:05Z", "reward", "'=HYPERLINK(\"http://x\")", "'+1", "'-2",
                       "-1.5", "0.25", "'@sum"]
    assert rows[2] == [str(NOW_MS), "2026-12-02 03:04:05Z", "decision", "'\tcmd", "'\rx", SCRIPT, "", "",
                       'a,"b"\nc']
    assert events_csv([]).strip() == ",".join(rows[0])


def test_empty_and_missing_sections_render_placeholders() -> None:
    for view in ({}, {"experiment": {"id": "e"}}, {k: None for k in sample_view()},
                 {**sample_view(), "history": [], "cumulative": [], "alarms": [], "guardrails": [], "events": [],
                  "audit": [], "leaderboard": [], "latency": None, "verdict": None, "bandit_vs_control": None}):
        page = render_experiment(view, NOW_MS)  # type: ignore[arg-type]
        doc = parse(page)
        for chart in ("chart-allocation", "chart-pbest", "chart-cumulative", "chart-latency"):
            assert "no data yet" in text(doc.one("svg", id=chart))
        for table in ("leaderboard", "guardrails", "events", "audit"):
            assert doc.one("table", id=table).find_all("tr", **{"class": "empty"})
        assert doc.one("section", id="vs-control").find_all("p", **{"class": "empty"})
        assert "could not be rendered" not in page
    page = render_experiment({**sample_view(), "alarms": []}, NOW_MS)
    assert "No alarms" in text(parse(page).one("section", id="alarms"))


def test_malformed_values_do_not_crash() -> None:
    view = sample_view()
    view["leaderboard"].append({"arm_id": None, "share": "x", "observations": float("inf"), "mean": None})
    view["history"].append({"t": float("nan"), "arms": None})
    view["history"].append({"t": T0, "arms": {"a": {"share": float("inf"), "p_best": "?"}}})
    view["latency"] = {"bounds": [0.001], "counts": [1, 2, 3, 4], "p50": float("nan"), "p95": None, "p99": "x"}
    view["events"].append({"ts_ms": 10**20, "kind": None})
    doc = parse(render_experiment(view, NOW_MS))
    assert text(doc.one("dd", data_field="p50")) == "—"
    assert "nan" not in "".join(n.attrs.get("d") or "" for n in doc.find_all("path")).lower()


@pytest.mark.parametrize("points", [[], [(T0, 0.5)], [(T0, 0.5), (T0 + 60, 0.5)], [(T0, 0.0), (T0, 0.0)],
                                    [(T0, math.nan), (math.inf, 1.0), (T0 + 1, 2.0)]])
def test_degenerate_charts(points: list[tuple[float, float]]) -> None:
    for chart in (svg.line_chart([("a", "#000", points)], chart_id="c"),
                  svg.line_chart([("a", "#000", points)], percent=True, y_max=1.0),
                  svg.stacked_area([("a", "#000", points), ("b", "#111", points)])):
        doc = parse(chart)
        assert "nan" not in chart.lower() and "inf" not in chart.lower()
        if not points:
            assert "no data yet" in text(doc)
    assert parse(svg.line_chart([("a", "#000", [(T0, 0.5)])])).find_all("circle")
    assert "nan" not in svg.interval_bar(math.nan, 0.1, math.inf, lo_bound=1.0, hi_bound=1.0).lower()


def test_single_point_history_page() -> None:
    view = sample_view()
    view["history"] = view["history"][:1]
    view["cumulative"] = view["cumulative"][:1]
    doc = parse(render_experiment(view, NOW_MS))
    assert len(doc.one("svg", id="chart-allocation").find_all("polygon")) == 2
    assert len(doc.one("svg", id="chart-pbest").find_all("circle")) == 2


def test_many_arms_chart_top_arms_and_other() -> None:
    view = sample_view()
    view["history"] = [{"t": T0 + i, "arms": {f"arm{j}": {"share": 1 / 30, "p_best": j / 435} for j in range(30)}}
                       for i in range(3)]
    doc = parse(render_experiment(view, NOW_MS))
    assert len(doc.one("svg", id="chart-pbest").find_all("path")) == 10
    assert len(doc.one("svg", id="chart-allocation").find_all("polygon")) == 11
    assert "other (20 arms)" in text(doc.one("svg", id="chart-allocation"))


def test_static_files() -> None:
    css = static_file("style.css")
    assert css is not None and css[1].startswith("text/css") and b".verdict-ship" in css[0]
    assert (STATIC_DIR / "style.css").is_file()
    for name in ("../render.py", "..", "", "/etc/passwd", "static/style.css", "..\\render.py", ".hidden.css",
                 "missing.css", "__init__.py", "style.css\x00.png"):
        assert static_file(name) is None, name
