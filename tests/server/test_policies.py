"""Every policy is selectable through CreateExperiment and used by Decide."""

from __future__ import annotations

import pytest

from banditd_client import Client, InvalidArgument

BINARY_POLICIES = [
    ("thompson", {}),
    ("thompson", {"exploitation": 4.0}),
    ("ucb1", {"ucb_c": 0.5}),
    ("kl_ucb", {}),
    ("epsilon_greedy", {"epsilon": 0.2, "epsilon_decay": 100.0}),
    ("softmax", {"temperature": 0.05}),
    ("greedy", {}),
    ("uniform", {}),
    ("thompson", {"half_life": 50.0}),
]


@pytest.mark.parametrize(("policy", "params"), BINARY_POLICIES)
def test_policy_decides_with_valid_scores_and_learns(client: Client, policy: str, params: dict[str, float]) -> None:
    exp = f"p-{policy}-{len(params)}"
    info = client.create_experiment(exp, arms=["good", "bad", "meh"], policy=policy, **params)
    assert info.policy == policy and info.policy_params == params
    rates = {"good": 0.9, "bad": 0.05, "meh": 0.3}
    picks = []
    for i in range(120):
        d = client.decide(exp, unit_id=f"u{i}", k=2)
        assert len({c.arm for c in d.arms}) == 2
        for c in d.arms:
            assert 0.0 <= c.score <= 1.0 and 0.0 < c.propensity <= 1.0
        picks.append(d.arm)
        # Deterministic rewards at each slate arm's rate, so the test cannot flake (every
        # arm shown is an observation: an unrewarded one counts as a 0).
        for c in d.arms:
            client.reward(d.decision_id, 1.0 if (i * 37 % 100) < rates[c.arm] * 100 else 0.0, arm=c.arm)
    stats = {s.arm: s for s in client.arm_stats(exp)}
    assert stats["good"].mean > stats["bad"].mean
    if policy not in ("uniform", "epsilon_greedy"):
        assert picks[-40:].count("good") > 20, (policy, picks[-40:])


def test_continuous_thompson_and_ucb(client: Client) -> None:
    for policy in ("thompson", "ucb1"):
        exp = f"revenue-{policy}"
        client.create_experiment(exp, arms=["a", "b"], policy=policy, reward_type="continuous", prior=(0.0, 1.0))
        for i in range(60):
            d = client.decide(exp, unit_id=f"u{i}")
            client.reward(d.decision_id, 12.0 if d.arm == "a" else 3.0)
        stats = {s.arm: s for s in client.arm_stats(exp)}
        assert stats["a"].mean > stats["b"].mean


def test_kl_ucb_refuses_continuous_rewards(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="kl_ucb"):
        client.create_experiment("kl-cont", arms=["a", "b"], policy="kl_ucb", reward_type="continuous")


def test_group_priors_pool_sibling_arms(client: Client) -> None:
    arms = [{"id": f"t{i}", "group": "promo" if i < 4 else ""} for i in range(6)]
    client.create_experiment("groups", arms=arms, policy="uniform", group_prior_strength=50.0)
    for i in range(400):
        d = client.decide("groups", unit_id=f"u{i}")
        client.reward(d.decision_id, 1.0 if (i % 5 == 0) else 0.0)  # 20% everywhere
    stats = {s.arm: s for s in client.arm_stats("groups")}
    grouped = [stats[f"t{i}"] for i in range(4)]
    pooled = sum(s.reward_sum for s in grouped) / sum(s.rewards for s in grouped)
    for s in grouped:
        own = s.reward_sum / s.rewards
        # Each grouped arm's score sits between its own rate and the group's pooled rate.
        assert min(own, pooled) - 0.02 <= s.mean <= max(own, pooled) + 0.02, (s.arm, own, pooled, s.mean)
        # ...and with 50 pseudo-observations it is pulled most of the way to the pool.
        assert abs(s.mean - pooled) <= abs(own - pooled) * 0.7 + 0.02
    assert stats["t0"].group == "promo"
