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
