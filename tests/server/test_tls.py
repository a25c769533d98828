"""TLS and mutual TLS: certificates made at test time with the openssl command line (a CA, a
server certificate for 127.0.0.1 and localhost, client certificates from that CA and from
another one)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from banditd import cli
from banditd.config import ServerConfig, add_serve_args, from_args
from banditd.pool import member_command
from banditd_client import AsyncClient, BanditdError, Client, Unauthenticated
from conftest import FAST_RECONNECT, ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        d, "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, ext: str, serial: int) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(d, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
    _openssl(
        d, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", str(serial), "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext",
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _leaf(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n", 2)
    _leaf(d, "client", "ca", "extendedKeyUsage=clientAuth\n", 3)
    _leaf(d, "rogue", "other-ca", "extendedKeyUsage=clientAuth\n", 4)
    return d


class TlsServer(ServerProcess):
    """conftest's ServerProcess, health-checked over TLS (with a client certificate when the
    server wants one)."""

    def __init__(self, data_dir: Path, certs: Path, mtls: bool = False, extra: tuple[str, ...] = ()) -> None:
        tls = ("--tls-cert", str(certs / "server.pem"), "--tls-key", str(certs / "server.key"))
        if mtls:
            tls += ("--tls-client-ca", str(certs / "ca.pem"))
        super().__init__(data_dir, (*tls, *extra))
        self.certs = certs
        self.mtls = mtls

    def credentials(self) -> grpc.ChannelCredentials:
        c = self.certs
        if not self.mtls:
            return grpc.ssl_channel_credentials((c / "ca.pem").read_bytes())
        return grpc.ssl_channel_credentials(
            (c / "ca.pem").read_bytes(), (c / "client.key").read_bytes(), (c / "client.pem").read_bytes()
        )

    def start(self, timeout: float = 20.0) -> None:
        cmd = [
            sys.executable, "-m", "banditd", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--data-dir", str(self.data_dir), "--workers", "1", *self.extra_args,
        ]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + timeout
        with grpc.secure_channel(self.target, self.credentials(), options=FAST_RECONNECT) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
                try:
                    stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=0.5)
                    return
                except grpc.RpcError:
                    time.sleep(0.05)
        raise RuntimeError(f"server did not become healthy: {self.log_path.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def tls_server(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TlsServer, str]]:
    """TLS (no client certificates) with API keys on."""
    data = tmp_path_factory.mktemp("tls") / "data"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(["keys", "create", "--scope", "admin", "--data-dir", str(data)]) == 0
    key = out.getvalue().strip()
    srv = TlsServer(data, certs)
    srv.start()
    yield srv, key
    srv.kill()


@pytest.fixture(scope="module")
def mtls_server(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    srv = TlsServer(tmp_path_factory.mktemp("mtls") / "data", certs, mtls=True)
    srv.start()
    yield srv
    srv.kill()


def _refused(client: Client) -> BanditdError:
    with pytest.raises(BanditdError) as err:
        client.list_experiments(timeout=3.0)
    assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return err.value


def test_tls_with_api_key(tls_server: tuple[TlsServer, str], certs: Path) -> None:
    srv, key = tls_server
    ca_path, ca_bytes = certs / "ca.pem", (certs / "ca.pem").read_bytes()
    with Client(srv.target, api_key=key, root_certificates=ca_path, timeout=10.0) as c:  # a path
        c.create_experiment("tls", arms=["a", "b"])
        d = c.decide("tls", unit_id="u")
        assert c.reward(d.decision_id, 1.0) is True

    async def over_async() -> None:
        async with AsyncClient(srv.target, api_key=key, root_certificates=ca_bytes, timeout=10.0) as ac:  # bytes
            assert (await ac.decide("tls", unit_id="v")).arms

    asyncio.run(over_async())
    # Key auth over TLS: the channel is fine, the key is still required.
    with Client(srv.target, root_certificates=ca_bytes, timeout=10.0) as c:
        with pytest.raises(Unauthenticated):
            c.decide("tls", unit_id="u")
    with Client(srv.target, api_key=key, timeout=10.0) as plaintext:  # TLS-only port
        _refused(plaintext)
    with Client(srv.target, api_key=key, tls=True, timeout=10.0) as system_roots:  # our CA is not among them
        _refused(system_roots)


def test_mtls_requires_a_client_certificate_from_the_ca(mtls_server: TlsServer, certs: Path) -> None:
    t, ca = mtls_server.target, certs / "ca.pem"
    with Client(t, root_certificates=ca, timeout=10.0) as no_cert:
        _refused(no_cert)
    with Client(t, root_certificates=ca, client_cert=certs / "rogue.pem", client_key=certs / "rogue.key") as rogue:
        _refused(rogue)
    with Client(t, root_certificates=ca, client_cert=certs / "client.pem", client_key=certs / "client.key") as c:
        c.create_experiment("mtls", arms=["a", "b"])
        assert c.decide("mtls", unit_id="u").arms

    async def over_async() -> None:
        async with AsyncClient(
            t, root_certificates=ca, client_cert=(certs / "client.pem").read_bytes(),
            client_key=(certs / "client.key").read_bytes(),
        ) as ac:  # fmt: skip
            assert [e.id for e in await ac.list_experiments()] == ["mtls"]

    asyncio.run(over_async())
    with Client(t, timeout=10.0) as plaintext:
        _refused(plaintext)


def test_tls_flags_are_checked_and_passed_to_pool_members(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_serve_args(p)
    for args in (["--tls-cert", "c.pem"], ["--tls-key", "k.pem"], ["--tls-client-ca", "ca.pem"]):
        with pytest.raises(SystemExit, match="tls"):
            from_args(p.parse_args(args))
    cfg = from_args(p.parse_args(["--tls-cert", "c.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem"]))
    cmd = member_command(cfg, 0)
    for flag, value in (("--tls-cert", "c.pem"), ("--tls-key", "k.pem"), ("--tls-client-ca", "ca.pem")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--tls-cert" not in member_command(ServerConfig(), 0)
    # An unreadable certificate stops the server at once, with the path in the message.
    out = subprocess.run(
        [sys.executable, "-m", "banditd", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
         "--workers", "1", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(tmp_path / "k")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode != 0 and "missing.pem" in out.stderr


def test_client_option_errors(certs: Path) -> None:
    with pytest.raises(ValueError, match="go together"):
        Client("127.0.0.1:1", client_cert=certs / "client.pem")
    with pytest.raises(ValueError, match="cannot read root_certificates"):
        Client("127.0.0.1:1", root_certificates=certs / "nope.pem")
    with pytest.raises(ValueError, match="not both"):
        Client("127.0.0.1:1", channel=grpc.insecure_channel("127.0.0.1:1"), tls=True)
    with pytest.raises(ValueError, match="api_key"):
        Client("127.0.0.1:1", api_key="two words")
