"""API keys and TLS: who may call what.

A key is `bd_<key id>_<secret>` (8 hex digits, then 43 URL-safe characters: 256 random bits),
shown once by `banditd keys create` and stored as its sha256 only (store.ApiKeyRecord, in the
store's `keys` database). It carries scopes and optionally an experiment-id prefix and an
expiry:

| scope    | RPCs                                                              |
|----------|-------------------------------------------------------------------|
| `decide` | Decide, Reward, RewardStream, RewardBatchStream, DecideBulk, GetAllocation, LogExposures |
| `read`   | GetExperiment, ListExperiments, GetArmStats, GetDiagnostics, GetModel, Analyse, GetAuditLog |
| `admin`  | CreateExperiment, UpdateExperiment, and everything `read` and `decide` allow |

A key with a prefix may only name experiments whose id starts with it (PERMISSION_DENIED
otherwise; ListExperiments shows only those; every message of DecideBulk and LogExposures
streams is checked). Rewards name a decision, not an experiment, so
they are checked by scope only: a decision id (48 random bits after its timestamp) is known only
to whoever got the decision, and looking its experiment up here would refuse rewards for
decisions still waiting for their group commit.

Auth is on while at least one key is not revoked (an expired key keeps it on). Each server
process re-reads the keys when the store's keys counter moved, checked by the first call at
least RELOAD_INTERVAL_S after the previous check: a key created or revoked by the CLI is in
force for every call that starts at least 1 s after its commit. Expiry is checked on every call.

The audit log names the key id behind every change (`actor`, see `actor_of`).

The health service and server reflection stay open. Keys travel as `authorization: Bearer
<key>` (or `x-api-key: <key>`): use TLS (`--tls-cert`, `--tls-key`) outside a trusted network.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from banditd.config import ServerConfig
from banditd.store import ApiKeyRecord, Store
from banditd_client.errors import ERROR_TRAILER
from banditd_client.errors import PermissionDenied as PermissionDeniedError
from banditd_client.v1 import banditd_pb2 as pb

log = logging.getLogger("banditd.auth")

SCOPES = ("decide", "read", "admin")
# What each stored scope allows.
GRANTS: dict[str, frozenset[str]] = {
    "decide": frozenset({"decide"}),
    "read": frozenset({"read"}),
    "admin": frozenset({"admin", "read", "decide"}),
}
SERVICE = pb.DESCRIPTOR.services_by_name["Banditd"]
METHOD_SCOPES: dict[str, str] = {
    "CreateExperiment": "admin",
    "UpdateExperiment": "admin",
    "GetExperiment": "read",
    "ListExperiments": "read",
    "GetArmStats": "read",
    "GetDiagnostics": "read",
    "GetModel": "read",
    "Analyse": "read",
    "GetAuditLog": "read",
    "Decide": "decide",
    "Reward": "decide",
    "RewardStream": "decide",
    "RewardBatchStream": "decide",
    "DecideBulk": "decide",
    "GetAllocation": "decide",
    "LogExposures": "decide",
}
# A Banditd RPC missing from the table (added later) needs admin until it is classified.
DEFAULT_SCOPE = "admin"
BANDITD_PREFIX = f"/{SERVICE.full_name}/"
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
RELOAD_INTERVAL_S = 1.0
KEY_TAG = "bd"
KEY_ID_BYTES = 4
SECRET_BYTES = 32
UNAUTHENTICATED = "Unauthenticated"
PERMISSION_DENIED = "PermissionDenied"
DAY_MS = 86_400_000


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(
    scopes: Iterable[str],
    *,
    prefix: str = "",
    name: str = "",
    expires_in_days: float | None = None,
    now_ms: int | None = None,
) -> tuple[str, ApiKeyRecord]:
    """A fresh key and the record to store (the key itself is never stored)."""
    scopes = tuple(sorted(set(scopes)))
    unknown = set(scopes) - set(SCOPES)
    if not scopes or unknown:
        raise ValueError(f"scopes must be a non-empty subset of {SCOPES}, got {scopes}")
    if expires_in_days is not None and not expires_in_days > 0:
        raise ValueError(f"expires_in_days must be > 0, got {expires_in_days}")
    if "\0" in prefix:
        raise ValueError("the prefix must not contain NUL")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    key_id = secrets.token_hex(KEY_ID_BYTES)
    key = f"{KEY_TAG}_{key_id}_{secrets.token_urlsafe(SECRET_BYTES)}"
    expires_ms = None if expires_in_days is None else now_ms + int(expires_in_days * DAY_MS)
    return key, ApiKeyRecord(key_id, name, digest(key), scopes, prefix, now_ms, expires_ms, None)


def key_status(rec: ApiKeyRecord, now_ms: int) -> str:
    if rec.revoked_ms is not None:
        return "revoked"
    if rec.expires_ms is not None and now_ms >= rec.expires_ms:
        return "expired"
    return "active"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller a key identifies."""

    key_id: str
    grants: frozenset[str]
    prefix: str


class Denied(Exception):
    def __init__(self, code: grpc.StatusCode, name: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.name = name
        self.message = message


def _unauthenticated(message: str) -> Denied:
    return Denied(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED, message)


def _permission_denied(message: str) -> Denied:
    return Denied(grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED, message)


def presented_key(metadata: Iterable[Any] | None) -> str | None:
    """The key of `authorization: Bearer <key>` or `x-api-key: <key>`, if any."""
    fallback = None
    for k, v in metadata or ():
        if k == "authorization":
            scheme, _, rest = v.strip().partition(" ")
            rest = rest.strip()
            if rest and scheme.lower() == "bearer":
                return rest
        elif k == "x-api-key" and v.strip():
            fallback = v.strip()
    return fallback


class _Keys:
    """One reload's view of the keys, replaced as a whole (a call uses one view throughout,
    so nothing it caches can outlive a revocation)."""

    __slots__ = ("entries", "verified", "wrapped", "enabled")

    def __init__(self, records: dict[str, ApiKeyRecord]) -> None:
        # key id -> (record, principal)
        self.entries = {
            k: (r, Principal(k, frozenset().union(*(GRANTS[s] for s in r.scopes if s in GRANTS)), r.prefix))
            for k, r in records.items()
        }
        # Keys presented and verified since this view was loaded: no sha256 on their next calls.
        self.verified: dict[str, tuple[ApiKeyRecord, Principal]] = {}
        # (key id, method) -> (handler, the handler wrapped for the key's prefix)
        self.wrapped: dict[tuple[str, str], tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}
        self.enabled = any(r.revoked_ms is None for r in records.values())


MAX_VERIFIED = 4096


class KeyRing:
    """The keys one server process checks calls against. Re-read from the store when its keys
    counter moved; the counter is read by the first call at least `interval` seconds after the
    previous read (no thread; a read is one LMDB lookup)."""

    def __init__(self, store: Store, interval: float = RELOAD_INTERVAL_S, clock: Callable[[], float] = time.time):
        self.store = store
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._version = -1
        self._next_check = 0.0
        self.view = _Keys({})
        self._logged_on: bool | None = None
        self.reload(force=True)

    @property
    def enabled(self) -> bool:
        return self.view.enabled

    def reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next_check:
            return
        with self._lock:
            if not force and now < self._next_check:
                return
            started = time.monotonic()  # before the read: what it sees is at least this new
            try:
                version = self.store.api_keys_version()
                if version != self._version:
                    self._load(version)
            except Exception:  # keep the keys we have; the next check retries
                log.exception("reading API keys failed; keeping the previous ones")
            self._next_check = started + self.interval

    def _load(self, version: int) -> None:
        records = self.store.api_keys()  # read after the counter: at least that new
        view = _Keys(records)
        active = sum(key_status(r, int(self.clock() * 1000)) == "active" for r in records.values())
        fields = {"keys": len(records), "active_keys": active}
        if not view.enabled:
            log.warning(
                "auth is off: no unrevoked API key in %s; every caller may call every RPC "
                "(create one with `banditd keys create --scope ... %s %s`)",
                self.store.location, "--store" if self.store.shared_database else "--data-dir", self.store.location,
            )
        elif self._logged_on is not True:
            log.info("auth is on", extra={"fields": fields})
        else:
            log.info("API keys reloaded", extra={"fields": fields})
        self._logged_on = view.enabled
        self.view, self._version = view, version

    def authenticate(self, metadata: Iterable[Any] | None, view: _Keys | None = None) -> Principal:
        """The caller's principal; raises Denied (UNAUTHENTICATED) for a missing, malformed,
        unknown, wrong, expired or revoked key."""
        view = view or self.view
        key = presented_key(metadata)
        if key is None:
            raise _unauthenticated(
                "this server requires an API key: send metadata `authorization: Bearer <key>` "
                "(or `x-api-key: <key>`)"
            )
        entry = view.verified.get(key)
        if entry is None:
            tag, _, rest = key.partition("_")
            key_id, _, secret = rest.partition("_")
            entry = view.entries.get(key_id) if tag == KEY_TAG and secret else None
            if entry is None or not hmac.compare_digest(digest(key), entry[0].digest):
                raise _unauthenticated("invalid API key")
            if len(view.verified) < MAX_VERIFIED:
                view.verified[key] = entry
        rec, principal = entry
        if rec.revoked_ms is not None:
            raise _unauthenticated(f"API key {rec.key_id} is revoked")
        if rec.expires_ms is not None and self.clock() * 1000 >= rec.expires_ms:
            raise _unauthenticated(f"API key {rec.key_id} has expired")
        return principal


def actor_of(keys: KeyRing | None, metadata: Iterable[Any] | None) -> str:
    """Who made a call, for the audit log: the key id, or "anonymous" while auth is off."""
    if keys is None or not keys.view.enabled:
        return "anonymous"
    try:
        return f"key:{keys.authenticate(metadata).key_id}"
    except Denied:
        return "unknown"


def _experiment_id(method: str, request: Any) -> str | None:
    """The experiment a request names (None when it names none, or could not be parsed:
    the handler refuses unparsable requests without touching anything)."""
    if method == "CreateExperiment":
        exp = getattr(request, "experiment", None)
        return None if exp is None else exp.id
    return getattr(request, "experiment_id", None)


def _parse_raw(method: str, data: bytes) -> Any:
    """The request message of a method whose handler takes bytes; None if unparsable."""
    service = pb.DESCRIPTOR.services_by_name["Banditd"]
    try:
        return getattr(pb, service.methods_by_name[method].input_type.name).FromString(data)
    except Exception:  # noqa: BLE001 - any parse failure is the caller's bytes
        return None


def _denying_handler(handler: grpc.RpcMethodHandler, denied: Denied) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that only fails the call (the request is
    never parsed)."""

    def abort(_request: Any, context: grpc.ServicerContext) -> None:
        context.set_trailing_metadata(((ERROR_TRAILER, denied.name),))
        context.abort(denied.code, denied.message)

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


def _prefix_handler(handler: grpc.RpcMethodHandler, method: str, principal: Principal) -> grpc.RpcMethodHandler:
    """Wraps a unary handler: after parsing, the request's experiment must carry the key's
    prefix; ListExperiments answers only those."""
    prefix = principal.prefix
    if handler.request_streaming:
        return _prefix_stream_handler(handler, principal)
    if handler.response_streaming or handler.unary_unary is None:
        return handler
    inner = handler.unary_unary

    if method == "ListExperiments":

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            resp = inner(request, context)
            if resp is not None and hasattr(resp, "experiments"):
                kept = [e for e in resp.experiments if e.id.startswith(prefix)]
                del resp.experiments[:]
                resp.experiments.extend(kept)
            return resp

    else:

        def behavior(request: Any, context: grpc.ServicerContext) -> Any:
            if type(request) is bytes:  # a handler that parses its request (Decide): parse here
                request = _parse_raw(method, request)
                if request is None:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the {method} request could not be decoded")
            exp = _experiment_id(method, request)
            if exp is not None and not exp.startswith(prefix):
                context.set_trailing_metadata(((ERROR_TRAILER, PERMISSION_DENIED),))
                context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"API key {principal.key_id} may only use experiments whose id starts with {prefix!r}, "
                    f"not {exp!r}",
                )
            return inner(request, context)

    return grpc.unary_unary_rpc_method_handler(
        behavior,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _prefix_stream_handler(handler: grpc.RpcMethodHandler, principal: Principal) -> grpc.RpcMethodHandler:
    """Client streams whose messages name an experiment (DecideBulk, LogExposures): every
    message is checked against the key's prefix. Reward streams name decisions only: scope
    only (module doc)."""
    prefix = principal.prefix

    def checked(requests: Iterator[Any]) -> Iterator[Any]:
        for req in requests:
            exp = getattr(req, "experiment_id", "")
            if exp and not exp.startswith(prefix):
                # Raised inside the handler's loop: its error mapping gives the status and trailer.
                raise PermissionDeniedError(
                    f"API key {principal.key_id} may only use experiments whose id starts with {prefix!r}, "
                    f"not {exp!r}"
                )
            yield req

    inner = handler.stream_stream if handler.response_streaming else handler.stream_unary
    make = (
        grpc.stream_stream_rpc_method_handler if handler.response_streaming else grpc.stream_unary_rpc_method_handler
    )

    def behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
        return inner(checked(requests), context)

    return make(
        behavior, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
    )


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks every call's API key and scope (see the module doc); a denied call gets a
    handler that aborts with UNAUTHENTICATED or PERMISSION_DENIED and the `banditd-error`
    trailer naming the client's exception class."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method_path: str = handler_call_details.method
        if method_path.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        self.keys.reload()
        view = self.keys.view
        if not view.enabled:
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED
        method = method_path[len(BANDITD_PREFIX) :] if method_path.startswith(BANDITD_PREFIX) else method_path
        try:
            principal = self.keys.authenticate(handler_call_details.invocation_metadata, view)
            needed = METHOD_SCOPES.get(method, DEFAULT_SCOPE)
            if needed not in principal.grants:
                raise _permission_denied(
                    f"API key {principal.key_id} lacks the {needed!r} scope that {method} needs "
                    f"(it has {sorted(principal.grants)})"
                )
        except Denied as denied:
            return _denying_handler(handler, denied)
        if not principal.prefix:
            return handler
        cached = view.wrapped.get((principal.key_id, method))
        if cached is None or cached[0] is not handler:
            cached = view.wrapped[(principal.key_id, method)] = (handler, _prefix_handler(handler, method, principal))
        return cached[1]


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (and --tls-client-ca: client certificates are
    then required and verified); None for plaintext."""
    if not config.tls_cert:
        return None

    def read(path: str, what: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise SystemExit(f"cannot read the {what} {path}: {exc.strerror}") from None

    cert = read(config.tls_cert, "TLS certificate (--tls-cert)")
    key = read(config.tls_key, "TLS key (--tls-key)")
    ca = read(config.tls_client_ca, "client CA (--tls-client-ca)") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
