"""Channel and credentials options, shared by the sync and async clients (one definition)."""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

# PEM given as bytes, or as the path of a PEM file.
Pem = bytes | str | os.PathLike[str]
API_KEY_ENV = "BANDITD_API_KEY"


def _pem(value: Pem | None, what: str) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {what} from {os.fspath(value)!r}: {exc.strerror}") from None


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """Metadata sent with every call: the API key (argument, else $BANDITD_API_KEY) as
    `authorization: Bearer <key>`; None without a key."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    if key is None:
        return None
    key = key.strip()
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        raise ValueError("api_key must be a non-empty string without spaces or control characters")
    return (("authorization", f"Bearer {key}"),)


def open_channel(
    grpc_module: ModuleType,
    target: str,
    *,
    tls: bool = False,
    root_certificates: Pem | None = None,
    client_cert: Pem | None = None,
    client_key: Pem | None = None,
    options: list[tuple[str, Any]] | None = None,
) -> Any:
    """`grpc_module` is `grpc` or `grpc.aio` (same factory names). TLS is on with `tls=True`
    or any certificate argument; without `root_certificates` the system's roots verify the
    server. `client_cert` with `client_key`: mutual TLS."""
    import grpc

    if (client_cert is None) != (client_key is None):
        raise ValueError("client_cert and client_key go together")
    if not (tls or root_certificates is not None or client_cert is not None):
        return grpc_module.insecure_channel(target, options=options)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_pem(root_certificates, "root_certificates"),
        private_key=_pem(client_key, "client_key"),
        certificate_chain=_pem(client_cert, "client_cert"),
    )
    return grpc_module.secure_channel(target, creds, options=options)


def connect(
    grpc_module: ModuleType,
    target: str,
    channel: Any,
    *,
    api_key: str | None,
    tls: bool,
    root_certificates: Pem | None,
    client_cert: Pem | None,
    client_key: Pem | None,
) -> tuple[Any, tuple[tuple[str, str], ...] | None]:
    """(channel, metadata for every call): what Client and AsyncClient are built on."""
    metadata = call_metadata(api_key)
    if channel is not None:
        if tls or root_certificates is not None or client_cert is not None or client_key is not None:
            raise ValueError("pass TLS options or a ready channel, not both")
        return channel, metadata
    return open_channel(
        grpc_module, target, tls=tls, root_certificates=root_certificates, client_cert=client_cert,
        client_key=client_key,
    ), metadata  # fmt: skip
