"""Bad input gets the right gRPC status and a clear message, and changes nothing."""

from __future__ import annotations

import time

import grpc
import pytest

from banditd_client import (
    AlreadyExists,
    ArmNotFound,
    Client,
    Decision,
    DecisionNotFound,
    ExperimentAlreadyExists,
    ExperimentNotFound,
    FailedPrecondition,
    InvalidArgument,
)
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

ARMS = ["a", "b", "c"]


@pytest.fixture
def exp(client: Client) -> str:
    client.create_experiment("e", arms=ARMS)
    return "e"


def _state(client: Client) -> list[object]:
    return [(e, client.arm_stats(e.id)) for e in client.list_experiments()]


def _committed_decision(client: Client, exp: str) -> Decision:
    """A decision whose record (written behind the response) is in the statistics."""
    before = sum(s.pulls for s in client.arm_stats(exp))
    d = client.decide(exp, unit_id="u")
    deadline = time.monotonic() + 10
    while sum(s.pulls for s in client.arm_stats(exp)) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    return d


def test_unknown_experiment(client: Client, exp: str) -> None:
    before = _state(client)
    with pytest.raises(ExperimentNotFound, match="'missing' does not exist") as err:
        client.decide("missing", unit_id="u")
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(ExperimentNotFound):
        client.arm_stats("missing")
    with pytest.raises(ExperimentNotFound):
        client.update_experiment("missing", add_arms=["z"])
    assert _state(client) == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 1.5, -0.1])
def test_bad_reward_values(client: Client, exp: str, value: float) -> None:
    d = _committed_decision(client, exp)
    before = _state(client)
    with pytest.raises(InvalidArgument) as err:
        client.reward(d.decision_id, value)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(value) in err.value.message
    assert _state(client) == before
    # The decision can still be rewarded properly afterwards.
    assert client.reward(d.decision_id, 1.0) is True


def test_empty_and_duplicate_arms(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="at least one arm"):
        client.create_experiment("empty", arms=[])
    with pytest.raises(InvalidArgument, match="duplicate arm id 'a'"):
        client.create_experiment("dup", arms=["a", "b", "a"])
    with pytest.raises(InvalidArgument, match="empty"):
        client.create_experiment("", arms=["a"])
    assert client.list_experiments() == []


def test_duplicate_experiment(client: Client, exp: str) -> None:
    before = _state(client)
    with pytest.raises(ExperimentAlreadyExists, match="already exists") as err:
        client.create_experiment(exp, arms=["x", "y"])
    assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert _state(client) == before
    with pytest.raises(AlreadyExists, match="arm 'a' already exists"):
        client.update_experiment(exp, add_arms=["a"])


def test_unknown_decision(client: Client, exp: str) -> None:
    before = _state(client)
    with pytest.raises(DecisionNotFound, match="never issued") as err:
        client.reward("0000-not-a-decision", 1.0)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert _state(client) == before


def test_k_larger_than_arms(client: Client, exp: str) -> None:
    before = _state(client)
    with pytest.raises(InvalidArgument, match="k=4 is larger than the number of active arms"):
        client.decide(exp, unit_id="u", k=4)
    assert _state(client) == before


def test_bad_policy_parameters(client: Client) -> None:
    with pytest.raises(InvalidArgument, match="unknown policy 'magic'"):
        client.create_experiment("p1", arms=ARMS, policy="magic")
    with pytest.raises(InvalidArgument, match="epsilon must be in"):
        client.create_experiment("p2", arms=ARMS, policy="epsilon_greedy", epsilon=1.5)
    with pytest.raises(InvalidArgument, match="alpha > 0"):
        client.create_experiment("p3", arms=ARMS, prior=(-1.0, 2.0))
    assert client.list_experiments() == []


def test_retire_unknown_or_all_arms(client: Client, exp: str) -> None:
    with pytest.raises(ArmNotFound, match="no arm 'zz'"):
        client.update_experiment(exp, retire_arms=["zz"])
    with pytest.raises(FailedPrecondition, match="no active arm"):
        client.update_experiment(exp, retire_arms=ARMS)
    assert all(a.active for a in client.get_experiment(exp).arms)


def test_reward_for_arm_not_in_decision(client: Client, exp: str) -> None:
    d = client.decide(exp, unit_id="u")
    other = next(a for a in ARMS if a != d.arm)
    with pytest.raises(ArmNotFound, match="not arm"):
        client.reward(d.decision_id, 1.0, arm=other)


def test_raw_grpc_status_codes(server: object, client: Client, exp: str) -> None:
    """Callers without the SDK see standard status codes and the message."""
    with grpc.insecure_channel(server.target) as ch:  # type: ignore[attr-defined]
        stub = pb_grpc.BanditdStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(pb.DecideRequest(experiment_id=exp, unit_id="u", k=9), timeout=5)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "k=9" in err.value.details()
