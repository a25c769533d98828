"""Server side of the error hierarchy: the classes live in banditd_client.errors (one
hierarchy for server and client); this module maps them to gRPC statuses in one place."""

from __future__ import annotations

import functools
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from banditd import _core
from banditd_client.errors import (
    ERROR_TRAILER,
    AlreadyExists,
    ArmNotFound,
    BanditdError,
    DeadlineExceeded,
    DecisionNotFound,
    ExperimentAlreadyExists,
    ExperimentNotFound,
    ExperimentPaused,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutsideAttributionWindow,
    ResourceExhausted,
    Unavailable,
)

__all__ = [
    "AlreadyExists",
    "ArmNotFound",
    "BanditdError",
    "DeadlineExceeded",
    "DecisionNotFound",
    "ExperimentAlreadyExists",
    "ExperimentNotFound",
    "ExperimentPaused",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "OutsideAttributionWindow",
    "ResourceExhausted",
    "Unavailable",
    "map_errors",
]

log = logging.getLogger("banditd")
F = TypeVar("F", bound=Callable[..., Any])


def database_error(exc: BaseException) -> BanditdError | None:
    """The status of a PostgreSQL store's failure (banditd.pgkv), None for anything else: an
    unreachable or restarting database is UNAVAILABLE (retry), not a bug in banditd."""
    pgkv = sys.modules.get("banditd.pgkv")  # loaded only with a PostgreSQL store
    if pgkv is None:
        return None
    if isinstance(exc, pgkv.Unavailable):
        return Unavailable(f"the database cannot be reached; retry ({exc})")
    if isinstance(exc, pgkv.StorageError):
        return ResourceExhausted(f"the database refused the write; nothing was written ({exc})")
    return None


def _abort(context: grpc.ServicerContext, exc: BaseException) -> None:
    if isinstance(exc, _core.CoreError):
        # The Rust core refuses bad input before changing anything: the caller's fault.
        exc = InvalidArgument(str(exc))
    exc = database_error(exc) or exc
    if isinstance(exc, BanditdError):
        context.set_trailing_metadata(((ERROR_TRAILER, type(exc).__name__),))
        context.abort(exc.code, exc.message)
    log.exception("unexpected error in handler")
    context.set_trailing_metadata(((ERROR_TRAILER, "Internal"),))
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def map_errors(method: F) -> F:
    """Wraps a servicer method so a BanditdError becomes its gRPC status with the message."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            if type(request).__name__ == "Undecodable":  # (hasattr on a protobuf message costs µs)
                raise InvalidArgument(f"the request could not be decoded: {request.error}")
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            if not context.is_active():
                # Cancelled (an idle stream, a client gone): nobody waits for an answer.
                context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
            _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def map_stream_errors(method: F) -> F:
    """map_errors for a response-streaming method (a generator): errors raised while the
    responses are produced become the stream's status."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            yield from method(self, request, context)
        except Exception as exc:  # noqa: BLE001 - every failure must become a status
            if not context.is_active():
                context.abort(grpc.StatusCode.CANCELLED, "the call was cancelled")
            _abort(context, exc)

    return wrapper  # type: ignore[return-value]


def map_all_errors(cls: type) -> type:
    """Applies map_errors (map_stream_errors to generators) to every public RPC method of a
    servicer class."""
    for name, fn in list(vars(cls).items()):
        if name[0].isupper() and inspect.isfunction(fn):
            setattr(cls, name, (map_stream_errors if inspect.isgeneratorfunction(fn) else map_errors)(fn))
    return cls
