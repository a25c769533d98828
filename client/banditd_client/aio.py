"""Asynchronous twin of Client, on grpc.aio."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
import grpc.aio

from banditd_client import _convert as conv
from banditd_client._channel import Pem, connect
from banditd_client.client import DEFAULT_TIMEOUT, STREAM_TIMEOUT
from banditd_client.errors import from_rpc_error
from banditd_client.types import (
    Allocation,
    Analysis,
    ArmStat,
    AuditEntry,
    BulkBatch,
    Decision,
    Diagnostics,
    ExperimentInfo,
    ModelReport,
    RewardCounts,
)
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc

T = TypeVar("T")


class AsyncClient:
    """`async with AsyncClient("localhost:50051") as c: d = await c.decide(...)`

    Same options as Client: `api_key` (default: $BANDITD_API_KEY), `tls`,
    `root_certificates`, `client_cert`, `client_key`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.aio.Channel | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
    ) -> None:
        self._channel, self._metadata = connect(
            grpc.aio, target, channel, api_key=api_key, tls=tls, root_certificates=root_certificates,
            client_cert=client_cert, client_key=client_key,
        )
        self._stub = pb_grpc.BanditdStub(self._channel)
        self.timeout = timeout

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any, timeout: float | None) -> T:
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def create_experiment(
        self,
        experiment_id: str,
        arms: Iterable[conv.ArmSpec],
        policy: str = "thompson",
        *,
        reward_type: str = "binary",
        sticky: bool = False,
        attribution_window_seconds: int = 0,
        prior: Sequence[float] | None = None,
        outcomes: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **policy_params: float,
    ) -> ExperimentInfo:
        """`outcomes`: {"mode": "decision" (default: a decision without reward counts as
        default_reward, 0) | "explicit", "aggregation", "default_reward", "min_age_seconds"}.
        `policy_params`: the Policy message's numbers (`_convert.POLICY_PARAMS`), e.g.
        epsilon=0.1; contextual policies (lin_ucb, lin_ts, logistic_ucb, logistic_ts) take
        alpha, ridge, exploration_floor, refit_seconds, encoder_warmup, encoder_refit_seconds.
        `settings`: control arm, stop criteria, control_share, traffic floors, burn_in and
        guardrails (shape in `_convert.settings_proto`)."""
        req = conv.create_request(
            experiment_id, arms, policy, reward_type, sticky, attribution_window_seconds, prior,
            policy_params, outcomes, settings,
        )
        return conv.experiment(await self._call(self._stub.CreateExperiment, req, timeout))

    async def get_experiment(self, experiment_id: str, *, timeout: float | None = None) -> ExperimentInfo:
        req = pb.GetExperimentRequest(experiment_id=experiment_id)
        return conv.experiment(await self._call(self._stub.GetExperiment, req, timeout))

    async def list_experiments(self, *, timeout: float | None = None) -> list[ExperimentInfo]:
        resp = await self._call(self._stub.ListExperiments, pb.ListExperimentsRequest(), timeout)
        return [conv.experiment(e) for e in resp.experiments]

    async def update_experiment(
        self,
        experiment_id: str,
        *,
        add_arms: Iterable[conv.ArmSpec] = (),
        retire_arms: Iterable[str] = (),
        state: str | None = None,
        settings: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ExperimentInfo:
        """`settings` replaces the experiment's settings as a whole (None leaves them)."""
        req = conv.update_request(experiment_id, add_arms, retire_arms, state, settings)
        return conv.experiment(await self._call(self._stub.UpdateExperiment, req, timeout))

    async def decide(
        self,
        experiment_id: str,
        unit_id: str = "",
        *,
        k: int | None = None,
        context: conv.Context | None = None,
        allocation_version: int = 0,
        timeout: float | None = None,
    ) -> Decision:
        """`k` arms (a slate; default 1). `context`: {key: str | int | float}. Strings are
        categories, numbers (int, float, numpy scalars) are used as numbers; a bool is sent as
        the text "true" / "false" (a category, not 1 / 0). Another key or value type raises
        TypeError before anything is sent. Contextual experiments learn from it; the others
        log it with the decision.

        `allocation_version` (an `Allocation.version`): the server assigns the unit from that
        snapshot by the SDK's hash rule (one arm, no context), as `LocalAssigner` would."""
        req = conv.decide_request(experiment_id, unit_id, k, context, allocation_version)
        return conv.decision(await self._call(self._stub.Decide, req, timeout))

    async def reward(
        self,
        decision_id: str,
        value: float,
        *,
        event_id: str = "",
        arm: str = "",
        timeout: float | None = None,
    ) -> bool:
        req = pb.RewardRequest(decision_id=decision_id, value=float(value), event_id=event_id, arm_id=arm)
        return (await self._call(self._stub.Reward, req, timeout)).accepted

    async def reward_many(
        self,
        items: Iterable[conv.RewardItem] | AsyncIterable[conv.RewardItem],
        *,
        timeout: float | None = None,
    ) -> RewardCounts:
        async def requests() -> AsyncIterable[pb.RewardRequest]:
            if isinstance(items, AsyncIterable):
                async for item in items:
                    yield conv.reward_request(item)
            else:
                for item in items:
                    yield conv.reward_request(item)

        resp = await self._call(self._stub.RewardStream, requests(), timeout or STREAM_TIMEOUT)
        return conv.reward_counts(resp)

    async def arm_stats(self, experiment_id: str, *, timeout: float | None = None) -> list[ArmStat]:
        req = pb.GetArmStatsRequest(experiment_id=experiment_id)
        return conv.arm_stats(await self._call(self._stub.GetArmStats, req, timeout))

    async def diagnostics(
        self, experiment_id: str, *, reward_silence_seconds: float = 0.0, timeout: float | None = None
    ) -> Diagnostics:
        """Learning-loop diagnostics: drift, rise share, traffic concentration, alarms."""
        req = pb.GetDiagnosticsRequest(experiment_id=experiment_id, reward_silence_seconds=reward_silence_seconds)
        return conv.diagnostics(await self._call(self._stub.GetDiagnostics, req, timeout))

    async def get_model(self, experiment_id: str, *, timeout: float | None = None) -> ModelReport:
        """A contextual experiment's model: feature definition, per-arm coefficients with 95%
        intervals, feature importance, targeted versus uniform reward. FailedPrecondition for
        an experiment without a contextual policy."""
        req = pb.GetModelRequest(experiment_id=experiment_id)
        return conv.model_report(await self._call(self._stub.GetModel, req, timeout))

    async def analyse(self, experiment_id: str, *, draws: int = 0, timeout: float | None = None) -> Analysis:
        """Winner analysis (P(best), expected loss, uplift intervals) and the ship / iterate /
        kill verdict of the experiment's stop criteria."""
        req = pb.AnalyseRequest(experiment_id=experiment_id, draws=draws)
        return conv.analysis(await self._call(self._stub.Analyse, req, timeout))

    async def audit_log(
        self, experiment_id: str = "", *, limit: int = 100, timeout: float | None = None
    ) -> list[AuditEntry]:
        """Changes to the experiment (every experiment when empty), newest first."""
        req = pb.GetAuditLogRequest(experiment_id=experiment_id, limit=limit)
        return conv.audit_log(await self._call(self._stub.GetAuditLog, req, timeout))

    def decide_bulk(
        self,
        experiment_id: str,
        unit_ids: Iterable[str],
        *,
        k: int = 1,
        contexts: Iterable[conv.Context | None] | None = None,
        batch_size: int = conv.BULK_BATCH,
        max_in_flight: int = conv.BULK_IN_FLIGHT,
        timeout: float | None = None,
    ) -> AsyncIterator[BulkBatch]:
        """`async for batch in c.decide_bulk(exp, units): ...` — Client.decide_bulk's twin
        (same arguments and semantics). To stop early and cancel the stream at once, close the
        iterator (`contextlib.aclosing`)."""
        conv.check_bulk_args(k, batch_size, max_in_flight)
        return self._decide_bulk(experiment_id, unit_ids, k, contexts, batch_size, max_in_flight, timeout)

    async def _decide_bulk(
        self,
        experiment_id: str,
        unit_ids: Iterable[str],
        k: int,
        contexts: Iterable[conv.Context | None] | None,
        batch_size: int,
        max_in_flight: int,
        timeout: float | None,
    ) -> AsyncIterator[BulkBatch]:
        stream = conv.BulkStream()
        window = asyncio.Semaphore(max_in_flight)

        async def requests() -> AsyncIterator[pb.DecideBulkRequest]:
            try:
                for first, units, req in conv.bulk_requests(experiment_id, unit_ids, k, contexts, batch_size):
                    await window.acquire()
                    stream.sent(first, units)
                    yield req
            except Exception as exc:  # noqa: BLE001 - raised to the caller after the answers
                stream.error = exc

        call = self._stub.DecideBulk(requests(), timeout=timeout or STREAM_TIMEOUT, metadata=self._metadata)
        try:
            async for resp in call:
                window.release()
                yield stream.answered(resp)
        except grpc.RpcError as err:
            if stream.error is not None:
                raise stream.error from None
            raise from_rpc_error(err) from None
        finally:
            call.cancel()
        if stream.error is not None:
            raise stream.error

    async def get_allocation(self, experiment_id: str, *, timeout: float | None = None) -> Allocation:
        """The experiment's current allocation snapshot (see Client.get_allocation)."""
        req = pb.GetAllocationRequest(experiment_id=experiment_id)
        return conv.allocation(await self._call(self._stub.GetAllocation, req, timeout))

    async def log_exposures(
        self,
        experiment_id: str,
        exposures: Iterable[conv.ExposureLike],
        *,
        batch_size: int = conv.EXPOSURE_BATCH,
        timeout: float | None = None,
    ) -> RewardCounts:
        """Logs units assigned in the SDK from a snapshot (see Client.log_exposures)."""
        requests = conv.Capture(conv.exposure_batches(experiment_id, exposures, batch_size))
        try:
            resp = await self._call(self._stub.LogExposures, iter(requests), timeout or STREAM_TIMEOUT)
        except Exception:
            if requests.error is not None:
                raise requests.error from None
            raise
        if requests.error is not None:
            raise requests.error
        return conv.reward_counts(resp)
