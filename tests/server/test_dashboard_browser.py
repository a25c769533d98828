"""The dashboard and /metrics of a live server (`--http-port`): pages rendered by headless
Chromium (Debian's package, installed here when missing) show the numbers GetArmStats gives,
hostile ids stay text, and /metrics parses with the Prometheus client's parser and counts
the calls made."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

from banditd_client import Client
from conftest import ServerProcess, free_port

HOSTILE = '"><img src=x onerror="document.title=\'pwned\'">'


def chromium() -> str:
    """Debian's chromium, installed from the distribution's packages on a fresh machine."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            pytest.fail(f"could not install chromium ({' '.join(cmd)}): {done.stderr[-2000:]}")
    found = shutil.which("chromium")
    assert found, "chromium installed but not on PATH"
    return found


def render(url: str, screenshot: Path | None = None) -> str:
    """The DOM after Chromium loaded the page (scripts, had there been any, run)."""
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--window-size=1280,2600", "--hide-scrollbars"]  # fmt: skip
    if screenshot is not None:
        shot = subprocess.run([*args, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=False)
        assert screenshot.exists(), shot.stderr[-2000:]
    done = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


class Cells(HTMLParser):
    """Rows with a `data-arm` / `data-experiment` attribute: {row key: {data-field: text}}, and
    every tag with its attributes (to look for injected elements)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[str, dict[str, str]] = {}
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self._row: str | None = None
        self._field: str | None = None
        self.title = ""
        self.title_done = False
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and (a.get("data-arm") is not None or a.get("data-experiment") is not None):
            self._row = a.get("data-arm") or a.get("data-experiment")
            self.rows[self._row or ""] = {}
        elif tag == "td" and self._row is not None and a.get("data-field"):
            self._field = a["data-field"]
            self.rows[self._row][self._field] = ""
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._field = None
        elif tag == "tr":
            self._row = None
        elif tag == "title":
            self._in_title = False
            self.title_done = True  # the page's own; SVG charts have <title>s too

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._field is not None:
            self.rows[self._row][self._field] += data
        if self._in_title and not self.title_done:
            self.title += data


def parse(html: str) -> Cells:
    p = Cells()
    p.feed(html)
    return p


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
    port = free_port()
    srv = ServerProcess(tmp_path / "data", ("--http-port", str(port), "--history-seconds", "1"))
    srv.start()
    try:
        yield srv, f"http://127.0.0.1:{port}"
    finally:
        srv.stop()


def _traffic(c: Client, exp: str, rates: dict[str, float], n: int) -> None:
    rng = random.Random(7)
    for i in range(n):
        d = c.decide(exp, unit_id=f"u{i}")
        if rng.random() < rates[d.arm]:
            c.reward(d.decision_id, 1.0)


def test_dashboard_pages_show_the_served_numbers(web, tmp_path: Path) -> None:
    srv, base = web
    c = srv.client()
    arms = ["plain", "bold", HOSTILE]
    c.create_experiment(
        "news<letter>", arms,
        settings={"control_arm_id": "plain", "control_share": 0.1,
                  "criteria": {"min_days": 0, "min_events_per_arm": 50},
                  "guardrails": [{"metric": "latency_p95", "action": "alert"}]},
    )  # fmt: skip
    _traffic(c, "news<letter>", {"plain": 0.05, "bold": 0.3, HOSTILE: 0.1}, 800)
    time.sleep(2.5)  # settled, and a history snapshot or two taken
    stats = {s.arm: s for s in c.arm_stats("news<letter>")}
    shots = Path(os.environ.get("BANDITD_SCREENSHOT_DIR", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)

    page = parse(render(f"{base}/experiments/{quote('news<letter>', safe='')}", shots / "experiment.png"))
    assert set(page.rows) == set(arms)
    for arm, s in stats.items():
        row = page.rows[arm]
        assert row["arm_id"].strip() == arm
        assert int(row["pulls"]) == s.pulls
        assert int(row["observations"]) == s.observations
        assert int(row["rewards"]) == s.rewards
        assert row["mean"].strip() == f"{s.mean:.4f}"
        assert row["interval"].strip() == f"{s.low:.4f} – {s.high:.4f}"
        assert row["share"].strip() == f"{100 * s.recent_share:.1f}%"
    # The hostile arm id is text: no injected element, no script ran.
    assert not any(tag == "img" and "onerror" in a for tag, a in page.tags)
    assert "pwned" not in page.title and "news<letter>" in page.title, page.title
    html = render(f"{base}/experiments/{quote('news<letter>', safe='')}")
    for section in ('id="chart-allocation"', 'id="chart-pbest"', 'id="chart-cumulative"', 'id="chart-latency"',
                    'id="guardrails"', 'id="audit"', 'id="events"', 'id="verdict"'):  # fmt: skip
        assert section in html, section
    assert "<polyline" in html or "<path" in html  # history drawn

    index = parse(render(f"{base}/", shots / "index.png"))
    row = index.rows["news<letter>"]
    assert int(row["decisions"]) == sum(s.pulls for s in stats.values())

    with urllib.request.urlopen(f"{base}/experiments/{quote('news<letter>', safe='')}/events.csv") as resp:
        csv_text = resp.read().decode()
    assert csv_text.splitlines()[0].startswith("ts_ms,")
    assert len(csv_text.splitlines()) == 1 + sum(s.pulls for s in stats.values())
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{base}/experiments/nope")
    assert missing.value.code == 404


def test_metrics_scrape_parses_and_counts(web) -> None:
    srv, base = web
    c = srv.client()
    c.create_experiment("m", ["a", "b"])
    decisions = [c.decide("m", unit_id=f"u{i}") for i in range(25)]
    for d in decisions[:10]:
        c.reward(d.decision_id, 1.0)
    with pytest.raises(Exception):  # noqa: B017 - any client error: NOT_FOUND
        c.decide("missing", unit_id="u")
    time.sleep(0.3)
    with urllib.request.urlopen(f"{base}/metrics") as resp:
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(family: str, sample: str, **labels: str) -> float:
        for s in families[family].samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        raise AssertionError(f"{sample} {labels} not in the scrape")

    handled = "grpc_server_handled"
    assert value(handled, "grpc_server_handled_total", grpc_method="Decide", grpc_code="OK") == 25
    assert value(handled, "grpc_server_handled_total", grpc_method="Decide", grpc_code="NOT_FOUND") == 1
    assert value(handled, "grpc_server_handled_total", grpc_method="Reward", grpc_code="OK") == 10
    assert value("grpc_server_handling_seconds", "grpc_server_handling_seconds_count", grpc_method="Decide",
                 grpc_code="OK") == 25  # fmt: skip
    assert value("banditd_decisions", "banditd_decisions_total", experiment="m") == 25
    pulls = {s.labels["arm"]: s.value for s in families["banditd_arm_pulls"].samples}
    assert pulls == {s.arm: s.pulls for s in c.arm_stats("m")}
    assert "banditd_writer_queue_depth" in families and "banditd_lmdb_size_bytes" in families
    # No unit or decision ids as labels (Prometheus naming rules: bounded label sets).
    for family in families.values():
        for s in family.samples:
            assert not set(s.labels) & {"unit", "unit_id", "decision", "decision_id"}


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_http_needs_a_read_key_when_keys_are_on(web) -> None:
    import base64
    import json

    from test_auth import create_key

    srv, base = web
    admin = create_key(srv.data_dir, "admin")
    scoped = create_key(srv.data_dir, "read", prefix="team-a/")
    decide_only = create_key(srv.data_dir, "decide")
    time.sleep(1.5)  # keys are re-read at most every second
    c = Client(srv.target, api_key=admin)
    c.create_experiment("team-a/x", ["a", "b"])
    c.create_experiment("team-b/y", ["a", "b"])
    assert _get(f"{base}/")[0] == 401
    assert _get(f"{base}/metrics")[0] == 401
    assert _get(f"{base}/", {"Authorization": f"Bearer {decide_only}"})[0] == 401
    status, body = _get(f"{base}/", {"Authorization": f"Bearer {admin}"})
    assert status == 200 and b"team-b/y" in body
    basic = base64.b64encode(f"me:{scoped}".encode()).decode()
    status, body = _get(f"{base}/", {"Authorization": f"Basic {basic}"})
    assert status == 200 and b"team-a/x" in body and b"team-b/y" not in body
    assert _get(f"{base}/experiments/{quote('team-b/y', safe='')}", {"Authorization": f"Basic {basic}"})[0] == 404
    status, body = _get(f"{base}/api/experiments/{quote('team-a/x', safe='')}", {"Authorization": f"Bearer {scoped}"})
    assert status == 200 and json.loads(body)["experiment"]["id"] == "team-a/x"
    assert _get(f"{base}/static/style.css")[0] == 200  # the stylesheet is public
    assert _get(f"{base}/static/..%2Fweb.py")[0] == 404
