"""The stop rule on its own (banditd.analysis.decide_verdict): each branch from the numbers
the posterior analysis gives."""

from __future__ import annotations

from banditd.analysis import decide_verdict
from banditd.settings import Criteria


def arm(arm_id: str, p_best: float, p_min: float, ref: str = "control", obs: int = 5000,
        mean: float = 0.05, loss: float = 0.0) -> dict:  # fmt: skip
    return {"arm_id": arm_id, "active": True, "observations": obs, "mean": mean, "p_best": p_best,
            "expected_loss": loss, "reference_arm_id": ref, "p_min_uplift": p_min, "uplift_low": 0.05,
            "uplift_high": 0.4}  # fmt: skip


CRIT = Criteria()  # 3%, 95%, 7..14 days, 1,000 observations


def control(p_best: float = 0.0, obs: int = 5000) -> dict:
    return arm("control", p_best, float("nan"), ref="", obs=obs, loss=0.01)


def test_ship_a_clear_best_that_beats_the_control() -> None:
    verdict, reason = decide_verdict([control(), arm("b", 0.99, 0.99), arm("c", 0.01, 0.2)], CRIT, 8, "control")
    assert verdict == "ship" and "'b' beats 'control'" in reason


def test_iterate_while_two_challengers_beat_the_control_but_neither_is_clearly_best() -> None:
    arms = [control(), arm("b", 0.6, 0.99, loss=0.002), arm("c", 0.4, 0.98, loss=0.003)]
    verdict, reason = decide_verdict(arms, CRIT, 8, "control")
    assert verdict == "iterate" and "not yet the clear best" in reason
    # Equally good and settled: the expected loss of choosing b is below the threshold of caring.
    arms[1]["expected_loss"] = 1e-6
    assert decide_verdict(arms, CRIT, 8, "control")[0] == "ship"


def test_kill_when_no_arm_can_beat_the_control() -> None:
    verdict, reason = decide_verdict([control(0.9), arm("b", 0.1, 0.01)], CRIT, 8, "control")
    assert verdict == "kill" and "keep the control" in reason


def test_iterate_before_the_minimum_duration_or_observations() -> None:
    arms = [control(), arm("b", 0.99, 0.99)]
    verdict, reason = decide_verdict(arms, CRIT, 3, "control")
    assert verdict == "iterate" and "more days" in reason
    arms[0]["observations"] = 300
    verdict, reason = decide_verdict(arms, CRIT, 8, "control")
    assert verdict == "iterate" and "700 more observations on arm 'control'" in reason
    # A starved loser does not hold the verdict back: only the compared arms need the minimum.
    arms = [control(), arm("b", 0.99, 0.99), arm("loser", 0.0, 0.0, obs=20)]
    assert decide_verdict(arms, CRIT, 8, "control")[0] == "ship"


def test_kill_after_the_maximum_duration_without_a_winner() -> None:
    verdict, reason = decide_verdict([control(0.4), arm("b", 0.6, 0.5)], CRIT, 15, "control")
    assert verdict == "kill" and "14 days" in reason
    verdict, _ = decide_verdict([control(0.4, obs=100), arm("b", 0.6, 0.5)], CRIT, 15, "control")
    assert verdict == "kill"


def test_without_a_control_equal_arms_are_killed_as_practically_equal() -> None:
    arms = [arm("a", 0.5, 0.01, ref="b"), arm("b", 0.5, 0.01, ref="a")]
    verdict, reason = decide_verdict(arms, CRIT, 8, "")
    assert verdict == "kill" and "practically equal" in reason
