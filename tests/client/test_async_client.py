"""The AsyncClient twin drives the same loop and raises the same exceptions."""

from __future__ import annotations

import asyncio

import pytest

from banditd_client import AsyncClient, ExperimentNotFound, InvalidArgument


def test_async_loop(server: object) -> None:
    async def main() -> None:
        async with AsyncClient(server.target) as c:  # type: ignore[attr-defined]
            await c.create_experiment("async", arms=["a", "b"], policy="epsilon_greedy", epsilon=0.3)
            decisions = await asyncio.gather(*(c.decide("async", unit_id=f"u{i}") for i in range(20)))
            assert len({d.decision_id for d in decisions}) == 20
            assert await c.reward(decisions[0].decision_id, 1.0) is True

            async def items():
                for d in decisions[1:]:
                    yield (d.decision_id, 0.0)

            counts = await c.reward_many(items())
            assert counts.accepted == 19
            stats = await c.arm_stats("async")
            assert sum(s.rewards for s in stats) == 20
            with pytest.raises(ExperimentNotFound):
                await c.decide("nope", unit_id="u")
            with pytest.raises(InvalidArgument, match="finite"):
                await c.reward(decisions[0].decision_id, float("nan"))

    asyncio.run(main())


def test_async_settings_analysis_and_audit(server: object) -> None:
    """The async client has the same surface as the sync one (one definition behind both)."""

    async def run() -> None:
        async with AsyncClient(server.target) as c:  # type: ignore[attr-defined]
            info = await c.create_experiment(
                "as", ["a", "b"], settings={"control_share": 0.2, "criteria": {"min_days": 0, "min_events_per_arm": 5}}
            )
            assert info.settings["control_share"] == 0.2 and info.settings["criteria"]["min_days"] == 0
            for i in range(60):
                d = await c.decide("as", unit_id=f"u{i}")
                await c.reward(d.decision_id, 1.0 if d.arm == "a" else 0.0)
            a = await c.analyse("as")
            assert a.verdict in ("ship", "iterate") and a.best_arm_id == "a"
            assert a.control_decisions > 0
            await c.update_experiment("as", settings={"guardrails": [{"metric": "error_rate", "action": "pause"}]})
            entries = await c.audit_log("as")
            assert [e.action for e in entries] == ["settings", "create"]
            assert entries[0].details["settings"]["guardrails"][0]["metric"] == "error_rate"
            with pytest.raises(InvalidArgument):
                await c.update_experiment("as", settings={"traffic_floor": 0.6})

    asyncio.run(run())
