"""End-to-end simulation: the world drives a running server through the client SDK, with
rewards delivered late and in batches, as an application would send them."""

from __future__ import annotations

import uuid

import numpy as np

from banditd.sim.inprocess import experiment_spec
from banditd.sim.metrics import Trace
from banditd.sim.worlds import Contender, World
from banditd_client import Client

CHECKPOINTS = 50


def run(client: Client, world: World, contender: Contender, seed: int, horizon: int | None = None) -> Trace:
    """One run on a fresh experiment. Rewards of a batch of `update_every` decisions are
    sent (with reward_many) only once the batch is complete: the server learns late."""
    if world.in_process_only:
        raise ValueError(f"the {world.name} world is played in process only")
    horizon = horizon or world.horizon
    spec = experiment_spec(world, contender)
    experiment_id = f"sim-{world.name}-{uuid.uuid4().hex[:10]}"
    client.create_experiment(
        experiment_id,
        arms=[{"id": a.id, "group": a.group} for a in spec.arms],
        policy=spec.policy,
        prior=spec.prior,
        **spec.params,  # type: ignore[arg-type]  # policy parameters are the floats it takes
    )
    index = {arm: i for i, arm in enumerate(world.arms)}
    luck = np.random.default_rng(10_000 + seed).random(horizon)
    rates = world.rates_at(np.arange(horizon))
    checkpoints = np.linspace(0, horizon - 1, min(CHECKPOINTS, horizon)).astype(int)
    arms = np.zeros(horizon, dtype=np.int64)
    rewards = np.zeros(horizon, dtype=np.uint8)
    means: list[list[float]] = []
    pending: list[tuple[str, float]] = []
    next_checkpoint = 0
    for t in range(horizon):
        while next_checkpoint < len(checkpoints) and checkpoints[next_checkpoint] <= t:
            means.append(_means(client, experiment_id, index))
            next_checkpoint += 1
        d = client.decide(experiment_id, unit_id=f"unit-{seed}-{t}")
        arm = index[d.arm]
        arms[t] = arm
        rewards[t] = luck[t] < rates[t, arm]
        pending.append((d.decision_id, float(rewards[t])))
        if len(pending) >= contender.update_every:
            client.reward_many(pending)
            pending.clear()
    if pending:
        client.reward_many(pending)
    return Trace(arms=arms, rewards=rewards, checkpoints=checkpoints, means=np.array(means))


def _means(client: Client, experiment_id: str, index: dict[str, int]) -> list[float]:
    out = [0.0] * len(index)
    for s in client.arm_stats(experiment_id):
        out[index[s.arm]] = s.mean
    return out
