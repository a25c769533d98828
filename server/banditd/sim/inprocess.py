"""Fast simulation in process: the world is played against the same Rust core, configured
the same way (priors, groups, policy parameters) as the server configures an experiment."""

from __future__ import annotations

import numpy as np

from banditd.experiment import ArmSpec, ExperimentRuntime, ExperimentSpec
from banditd.sim import clickonly
from banditd.sim.metrics import Trace
from banditd.sim.worlds import Contender, World

CHECKPOINTS = 200


def experiment_spec(world: World, contender: Contender) -> ExperimentSpec:
    groups = world.groups if contender.use_groups and world.groups else ("",) * world.n_arms
    arms = [ArmSpec(arm, group) for arm, group in zip(world.arms, groups, strict=True)]
    return ExperimentSpec(
        id=f"sim-{world.name}",
        arms=arms,
        policy=contender.policy,
        params=dict(contender.params),
        prior=contender.prior,
    )


def run(world: World, contender: Contender, seed: int, horizon: int | None = None) -> Trace:
    """One run; `seed` fixes both the policy's randomness and the world's luck."""
    if world.click_delay > 0:
        return clickonly.run(world, contender, seed, horizon)
    horizon = horizon or world.horizon
    spec = experiment_spec(world, contender)
    spec.validate()
    bandit = ExperimentRuntime(spec, seed=seed).bandit
    checkpoints = np.linspace(0, horizon - 1, min(CHECKPOINTS, horizon)).astype(int)
    arms, rewards, means = bandit.simulate(
        [list(p.rates) for p in world.phases],
        [p.start for p in world.phases],
        horizon,
        contender.update_every,
        checkpoints.tolist(),
        world_seed=10_000 + seed,
    )
    return Trace(
        arms=np.frombuffer(arms, dtype="<u4").astype(np.int64),
        rewards=np.frombuffer(rewards, dtype=np.uint8),
        checkpoints=checkpoints,
        means=np.asarray(means).reshape(len(checkpoints), world.n_arms),
    )
