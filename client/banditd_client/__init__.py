"""Python client for banditd: `from banditd_client import Client, AsyncClient`."""

from banditd_client.aio import AsyncClient
from banditd_client.client import Client
from banditd_client.errors import (
    AlreadyExists,
    ArmNotFound,
    BanditdError,
    DecisionNotFound,
    ExperimentAlreadyExists,
    ExperimentNotFound,
    ExperimentPaused,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    OutsideAttributionWindow,
    ResourceExhausted,
    Unavailable,
)
from banditd_client.types import (
    Alarm,
    ArmDiagnostics,
    ArmInfo,
    ArmStat,
    ChosenArm,
    Decision,
    Diagnostics,
    ExperimentInfo,
    RewardCounts,
)

__all__ = [
    "Alarm",
    "ArmDiagnostics",
    "Diagnostics",
    "AlreadyExists",
    "ArmInfo",
    "ArmNotFound",
    "ArmStat",
    "AsyncClient",
    "BanditdError",
    "ChosenArm",
    "Client",
    "Decision",
    "DecisionNotFound",
    "ExperimentAlreadyExists",
    "ExperimentInfo",
    "ExperimentNotFound",
    "ExperimentPaused",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "OutsideAttributionWindow",
    "ResourceExhausted",
    "RewardCounts",
    "Unavailable",
]
