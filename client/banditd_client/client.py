"""Synchronous client. Every call has a deadline; failures raise BanditdError subclasses."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from banditd_client import _convert as conv
from banditd_client._channel import Pem, connect
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

if TYPE_CHECKING:
    from banditd_client.local import LocalAssigner

T = TypeVar("T")
DEFAULT_TIMEOUT = 5.0
# Bulk ingestion may take longer than one decision.
STREAM_TIMEOUT = 300.0


class Client:
    """Talks to a banditd server.

    >>> c = Client("localhost:50051")
    >>> d = c.decide("subject-lines", unit_id="u-17")
    >>> c.reward(d.decision_id, 1.0)

    `api_key` (default: $BANDITD_API_KEY) is sent with every call. TLS: `tls=True` verifies
    the server with the system's roots, `root_certificates` (PEM bytes or a file path) with
    those; `client_cert` and `client_key` (PEM bytes or paths) add a client certificate (mTLS).
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        channel: grpc.Channel | None = None,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: Pem | None = None,
        client_cert: Pem | None = None,
        client_key: Pem | None = None,
    ) -> None:
        self._channel, self._metadata = connect(
            grpc, target, channel, api_key=api_key, tls=tls, root_certificates=root_certificates,
            client_cert=client_cert, client_key=client_key,
        )
        self._stub = pb_grpc.BanditdStub(self._channel)
        self.timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def create_experiment(
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
        return conv.experiment(self._call(self._stub.CreateExperiment, req, timeout))

    def get_experiment(self, experiment_id: str, *, timeout: float | None = None) -> ExperimentInfo:
        req = pb.GetExperimentRequest(experiment_id=experiment_id)
        return conv.experiment(self._call(self._stub.GetExperiment, req, timeout))

    def list_experiments(self, *, timeout: float | None = None) -> list[ExperimentInfo]:
        resp = self._call(self._stub.ListExperiments, pb.ListExperimentsRequest(), timeout)
        return [conv.experiment(e) for e in resp.experiments]

    def update_experiment(
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
        return conv.experiment(self._call(self._stub.UpdateExperiment, req, timeout))

    def pause(self, experiment_id: str) -> ExperimentInfo:
        return self.update_experiment(experiment_id, state="paused")

    def resume(self, experiment_id: str) -> ExperimentInfo:
        return self.update_experiment(experiment_id, state="running")

    def decide(
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
        return conv.decision(self._call(self._stub.Decide, req, timeout))

    def reward(
        self,
        decision_id: str,
        value: float,
        *,
        event_id: str = "",
        arm: str = "",
        timeout: float | None = None,
    ) -> bool:
        """Reports a reward; returns False when the event was already counted."""
        req = pb.RewardRequest(decision_id=decision_id, value=float(value), event_id=event_id, arm_id=arm)
        return self._call(self._stub.Reward, req, timeout).accepted

    def reward_many(
        self, items: Iterable[conv.RewardItem], *, timeout: float | None = None
    ) -> RewardCounts:
        """Streams (decision_id, value[, event_id]) items in batches; returns accepted/duplicate/rejected."""
        batches = conv.reward_batches(items)
        resp = self._call(self._stub.RewardBatchStream, batches, timeout or STREAM_TIMEOUT)
        return conv.reward_counts(resp)

    def arm_stats(self, experiment_id: str, *, timeout: float | None = None) -> list[ArmStat]:
        req = pb.GetArmStatsRequest(experiment_id=experiment_id)
        return conv.arm_stats(self._call(self._stub.GetArmStats, req, timeout))

    def diagnostics(
        self, experiment_id: str, *, reward_silence_seconds: float = 0.0, timeout: float | None = None
    ) -> Diagnostics:
        """Learning-loop diagnostics: drift, rise share, traffic concentration, alarms."""
        req = pb.GetDiagnosticsRequest(experiment_id=experiment_id, reward_silence_seconds=reward_silence_seconds)
        return conv.diagnostics(self._call(self._stub.GetDiagnostics, req, timeout))

    def get_model(self, experiment_id: str, *, timeout: float | None = None) -> ModelReport:
        """A contextual experiment's model: feature definition, per-arm coefficients with 95%
        intervals, feature importance, targeted versus uniform reward. FailedPrecondition for
        an experiment without a contextual policy."""
        req = pb.GetModelRequest(experiment_id=experiment_id)
        return conv.model_report(self._call(self._stub.GetModel, req, timeout))

    def analyse(self, experiment_id: str, *, draws: int = 0, timeout: float | None = None) -> Analysis:
        """Winner analysis (P(best), expected loss, uplift intervals) and the ship / iterate /
        kill verdict of the experiment's stop criteria."""
        req = pb.AnalyseRequest(experiment_id=experiment_id, draws=draws)
        return conv.analysis(self._call(self._stub.Analyse, req, timeout))

    def audit_log(
        self, experiment_id: str = "", *, limit: int = 100, timeout: float | None = None
    ) -> list[AuditEntry]:
        """Changes to the experiment (every experiment when empty), newest first."""
        req = pb.GetAuditLogRequest(experiment_id=experiment_id, limit=limit)
        return conv.audit_log(self._call(self._stub.GetAuditLog, req, timeout))

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
    ) -> Iterator[BulkBatch]:
        """Decides for many units over one DecideBulk stream (campaign sends): yields one
        `BulkBatch` per `batch_size` units, in order, each once its decisions are durable.

        `unit_ids` (and `contexts`, one per unit when given) are pulled lazily, batch by
        batch, and at most `max_in_flight` batches are sent ahead of their answers: a stream
        of millions of units never holds them all. Every decision is logged and rewardable
        like a single decide (`batch.decision_id(i)`). A rejected unit (bad unit id) is in
        `batch.rejected` and the others are decided; a bad batch (unknown or paused
        experiment) ends the stream with its error. `timeout` bounds the whole stream
        (default 300 s). An error raised by the iterables (a bad context value) is raised
        after the batches already sent are answered. Stopping the iteration early cancels the
        stream (batches already decided stay logged)."""
        conv.check_bulk_args(k, batch_size, max_in_flight)
        return self._decide_bulk(experiment_id, unit_ids, k, contexts, batch_size, max_in_flight, timeout)

    def _decide_bulk(
        self,
        experiment_id: str,
        unit_ids: Iterable[str],
        k: int,
        contexts: Iterable[conv.Context | None] | None,
        batch_size: int,
        max_in_flight: int,
        timeout: float | None,
    ) -> Iterator[BulkBatch]:
        stream = conv.BulkStream()
        window = threading.Semaphore(max_in_flight)
        done = threading.Event()

        def requests() -> Iterator[pb.DecideBulkRequest]:
            # Runs in grpc's sending thread: waits for a free slot, gives up once the caller stopped.
            try:
                for first, units, req in conv.bulk_requests(experiment_id, unit_ids, k, contexts, batch_size):
                    while not window.acquire(timeout=0.2):
                        if done.is_set():
                            return
                    if done.is_set():
                        return
                    stream.sent(first, units)
                    yield req
            except Exception as exc:  # noqa: BLE001 - raised to the caller after the answers
                stream.error = exc

        call = self._stub.DecideBulk(requests(), timeout=timeout or STREAM_TIMEOUT, metadata=self._metadata)
        try:
            for resp in call:
                window.release()
                yield stream.answered(resp)
        except grpc.RpcError as err:
            if stream.error is not None:
                raise stream.error from None
            raise from_rpc_error(err) from None
        finally:
            done.set()
            call.cancel()
        if stream.error is not None:
            raise stream.error

    def get_allocation(self, experiment_id: str, *, timeout: float | None = None) -> Allocation:
        """The experiment's current allocation snapshot, for assignment in the SDK (see
        `local_assigner`). FailedPrecondition for contextual experiments, ExperimentPaused
        while paused."""
        req = pb.GetAllocationRequest(experiment_id=experiment_id)
        return conv.allocation(self._call(self._stub.GetAllocation, req, timeout))

    def log_exposures(
        self,
        experiment_id: str,
        exposures: Iterable[conv.ExposureLike],
        *,
        batch_size: int = conv.EXPOSURE_BATCH,
        timeout: float | None = None,
    ) -> RewardCounts:
        """Logs units assigned in the SDK from a snapshot: (decision_id, unit_id, arm_id,
        allocation_version[, ts_unix_ms]) items (`ExposureItem`), streamed in batches of
        `batch_size` (at most 10,000). The decision id is the idempotency key: a resent
        exposure counts as a duplicate. Returns accepted / duplicate / rejected with the
        first rejections. An error raised by `exposures` is raised after the batches already
        sent are counted."""
        requests = conv.Capture(conv.exposure_batches(experiment_id, exposures, batch_size))
        try:
            resp = self._call(self._stub.LogExposures, iter(requests), timeout or STREAM_TIMEOUT)
        except Exception:
            if requests.error is not None:
                raise requests.error from None
            raise
        if requests.error is not None:
            raise requests.error
        return conv.reward_counts(resp)

    def local_assigner(self, experiment_id: str, **kwargs: Any) -> LocalAssigner:
        """A `LocalAssigner` for the experiment on this client (keyword arguments: ttl_seconds,
        flush_every_s, flush_size): assignment in the SDK from an allocation snapshot, with no
        RPC per unit. Sync client only. Close it (or use it as a context manager) before the
        client."""
        from banditd_client.local import LocalAssigner

        return LocalAssigner(self, experiment_id, **kwargs)
