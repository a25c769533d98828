"""The client's side of issue 17: typed contexts, contextual policy parameters, model
versions and GetModel, for Client and AsyncClient (one conversion module, `_convert`)."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import numpy as np
import pytest

from banditd.engine import Engine
from banditd_client import (
    ArmModel,
    AsyncClient,
    Client,
    Coefficient,
    FailedPrecondition,
    Feature,
    InvalidArgument,
    ModelReport,
)
from banditd_client import _convert as conv
from banditd_client.v1 import banditd_pb2 as pb
from conftest import ServerProcess

CONTEXTUAL_PARAMS = {
    "alpha": 2.5,
    "ridge": 0.5,
    "exploration_floor": 0.05,
    "refit_seconds": 30.0,
    "encoder_warmup": 100.0,
    "encoder_refit_seconds": 600.0,
}


def features(context: Any) -> dict[str, tuple[str, object]]:
    """(which field, value) per key of the request's typed map."""
    req = conv.decide_request("e", "u", None, context)
    assert not req.context  # everything travels typed
    out: dict[str, tuple[str, object]] = {}
    for key, value in req.features.items():
        kind = value.WhichOneof("kind")
        assert kind is not None
        out[key] = (kind, getattr(value, kind))
    return out


def test_context_values_keep_their_types() -> None:
    got = features({"age": 31, "score": 0.25, "country": "de", "empty": "", "neg": -1e300})
    assert got == {
        "age": ("number", 31.0),
        "score": ("number", 0.25),
        "country": ("text", "de"),
        "empty": ("text", ""),
        "neg": ("number", -1e300),
    }


def test_bool_is_text() -> None:
    """bool is an int subclass: it must not silently become the number 1 or 0."""
    assert features({"member": True, "trial": False}) == {"member": ("text", "true"), "trial": ("text", "false")}


def test_numpy_scalars_are_numbers() -> None:
    got = features({"i": np.int64(7), "f": np.float32(0.5), "d": np.float64(2.0)})
    assert got == {"i": ("number", 7.0), "f": ("number", 0.5), "d": ("number", 2.0)}


def test_nan_is_left_to_the_server() -> None:
    """The server refuses non-finite numbers, naming the key (one rule, one place)."""
    (kind, value), = features({"x": float("nan")}).values()
    assert kind == "number" and isinstance(value, float) and math.isnan(value)


def test_no_context() -> None:
    assert features(None) == {} and features({}) == {}


@pytest.mark.parametrize(
    ("context", "message"),
    [
        ({1: "a"}, r"context keys must be str, got int: 1"),
        ({b"k": "a"}, r"context keys must be str, got bytes"),
        ({"k": None}, r"context value of 'k' must be str, int or float, got NoneType: None"),
        ({"k": b"x"}, r"got bytes"),
        ({"k": [1, 2]}, r"got list"),
        ({"k": 1j}, r"got complex"),
        ({"k": {"nested": 1}}, r"got dict"),
    ],
)
def test_other_types_raise_type_error(context: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        conv.decide_request("e", "u", None, context)


def test_int_beyond_a_double() -> None:
    with pytest.raises(ValueError, match="context value of 'n' .* too large for a double"):
        conv.decide_request("e", "u", None, {"n": 10**400})


def test_contextual_policy_params_round_trip() -> None:
    req = conv.create_request("e", ["a", "b"], "lin_ucb", "binary", False, 0, None, CONTEXTUAL_PARAMS)
    for name, value in CONTEXTUAL_PARAMS.items():
        assert getattr(req.experiment.policy, name) == value
    info = conv.experiment(req.experiment)
    assert info.policy == "lin_ucb" and info.policy_params == CONTEXTUAL_PARAMS
    with pytest.raises(TypeError, match="unknown policy parameters"):
        conv.create_request("e", ["a"], "lin_ucb", "binary", False, 0, None, {"lambda": 1.0})


def test_every_policy_field_is_a_param() -> None:
    """A Policy field the client cannot set or read back would be a silent gap."""
    fields = {f.name for f in pb.Policy.DESCRIPTOR.fields} - {"name"}
    assert fields == set(conv.POLICY_PARAMS)


def test_decision_model_version() -> None:
    resp = pb.DecideResponse(decision_id="d", arms=[pb.ChosenArm(arm_id="a", score=0.5, propensity=1.0)],
                             model_version=7)
    d = conv.decision(resp)
    assert d.model_version == 7 and d.arm == "a"
    assert conv.decision(pb.DecideResponse(decision_id="d")).model_version == 0


def test_model_report_conversion() -> None:
    resp = pb.ModelReport(
        experiment_id="e",
        policy="lin_ts",
        model_version=2,
        features=[
            pb.Feature(name="(intercept)", kind="intercept", std=1.0, coverage=1.0, importance=0.1),
            pb.Feature(name="country=de", kind="level", mean=0.4, std=0.49, coverage=0.4, importance=0.3),
        ],
        arms=[
            pb.ArmModel(
                arm_id="a",
                active=True,
                observations=10.5,
                coefficients=[
                    pb.Coefficient(feature="(intercept)", value=0.1, low=0.0, high=0.2),
                    pb.Coefficient(feature="country=de", value=0.3, low=0.1, high=0.5),
                ],
            ),
            pb.ArmModel(arm_id="b", active=False),
        ],
        contexts_seen=50,
        unknown_keys=1,
        mismatched_values=2,
        logged_decisions=40,
        targeted_mean=0.3,
        uniform_mean=0.2,
        uniform_low=0.1,
        uniform_high=0.3,
        refits=4,
        seconds_since_refit=-1.0,
    )
    report = conv.model_report(resp)
    assert report == ModelReport(
        experiment_id="e",
        policy="lin_ts",
        model_version=2,
        features=(
            Feature("(intercept)", "intercept", 0.0, 1.0, 1.0, 0.1),
            Feature("country=de", "level", 0.4, 0.49, 0.4, 0.3),
        ),
        arms=(
            ArmModel(
                "a", True, 10.5,
                (Coefficient("(intercept)", 0.1, 0.0, 0.2), Coefficient("country=de", 0.3, 0.1, 0.5)),
            ),
            ArmModel("b", False, 0.0, ()),
        ),
        contexts_seen=50,
        unknown_keys=1,
        mismatched_values=2,
        logged_decisions=40,
        targeted_mean=0.3,
        uniform_mean=0.2,
        uniform_low=0.1,
        uniform_high=0.3,
        refits=4,
        seconds_since_refit=-1.0,
    )
    assert report.arms[0].coefficient("country=de") == Coefficient("country=de", 0.3, 0.1, 0.5)
    assert report.arms[1].coefficient("country=de") is None


def test_sync_and_async_decide_with_context(server: ServerProcess) -> None:
    with Client(server.target, timeout=10.0) as c:
        c.create_experiment("ctx", arms=["a", "b"])
        d = c.decide("ctx", unit_id="u", context={"age": 31, "country": "de", "member": True})
        assert d.arm in ("a", "b") and d.model_version == 0
        with pytest.raises(InvalidArgument, match="'age' is nan"):
            c.decide("ctx", unit_id="u", context={"age": float("nan")})

    async def main() -> None:
        async with AsyncClient(server.target, timeout=10.0) as ac:
            d = await ac.decide("ctx", unit_id="u", context={"age": 2.5, "plan": "pro"})
            assert d.model_version == 0
            with pytest.raises(InvalidArgument, match="'age' is inf"):
                await ac.decide("ctx", unit_id="u", context={"age": float("inf")})
            with pytest.raises(TypeError, match="context keys must be str"):
                await ac.decide("ctx", unit_id="u", context={3: "x"})  # type: ignore[dict-item]

    asyncio.run(main())


@pytest.mark.skipif(
    not hasattr(Engine, "model_report"),
    reason="Engine.model_report is the lead's part of issue 17 and does not exist yet",
)
def test_sync_and_async_get_model_of_a_non_contextual_experiment(server: ServerProcess) -> None:
    with Client(server.target, timeout=10.0) as c:
        c.create_experiment("plain", arms=["a", "b"])
        with pytest.raises(FailedPrecondition) as err:
            c.get_model("plain")
        assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    async def main() -> None:
        async with AsyncClient(server.target, timeout=10.0) as ac:
            with pytest.raises(FailedPrecondition):
                await ac.get_model("plain")

    asyncio.run(main())
