"""The one exception hierarchy of banditd, shared by the server and the client.

Each class names what went wrong and carries the gRPC status code it maps to. The server
raises these and sends the class name in the `banditd-error` trailer; the client turns a
failed call back into the same class, with the server's message.
"""

from __future__ import annotations

import grpc

ERROR_TRAILER = "banditd-error"


class BanditdError(Exception):
    """Base of every banditd error."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BanditdError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BanditdError):
    code = grpc.StatusCode.NOT_FOUND


class ExperimentNotFound(NotFound):
    pass


class ArmNotFound(NotFound):
    pass


class DecisionNotFound(NotFound):
    pass


class AlreadyExists(BanditdError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ExperimentAlreadyExists(AlreadyExists):
    pass


class FailedPrecondition(BanditdError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ExperimentPaused(FailedPrecondition):
    pass


class OutsideAttributionWindow(FailedPrecondition):
    pass


class ResourceExhausted(BanditdError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(BanditdError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BanditdError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Internal(BanditdError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(BanditdError):
    """No API key, or a wrong, expired or revoked one."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BanditdError):
    """The API key lacks the scope the call needs, or the experiment is outside its prefix."""

    code = grpc.StatusCode.PERMISSION_DENIED


def _all_subclasses(cls: type[BanditdError]) -> list[type[BanditdError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


ERRORS_BY_NAME: dict[str, type[BanditdError]] = {c.__name__: c for c in _all_subclasses(BanditdError)}
# The most general class for each status code, used when the trailer is missing.
ERRORS_BY_CODE: dict[grpc.StatusCode, type[BanditdError]] = {}
for _cls in _all_subclasses(BanditdError):
    ERRORS_BY_CODE.setdefault(_cls.code, _cls)


def from_rpc_error(err: grpc.RpcError) -> BanditdError:
    """Turns a failed call into the matching BanditdError subclass."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = (err.details() if hasattr(err, "details") else None) or str(err)
    name = None
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == ERROR_TRAILER:
            name = value
    cls = ERRORS_BY_NAME.get(name or "") or ERRORS_BY_CODE.get(code, BanditdError)
    exc = cls(details)
    exc.code = code
    return exc
