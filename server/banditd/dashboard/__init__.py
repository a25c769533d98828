"""HTML dashboard rendering: pure functions from plain dicts to HTML, SVG and CSV.

No HTTP and no data access here, so the pages can be tested in isolation and the
server wiring decides what to fetch and how often.
"""

from __future__ import annotations

from banditd.dashboard.render import STATIC_DIR, events_csv, render_experiment, render_index, static_file

__all__ = ["STATIC_DIR", "events_csv", "render_experiment", "render_index", "static_file"]
