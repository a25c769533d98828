"""In-place upgrades of older on-disk layouts, run by `Store` inside its opening transaction.

Schema 1 (banditd before the outcome model) counted every reward event as one observation
and kept per-arm totals [pulls, rewards, reward_sum, reward_sumsq] as JSON; policy counters
lived in memory only. Its experiments are upgraded to `explicit` outcome mode (only reported
outcomes are observations), which is what they were learning under; their totals become the
posterior statistics unchanged, and the reward events become per-decision aggregates so that
later events for old decisions swap values correctly. Half-life experiments restart their
discounting from the stored (undiscounted) totals: schema 1 never stored discounted ones.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import orjson

from banditd.outcomes import combine

if TYPE_CHECKING:
    from banditd.store import Store

log = logging.getLogger("banditd.store")


def upgrade_v1(store: Store, txn: Any) -> None:
    from banditd.store import SEP, ArmRow, Outcome, PolicyState, key

    specs: dict[str, dict[str, Any]] = {}
    for k, v in txn.cursor(db=store.experiments):
        spec = orjson.loads(v)
        binary = spec.get("reward_type", "binary") == "binary"
        spec.setdefault(
            "outcomes",
            {"mode": "explicit", "aggregation": "max" if binary else "sum", "default_reward": 0.0, "min_age_s": 0.0},
        )
        specs[k.decode()] = spec
        txn.put(k, orjson.dumps(spec), db=store.experiments)
    policies: dict[str, PolicyState] = defaultdict(PolicyState)
    rows = []
    for k, v in txn.cursor(db=store.arms):
        pulls, rewards, s, s2 = orjson.loads(v)
        rows.append((bytes(k), ArmRow(pulls, rewards, rewards, s, rewards, s, s2, rewards)))
        exp = k.split(SEP, 1)[0].decode()
        policies[exp].decisions += int(pulls)
        policies[exp].clock += rewards
    for k, row in rows:
        txn.put(k, row.encode(), db=store.arms)
    for exp, st in policies.items():
        st.base = st.clock
        txn.put(exp.encode(), st.encode(), db=store.policy)
    aggregates: dict[bytes, Outcome] = {}
    for k, v in txn.cursor(db=store.events):
        decision_id, arm, value, _ms = orjson.loads(v)
        exp = k.split(SEP, 1)[0].decode()
        rule = specs.get(exp, {}).get("outcomes", {}).get("aggregation", "max")
        ok = key(decision_id, arm)
        old = aggregates.get(ok)
        aggregates[ok] = Outcome(combine(rule, old.value if old else None, value), (old.events if old else 0) + 1)
    for ok, outcome in aggregates.items():
        txn.put(ok, outcome.encode(), db=store.outcomes)
    log.warning(
        "schema 1 -> 2: %d experiments now in explicit outcome mode (as they learnt before), %d arm rows, "
        "%d decision outcomes rebuilt",
        len(specs), len(rows), len(aggregates),
    )
