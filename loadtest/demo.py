"""A short campaign against a running server: 5 subject lines with hidden conversion rates,
10,000 sends, Thompson sampling against uniform traffic. Prints conversions and regret.

    make serve            # in one terminal
    make demo             # in another
"""

from __future__ import annotations

import argparse
import random
import time
import uuid

from banditd_client import Client

RATES = {"plain": 0.040, "question": 0.045, "emoji": 0.050, "urgent": 0.035, "personal": 0.075}


def run(client: Client, policy: str, sends: int, batch: int, rng: random.Random) -> tuple[int, float, dict[str, int]]:
    exp = f"demo-{policy}-{uuid.uuid4().hex[:8]}"
    client.create_experiment(exp, arms=list(RATES), policy=policy)
    conversions, expected, traffic = 0, 0.0, dict.fromkeys(RATES, 0)
    pending: list[tuple[str, float]] = []
    for t in range(sends):
        d = client.decide(exp, unit_id=f"user-{t}")
        converted = 1.0 if rng.random() < RATES[d.arm] else 0.0
        conversions += int(converted)
        expected += RATES[d.arm]
        traffic[d.arm] += 1
        pending.append((d.decision_id, converted))
        if len(pending) >= batch:  # rewards arrive in batches, a little later
            client.reward_many(pending)
            pending.clear()
    if pending:
        client.reward_many(pending)
    regret = sends * max(RATES.values()) - expected
    return conversions, regret, traffic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="localhost:50051")
    ap.add_argument("--sends", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=50, help="rewards per reward_many call")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with Client(args.target) as client:
        rows = []
        for policy in ("uniform", "thompson"):
            started = time.perf_counter()
            conv, regret, traffic = run(client, policy, args.sends, args.batch, rng)
            rows.append((policy, conv, regret, traffic, time.perf_counter() - started))
    best = max(RATES, key=RATES.__getitem__)
    print(f"{'policy':<10} {'conversions':>11} {'regret':>8} {'best-arm share':>14} {'seconds':>8}")
    for policy, conv, regret, traffic, secs in rows:
        print(f"{policy:<10} {conv:>11} {regret:>8.1f} {traffic[best] / args.sends:>14.1%} {secs:>8.1f}")
    print(f"thompson regret / uniform regret = {rows[1][2] / rows[0][2]:.2f}")


if __name__ == "__main__":
    main()
