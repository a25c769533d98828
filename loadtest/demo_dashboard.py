"""Fills a fresh server with a realistic experiment and screenshots its dashboard.

A subject-line test: the current line as control arm (with a 10% traffic floor), three
challengers, a 10% random control share, a burn-in of 50 observations per arm and two
guardrails; clicks only are reported. A second experiment has its reward rate collapse
halfway, so its reward-drop guardrail falls back to the control arm.

    python loadtest/demo_dashboard.py --seconds 60 --out docs/img
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ServerProcess, free_port

from banditd_client import Client

RATES = {"current": 0.040, "short": 0.046, "question": 0.052, "emoji": 0.035}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--out", type=Path, default=Path("docs/img"))
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("needs Debian's chromium (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        http = free_port()
        srv = ServerProcess.banditd(Path(tmp), "--workers", "1", "--http-port", str(http), "--history-seconds", "2")
        srv.start()
        try:
            c = Client(srv.target)
            c.create_experiment("subject-lines", list(RATES), settings={
                "control_arm_id": "current", "control_share": 0.1, "arm_floors": {"current": 0.1}, "burn_in": 50,
                "criteria": {"min_days": 0, "min_events_per_arm": 1000},
                "guardrails": [{"metric": "reward_drop", "action": "fallback", "fallback_arm_id": "current"},
                               {"metric": "latency_p95", "threshold": 0.12, "action": "alert"}],
            })  # fmt: skip
            c.create_experiment("checkout-button", ["green", "blue"], settings={
                "guardrails": [{"metric": "reward_drop", "action": "fallback", "fallback_arm_id": "green",
                                "window_seconds": 10, "min_samples": 300}],
            })  # fmt: skip
            rng = random.Random(3)
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < args.seconds:
                elapsed = time.monotonic() - start
                d = c.decide("subject-lines", unit_id=f"u{n}")
                if rng.random() < RATES[d.arm]:
                    c.reward(d.decision_id, 1.0)
                if c.get_experiment("checkout-button").state == "running" or n % 5 == 0:
                    try:
                        e = c.decide("checkout-button", unit_id=f"v{n}")
                        rate = 0.3 if elapsed < args.seconds / 2 else 0.1
                        if rng.random() < rate:
                            c.reward(e.decision_id, 1.0)
                    except Exception:  # noqa: BLE001 - paused or fallback slates: keep the demo going
                        pass
                n += 1
            time.sleep(3)
            for name, path in (("index", "/"), ("experiment", "/experiments/subject-lines"),
                               ("fallback", "/experiments/checkout-button")):  # fmt: skip
                shot = args.out / f"dashboard-{name}.png"
                subprocess.run(
                    [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                     "--window-size=1280,3000", f"--screenshot={shot}", f"http://127.0.0.1:{http}{path}"],
                    capture_output=True, timeout=120, check=True,
                )  # fmt: skip
                print(f"wrote {shot}")
            a = c.analyse("subject-lines")
            print(f"{n} decisions; verdict {a.verdict}: {a.reason}")
        finally:
            srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
