"""The simulator's worlds at (or near) full size: the learning targets, asserted.

Seeds are fixed, so each assertion is deterministic for a given core; margins are wide
enough to hold across seeds (see `banditd simulate` for the full tables)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from banditd import _core
from banditd.cli import main
from banditd.sim import e2e, inprocess
from banditd.sim.metrics import Summary, summarise
from banditd.sim.worlds import World, click_only, delay, drift, limit, sparse_campaign, subject_lines
from banditd_client import Client


def play(world: World, seeds: int, names: list[str] | None = None) -> dict[str, Summary]:
    chosen = [c for c in world.contenders if names is None or c.name in names]
    return {c.name: summarise(world, c.name, [inprocess.run(world, c, s) for s in range(seeds)]) for c in chosen}


def test_limit_world_thompson_is_near_the_lai_robbins_bound_and_beats_ucb1() -> None:
    world = limit()  # 1,000,000 rounds
    out = play(world, seeds=3, names=["thompson", "ucb1"])
    bound = world.lai_robbins()
    assert out["thompson"].regret <= 1.2 * bound
    assert out["thompson"].regret < out["ucb1"].regret
    assert out["thompson"].late_best_share > 0.99


def test_delayed_updates_cost_little() -> None:
    world = delay()
    out = play(world, seeds=3, names=["thompson, update every 1", "thompson, update every 1,000"])
    assert out["thompson, update every 1,000"].regret <= 1.5 * out["thompson, update every 1"].regret


def test_sparse_campaign_group_priors_beat_flat_priors_and_uniform() -> None:
    world = sparse_campaign()
    out = play(world, seeds=20)
    group, flat, uniform = out["group priors"], out["flat Beta(1,1)"], out["uniform"]
    assert group.reward > flat.reward
    assert group.reward > uniform.reward
    best = int(np.argmax(world.phases[0].rates))
    assert group.final_shares[best] >= 3.0 / world.n_arms


def test_subject_lines_thompson_regret_is_a_quarter_of_uniform() -> None:
    out = play(subject_lines(), seeds=20, names=["uniform", "thompson"])
    assert out["thompson"].regret <= 0.25 * out["uniform"].regret


def test_drift_discounting_reacts_where_the_stationary_policy_lags() -> None:
    world = drift()
    out = play(world, seeds=3)
    discounted = out["thompson, half-life 20,000"]
    assert discounted.regret < out["thompson, stationary"].regret
    after_switch = discounted.traces[0].arms[-10_000:]
    assert np.mean(after_switch == 9) > 0.8, "the new best arm takes the traffic"


def test_click_only_decision_mode_learns_the_rates_where_explicit_mode_sees_only_ones() -> None:
    world = click_only()  # 30,000 decisions, clicks ~300 decisions late, non-clicks never reported
    out = play(world, seeds=4, names=[c.name for c in world.contenders if c.policy == "thompson"])
    explicit, decision = out["thompson, explicit"], out["thompson, decision"]
    matured = out["thompson, decision, min_age 900"]
    rates = np.array(world.phases[0].rates)
    best = int(np.argmax(rates))
    assert np.all(explicit.final_means > 0.5), "explicit mode: every observation is a click"
    for s in (decision, matured):
        assert s.regret < 0.5 * explicit.regret
        assert abs(s.final_means[best] - rates[best]) < 0.01
        assert np.all(s.final_means < 0.1)
        assert s.late_best_share > max(0.9, explicit.late_best_share)


def test_click_only_posterior_counts_every_decision_and_the_clicks_reported_in_time() -> None:
    world = dataclasses.replace(click_only(), horizon=5_000)
    by_name = {c.name: c for c in world.contenders}
    lag = int(10 * world.click_delay)  # clicks of older decisions have surely arrived (p ~ e^-10)
    for name in ("thompson, decision", "thompson, explicit"):
        trace = inprocess.run(world, by_name[name], seed=3)
        for arm in range(world.n_arms):
            mine = trace.arms == arm
            n, clicks = int(mine.sum()), int(trace.rewards[mine].sum())
            arrived = int(trace.rewards[:-lag][mine[:-lag]].sum())
            # Beta(1, 1) prior: mean = (1 + sum) / (2 + n), with arrived <= sum <= clicks.
            mean = trace.final_means[arm]
            if name == "thompson, decision":  # n = every decision on the arm
                assert (1 + arrived) / (2 + n) - 1e-9 <= mean <= (1 + clicks) / (2 + n) + 1e-9
            else:  # n = sum = the clicks reported
                assert (1 + arrived) / (2 + arrived) - 1e-9 <= mean <= (1 + clicks) / (2 + clicks) + 1e-9


def test_posterior_means_stay_probabilities_and_a_run_replays_from_its_seed() -> None:
    world = dataclasses.replace(subject_lines(), horizon=2_000)
    thompson = next(c for c in world.contenders if c.name == "thompson")
    a, b = inprocess.run(world, thompson, seed=4), inprocess.run(world, thompson, seed=4)
    assert np.array_equal(a.arms, b.arms) and np.array_equal(a.rewards, b.rewards)
    assert np.all((a.means >= 0.0) & (a.means <= 1.0))


def test_core_simulate_refuses_bad_worlds() -> None:
    bandit = _core.Bandit("binary", "thompson", seed=1)
    bandit.add_arms([1.0, 1.0], [1.0, 1.0])
    with pytest.raises(_core.CoreError, match=r"\[0, 1\]"):
        bandit.simulate([[0.2, 1.5]], [0], 10)
    with pytest.raises(_core.CoreError, match="phase"):
        bandit.simulate([[0.2, 0.5]], [0, 5], 10)


def test_end_to_end_subject_lines_through_the_server(client: Client) -> None:
    world = subject_lines()  # 10,000 sends, rewards in batches of 50
    by_name = {c.name: c for c in world.contenders}
    uniform = e2e.run(client, world, by_name["uniform"], seed=0)
    thompson = [e2e.run(client, world, by_name["thompson"], seed=seed) for seed in (0, 1)]
    uniform_regret = summarise(world, "uniform", [uniform]).regret
    thompson_regret = summarise(world, "thompson", thompson).regret  # mean of the two runs
    # Thompson's regret per run is ~40-50 with sd ~20 (uniform's ~260 ± 1.5): the mean of two
    # runs stays under 0.4x uniform by > 3.5 sd, while a loop that stopped learning scores
    # ~1.0x. (One run alone once reached 0.41x in CI.) The 5-seed figure is ~0.15x.
    assert thompson_regret <= 0.4 * uniform_regret
    for trace in thompson:
        assert np.all((trace.means >= 0.0) & (trace.means <= 1.0))


def test_simulate_command_prints_the_table_and_writes_plots(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "subject-lines", "--seeds", "2", "--horizon", "3000", "--report-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "thompson" in out and "÷ baseline" in out
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(
        ["subject-lines.txt", "subject-lines-regret.png", "subject-lines-share.png", "subject-lines-scores.png"]
    )
    assert all((tmp_path / n).stat().st_size > 1000 for n in names)


def test_simulate_click_only_prints_posterior_means_and_runs_in_process_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["simulate", "click-only", "--seeds", "1", "--horizon", "3000", "--no-plots", "--report-dir", str(tmp_path)]
    assert main([*args, "--target", "127.0.0.1:1"]) == 0  # no server there: never contacted
    captured = capsys.readouterr()
    assert "in process only" in captured.err and "(in process," in captured.out
    assert "final posterior means" in captured.out and "true rate" in captured.out
    assert "thompson, explicit" in (tmp_path / "click-only.txt").read_text()
