"""Typed decision contexts at the edge (issue 17): DecideRequest's `context` (strings, older
clients) and `features` (ContextValue) become one context; bad ones are refused with
INVALID_ARGUMENT before anything is logged. And GetModel's answer for other experiments."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from banditd.engine import Engine
from banditd.service import model_report_proto
from banditd.store import DecisionRecord, Store
from banditd.validation import MAX_CONTEXT_ENTRIES, MAX_CONTEXT_KEY_BYTES, MAX_CONTEXT_VALUE_BYTES
from banditd_client import Client, ExperimentNotFound, FailedPrecondition, InvalidArgument
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc
from conftest import ServerProcess

NAN, INF = float("nan"), float("inf")


@pytest.fixture(scope="module")
def client(shared_server: ServerProcess) -> Iterator[Client]:
    with shared_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def stub(shared_server: ServerProcess) -> Iterator[pb_grpc.BanditdStub]:
    """Raw requests: what the client refuses to build (empty values, a key in both maps)."""
    with grpc.insecure_channel(shared_server.target) as ch:
        yield pb_grpc.BanditdStub(ch)


@pytest.fixture
def exp(client: Client) -> str:
    """A fresh non-contextual experiment per test: its decision count is the test's own."""
    exp_id = f"ctx-{uuid.uuid4().hex[:8]}"
    client.create_experiment(exp_id, arms=["a", "b", "c"], policy="thompson")
    return exp_id


def logged(server: ServerProcess, exp_id: str) -> list[DecisionRecord]:
    """The experiment's decision records in the store (read beside the running server)."""
    store = Store.open_readonly(server.data_dir)
    try:
        return [r for r in store.iter_decisions() if r.experiment_id == exp_id]
    finally:
        store.close()


def pulls(client: Client, exp_id: str) -> int:
    return sum(s.pulls for s in client.arm_stats(exp_id))


def settle(client: Client, exp_id: str, expected: int) -> None:
    """Decision records are written behind the response: wait until `expected` are counted."""
    deadline = time.monotonic() + 10
    while pulls(client, exp_id) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pulls(client, exp_id) == expected


def test_typed_context_is_accepted_and_logged_with_its_types(
    shared_server: ServerProcess, client: Client, stub: pb_grpc.BanditdStub, exp: str
) -> None:
    d = client.decide(exp, unit_id="u1", context={"age": 31, "score": 0.25, "country": "de", "member": True})
    assert d.model_version == 0  # not a contextual experiment
    # An older client's string map beside typed features: one context.
    raw = stub.Decide(
        pb.DecideRequest(
            experiment_id=exp,
            unit_id="u2",
            context={"country": "fr"},
            features={"age": pb.ContextValue(number=-2.5), "plan": pb.ContextValue(text="")},
        ),
        timeout=10,
    )
    assert raw.model_version == 0
    plain = client.decide(exp, unit_id="u3")
    settle(client, exp, 3)
    records = {r.decision_id: r for r in logged(shared_server, exp)}
    assert records[d.decision_id].context == {"age": 31.0, "score": 0.25, "country": "de", "member": "true"}
    age = records[d.decision_id].context["age"]  # type: ignore[index]
    assert isinstance(age, float)  # a number stays a number in the log
    assert records[raw.decision_id].context == {"country": "fr", "age": -2.5, "plan": ""}
    assert records[plain.decision_id].context is None


def test_limits_apply_to_the_merged_context(
    shared_server: ServerProcess, client: Client, stub: pb_grpc.BanditdStub, exp: str
) -> None:
    """Up to MAX_CONTEXT_ENTRIES entries across both maps, keys and text at their byte limits."""
    text = {f"s{i}": "x" for i in range(MAX_CONTEXT_ENTRIES // 2 - 1)}
    text["k" * MAX_CONTEXT_KEY_BYTES] = "\u00e9" * (MAX_CONTEXT_VALUE_BYTES // 2)  # 1,024 bytes
    numbers = {f"n{i}": float(i) for i in range(MAX_CONTEXT_ENTRIES - len(text) - 1)}
    numbers["big"] = 1.7976931348623157e308  # the largest finite double
    resp = stub.Decide(
        pb.DecideRequest(
            experiment_id=exp,
            unit_id="u",
            context=text,
            features={k: pb.ContextValue(number=v) for k, v in numbers.items()},
        ),
        timeout=10,
    )
    settle(client, exp, 1)
    (record,) = logged(shared_server, exp)
    assert record.decision_id == resp.decision_id
    assert record.context == {**text, **numbers} and len(record.context) == MAX_CONTEXT_ENTRIES


def _bad_requests(exp: str) -> list[tuple[str, pb.DecideRequest, str]]:
    cv = pb.ContextValue
    long_key = "k" * (MAX_CONTEXT_KEY_BYTES + 1)
    emoji_key = "\U0001f600" * 33  # 33 characters, 132 bytes: the limit is in bytes
    half = MAX_CONTEXT_ENTRIES // 2 + 3  # each map alone is within the limit, both together are not
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("nan", {"features": {"x": cv(number=NAN)}}, r"context value of 'x' is nan; numbers must be finite"),
        ("inf", {"features": {"x": cv(number=INF)}}, r"context value of 'x' is inf; numbers must be finite"),
        ("-inf", {"features": {"y": cv(number=-INF)}}, r"context value of 'y' is -inf; numbers must be finite"),
        (
            "key in both maps",
            {"context": {"country": "de"}, "features": {"country": cv(text="fr")}},
            r"context key 'country' is in both `context` and `features`",
        ),
        (
            "key in both maps, number",
            {"context": {"age": "31"}, "features": {"age": cv(number=31)}},
            r"'age' is in both",
        ),
        ("empty ContextValue", {"features": {"e": cv()}}, r"features\['e'\] has neither `number` nor `text` set"),
        (
            "long key in features",
            {"features": {long_key: cv(number=1)}},
            rf"context key 'kkkk.*'\.\.\. is longer than {MAX_CONTEXT_KEY_BYTES} bytes",
        ),
        ("long key in context", {"context": {long_key: "v"}}, rf"longer than {MAX_CONTEXT_KEY_BYTES} bytes"),
        ("key long in bytes", {"features": {emoji_key: cv(text="v")}}, rf"longer than {MAX_CONTEXT_KEY_BYTES} bytes"),
        (
            "long text in features",
            {"features": {"t": cv(text="x" * (MAX_CONTEXT_VALUE_BYTES + 1))}},
            rf"context value of 't' is longer than {MAX_CONTEXT_VALUE_BYTES} bytes",
        ),
        (
            "too many keys across both maps",
            {
                "context": {f"s{i}": "v" for i in range(half)},
                "features": {f"n{i}": cv(number=i) for i in range(half)},
            },
            rf"context has {2 * half} entries; at most {MAX_CONTEXT_ENTRIES} allowed",
        ),
        (
            "too many keys in features",
            {"features": {f"n{i}": cv(number=i) for i in range(MAX_CONTEXT_ENTRIES + 1)}},
            rf"context has {MAX_CONTEXT_ENTRIES + 1} entries",
        ),
    ]
    return [(label, pb.DecideRequest(experiment_id=exp, unit_id="u", **fields), msg) for label, fields, msg in cases]


def test_bad_contexts_are_refused_and_leave_no_trace(
    shared_server: ServerProcess, client: Client, stub: pb_grpc.BanditdStub, exp: str
) -> None:
    first = client.decide(exp, unit_id="before", context={"n": 1})
    settle(client, exp, 1)
    for label, request, message in _bad_requests(exp):
        with pytest.raises(grpc.RpcError) as err:
            stub.Decide(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, label
        assert re.search(message, err.value.details() or ""), (label, err.value.details())
    # Through the client too: NaN and infinities are numbers it sends as they are.
    for value in (NAN, INF, -INF):
        with pytest.raises(InvalidArgument, match="'v' is .*numbers must be finite"):
            client.decide(exp, unit_id="u", context={"v": value})
    # A decision after the refused ones: once it is counted, every earlier one would be too.
    last = client.decide(exp, unit_id="after", context={"n": 2})
    settle(client, exp, 2)
    assert {r.decision_id for r in logged(shared_server, exp)} == {first.decision_id, last.decision_id}


def test_refused_on_a_missing_experiment_too(stub: pb_grpc.BanditdStub) -> None:
    """The context is checked at the edge, before the experiment is looked up."""
    with pytest.raises(grpc.RpcError) as err:
        stub.Decide(
            pb.DecideRequest(experiment_id="no-such", features={"x": pb.ContextValue(number=NAN)}), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.skipif(
    not hasattr(Engine, "model_report"),
    reason="Engine.model_report is the lead's part of issue 17 and does not exist yet",
)
def test_get_model_of_a_non_contextual_experiment(client: Client, exp: str) -> None:
    with pytest.raises(FailedPrecondition) as err:
        client.get_model(exp)
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(ExperimentNotFound):
        client.get_model("ctx-no-such-experiment")


def test_model_report_conversion() -> None:
    """The engine's dict (ModelReport's fields, nested lists of dicts) as the message."""
    report = {
        "experiment_id": "e",
        "policy": "lin_ts",
        "model_version": 3,
        "features": [
            {"name": "(intercept)", "kind": "intercept", "mean": 0.0, "std": 1.0, "coverage": 1.0, "importance": 0.1},
            {"name": "age", "kind": "number", "mean": 30.0, "std": 5.0, "coverage": 0.9, "importance": 0.4},
        ],
        "arms": [
            {
                "arm_id": "a",
                "active": True,
                "observations": 12.5,
                "coefficients": [
                    {"feature": "(intercept)", "value": 0.2, "low": 0.1, "high": 0.3},
                    {"feature": "age", "value": -0.4, "low": -0.6, "high": -0.2},
                ],
            },
            {"arm_id": "b", "active": False, "observations": 0.0, "coefficients": []},
        ],
        "contexts_seen": 100,
        "unknown_keys": 2,
        "mismatched_values": 1,
        "logged_decisions": 80,
        "targeted_mean": 0.3,
        "uniform_mean": 0.2,
        "uniform_low": 0.15,
        "uniform_high": 0.25,
        "refits": 0,
        "seconds_since_refit": -1.0,
    }
    msg = model_report_proto(report, "e")
    assert msg.policy == "lin_ts" and msg.model_version == 3 and msg.seconds_since_refit == -1.0
    assert [f.name for f in msg.features] == ["(intercept)", "age"]
    assert [c.value for c in msg.arms[0].coefficients] == [0.2, -0.4]
    assert not msg.arms[1].active and not msg.arms[1].coefficients
    # Every scalar of ModelReport is filled from the dict: nothing is left at its default by a typo.
    scalars = {f.name for f in pb.ModelReport.DESCRIPTOR.fields} - {"features", "arms"}
    assert scalars == set(report) - {"features", "arms"}
