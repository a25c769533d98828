"""API keys: every RPC against every scope, bad keys, prefixes, open health and reflection,
keys created and revoked by the CLI while the server runs, and a key-less server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from banditd import cli
from banditd.auth import METHOD_SCOPES, RELOAD_INTERVAL_S
from banditd.store import Store
from banditd_client import AsyncClient, Client, FailedPrecondition, PermissionDenied, Unauthenticated
from banditd_client.errors import ERROR_TRAILER
from banditd_client.v1 import banditd_pb2 as pb
from banditd_client.v1 import banditd_pb2_grpc as pb_grpc
from conftest import ServerProcess

RPCS = list(METHOD_SCOPES)
GRANTS = {"decide": {"decide"}, "read": {"read"}, "admin": {"admin", "read", "decide"}}
# A key change must be in force this long after the CLI committed it (the stated bound, plus
# scheduling slack on a busy test machine).
PICKUP_BOUND_S = RELOAD_INTERVAL_S + 0.75


@pytest.fixture(autouse=True)
def _no_key_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BANDITD_API_KEY", raising=False)


def create_key(data_dir: Path, *scopes: str, prefix: str = "", expires_in_days: float | None = None) -> str:
    """`banditd keys create` in this process (the store is opened and closed again)."""
    args = ["keys", "create", "--data-dir", str(data_dir)]
    args += [a for s in scopes for a in ("--scope", s)]
    if prefix:
        args += ["--prefix", prefix]
    if expires_in_days is not None:
        args += ["--expires-in-days", str(expires_in_days)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(args) == 0
    return out.getvalue().strip()


def revoke_key(data_dir: Path, key: str) -> int:
    with contextlib.redirect_stderr(io.StringIO()):
        return cli.main(["keys", "revoke", key.split("_")[1], "--data-dir", str(data_dir)])


def cli_subprocess(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "banditd", "keys", *args], capture_output=True, text=True, timeout=60, check=False
    )


def call(rpc: str, target: str, key: str | None, exp: str, decision: str) -> None:
    """One valid call of `rpc` (succeeds when the key may make it)."""
    if rpc == "RewardStream":  # the async client's reward_many streams RewardRequests

        async def stream() -> None:
            async with AsyncClient(target, api_key=key, timeout=10.0) as ac:
                await ac.reward_many([(decision, 1.0, uuid.uuid4().hex)])

        asyncio.run(stream())
        return
    with Client(target, api_key=key, timeout=10.0) as c:
        calls: dict[str, Callable[[], object]] = {
            "CreateExperiment": lambda: c.create_experiment(f"{exp}-{uuid.uuid4().hex[:8]}", arms=["a", "b"]),
            "UpdateExperiment": lambda: c.update_experiment(exp, state="running"),
            "GetExperiment": lambda: c.get_experiment(exp),
            "ListExperiments": lambda: c.list_experiments(),
            "GetArmStats": lambda: c.arm_stats(exp),
            "GetDiagnostics": lambda: c.diagnostics(exp),
            "GetModel": lambda: _get_model(c, exp),
            "Analyse": lambda: c.analyse(exp),
            "DecideBulk": lambda: list(c.decide_bulk(exp, ["u1", "u2"])),
            "GetAllocation": lambda: c.get_allocation(exp),
            # Version 1 was never issued: refused per item, the call itself succeeds.
            "LogExposures": lambda: c.log_exposures(exp, [(f"{int(time.time() * 1000):011x}{'0' * 12}", "u", "a", 1)]),
            "GetAuditLog": lambda: c.audit_log(exp),
            "Decide": lambda: c.decide(exp, unit_id="u"),
            "Reward": lambda: c.reward(decision, 1.0, event_id=uuid.uuid4().hex),
            "RewardBatchStream": lambda: c.reward_many([(decision, 1.0, uuid.uuid4().hex)]),
        }
        calls[rpc]()


def _get_model(c: Client, exp: str) -> None:
    """GetModel of the test experiment: it is not contextual, so FAILED_PRECONDITION, which
    only the handler answers; the key got through."""
    try:
        c.get_model(exp)
    except FailedPrecondition:
        pass


def committed_decision(c: Client, exp: str) -> str:
    """A decision whose record (written behind the response) is committed."""
    before = sum(s.pulls for s in c.arm_stats(exp))
    d = c.decide(exp, unit_id="u")
    deadline = time.monotonic() + 10
    while sum(s.pulls for s in c.arm_stats(exp)) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    return d.decision_id


@dataclass
class Authed:
    server: ServerProcess
    keys: dict[str, str]
    decisions: dict[str, str]  # experiment -> a committed decision of it

    @property
    def target(self) -> str:
        return self.server.target


@pytest.fixture(scope="module")
def authed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Authed]:
    data = tmp_path_factory.mktemp("auth") / "data"
    # The real command, in its own process: prints the key alone on stdout.
    out = cli_subprocess("create", "--scope", "admin", "--name", "ops", "--data-dir", str(data))
    assert out.returncode == 0, out.stderr
    admin = out.stdout.strip()
    assert admin.startswith("bd_") and "\n" not in admin and "auth is now ON" in out.stderr
    keys = {
        "admin": admin,
        "decide": create_key(data, "decide"),
        "read": create_key(data, "read"),
        "team-a": create_key(data, "decide", "read", prefix="team-a/"),
        "team-a-admin": create_key(data, "admin", prefix="team-a/"),
        "expired": create_key(data, "decide", "read", "admin", expires_in_days=0.3 / 86400),
        "revoked": create_key(data, "decide", "read", "admin"),
    }
    assert revoke_key(data, keys["revoked"]) == 0
    srv = ServerProcess(data)
    srv.start()
    decisions = {}
    with Client(srv.target, api_key=admin, timeout=10.0) as c:
        for exp in ("team-a/exp", "team-b/exp"):
            c.create_experiment(exp, arms=["a", "b"])
            decisions[exp] = committed_decision(c, exp)
    yield Authed(srv, keys, decisions)
    srv.kill()


@pytest.mark.parametrize("scope", ["decide", "read", "admin"])
@pytest.mark.parametrize("rpc", RPCS)
def test_every_rpc_against_every_scope(authed: Authed, rpc: str, scope: str) -> None:
    allowed = METHOD_SCOPES[rpc] in GRANTS[scope]
    if allowed:
        call(rpc, authed.target, authed.keys[scope], "team-a/exp", authed.decisions["team-a/exp"])
        return
    with pytest.raises(PermissionDenied, match=f"lacks the '{METHOD_SCOPES[rpc]}' scope that {rpc} needs") as err:
        call(rpc, authed.target, authed.keys[scope], "team-a/exp", authed.decisions["team-a/exp"])
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("rpc", RPCS)
def test_every_rpc_without_a_key_is_unauthenticated(authed: Authed, rpc: str) -> None:
    with pytest.raises(Unauthenticated, match="requires an API key") as err:
        call(rpc, authed.target, None, "team-a/exp", authed.decisions["team-a/exp"])
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def _wrong_secret(key: str) -> str:
    return key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "invalid API key"),
        ("unknown id", "invalid API key"),
        ("wrong secret", "invalid API key"),
        ("truncated", "invalid API key"),
        ("expired", "has expired"),
        ("revoked", "is revoked"),
    ],
)
def test_bad_keys_are_unauthenticated(authed: Authed, kind: str, message: str) -> None:
    admin = authed.keys["admin"]
    key = {
        "garbage": "hello",
        "unknown id": "bd_00000000_" + admin.split("_", 2)[2],
        "wrong secret": _wrong_secret(admin),
        "truncated": admin[:-1],
        "expired": authed.keys["expired"],
        "revoked": authed.keys["revoked"],
    }[kind]
    with Client(authed.target, api_key=key, timeout=10.0) as c:
        for fn in (lambda: c.decide("team-a/exp", unit_id="u"), c.list_experiments):
            with pytest.raises(Unauthenticated, match=message) as err:
                fn()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_metadata_forms(authed: Authed) -> None:
    """`authorization: Bearer` (any case of the scheme) and `x-api-key` work; other schemes do not."""
    key = authed.keys["read"]
    req = pb.GetExperimentRequest(experiment_id="team-a/exp")
    with grpc.insecure_channel(authed.target) as ch:
        stub = pb_grpc.BanditdStub(ch)
        for md in ((("authorization", f"Bearer {key}"),), (("authorization", f"bearer  {key}"),),
                   (("x-api-key", key),)):  # fmt: skip
            assert stub.GetExperiment(req, metadata=md, timeout=10).id == "team-a/exp"
        for md in ((("authorization", f"Basic {key}"),), (("authorization", key),), (("x-api-key", ""),)):
            with pytest.raises(grpc.RpcError) as err:
                stub.GetExperiment(req, metadata=md, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert (ERROR_TRAILER, "Unauthenticated") in tuple(err.value.trailing_metadata())


def test_prefix_key_only_touches_its_experiments(authed: Authed) -> None:
    t = authed.target
    with Client(t, api_key=authed.keys["team-a"], timeout=10.0) as c:
        assert c.decide("team-a/exp", unit_id="u").arms
        assert c.get_experiment("team-a/exp").id == "team-a/exp"
        assert c.arm_stats("team-a/exp")
        listed = {e.id for e in c.list_experiments()}
        assert "team-a/exp" in listed and all(e.startswith("team-a/") for e in listed)  # team-b/exp hidden
        outside = [
            lambda: c.decide("team-b/exp", unit_id="u"),
            lambda: c.get_experiment("team-b/exp"),
            lambda: c.arm_stats("team-b/exp"),
            lambda: c.diagnostics("team-b/exp"),
            lambda: c.decide("team-a", unit_id="u"),  # a prefix of the prefix is outside too
            lambda: c.get_experiment("no-such-experiment"),  # outside: denied before "not found"
            lambda: list(c.decide_bulk("team-b/exp", ["u1"])),  # stream messages are checked too
            lambda: c.get_allocation("team-b/exp"),
            lambda: c.log_exposures("team-b/exp", [(f"{int(time.time() * 1000):011x}{'0' * 12}", "u", "a", 1)]),
        ]
        for fn in outside:
            with pytest.raises(PermissionDenied, match="only use experiments whose id starts with 'team-a/'"):
                fn()
        # Rewards name a decision, not an experiment: checked by scope only (documented).
        assert c.reward(authed.decisions["team-b/exp"], 1.0, event_id=uuid.uuid4().hex) is True
    with Client(t, api_key=authed.keys["team-a-admin"], timeout=10.0) as c:
        created = c.create_experiment("team-a/new", arms=["a"])
        assert created.id == "team-a/new"
        assert c.update_experiment("team-a/new", add_arms=["b"]).version > created.version
        with pytest.raises(PermissionDenied):
            c.create_experiment("team-b/new", arms=["a"])
        with pytest.raises(PermissionDenied):
            c.update_experiment("team-b/exp", state="paused")
        listed = {e.id for e in c.list_experiments()}
        assert {"team-a/exp", "team-a/new"} <= listed and all(e.startswith("team-a/") for e in listed)
    with Client(t, api_key=authed.keys["admin"], timeout=10.0) as c:
        assert c.get_experiment("team-b/exp").state == "running"
        assert {"team-a/exp", "team-a/new", "team-b/exp"} <= {e.id for e in c.list_experiments()}


def test_health_and_reflection_stay_open(authed: Authed) -> None:
    with grpc.insecure_channel(authed.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "banditd.v1.Banditd"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert "banditd.v1.Banditd" in names


def test_keys_are_stored_hashed(authed: Authed) -> None:
    store = Store.open_readonly(authed.server.data_dir)  # beside the running server
    try:
        recs = store.api_keys()
    finally:
        store.close()
    admin = authed.keys["admin"]
    rec = recs[admin.split("_")[1]]
    assert rec.digest == hashlib.sha256(admin.encode()).hexdigest() and rec.scopes == ("admin",)
    assert rec.name == "ops"
    raw = (authed.server.data_dir / "data.mdb").read_bytes()
    for key in authed.keys.values():
        assert key.split("_", 2)[2].encode() not in raw
    listed = cli_subprocess("list", "--data-dir", str(authed.server.data_dir))
    assert listed.returncode == 0
    assert rec.key_id in listed.stdout and "revoked" in listed.stdout and "expired" in listed.stdout
    assert not any(k.split("_", 2)[2] in listed.stdout for k in authed.keys.values())


def _time_until(check: Callable[[], bool], limit: float = 10.0) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < limit, "the server never picked the key change up"
        time.sleep(0.02)
    return time.monotonic() - t0


def _works(target: str, key: str | None) -> bool:
    try:
        with Client(target, api_key=key, timeout=10.0) as c:
            c.list_experiments()
        return True
    except Unauthenticated:
        return False


def test_keys_created_and_revoked_while_the_server_runs(authed: Authed) -> None:
    data, t = authed.server.data_dir, authed.target
    key = create_key(data, "read")  # committed when this returns
    assert _time_until(lambda: _works(t, key)) <= PICKUP_BOUND_S
    assert revoke_key(data, key) == 0
    assert _time_until(lambda: not _works(t, key)) <= PICKUP_BOUND_S
    assert _works(t, authed.keys["read"])  # the others are untouched


def test_keyless_server_accepts_everything_until_a_key_exists(server: ServerProcess) -> None:
    t = server.target
    with Client(t, timeout=10.0) as c:
        c.create_experiment("any/exp", arms=["a", "b"])
        decision = committed_decision(c, "any/exp")
    for rpc in RPCS:
        call(rpc, t, None, "any/exp", decision)
        call(rpc, t, "bd_00000000_not-a-key", "any/exp", decision)  # a key is not even looked at
    assert "auth is off" in server.log_path.read_text()
    # The first key turns auth on for the running server; revoking the last one turns it off.
    key = create_key(server.data_dir, "decide")
    assert _time_until(lambda: not _works(t, None)) <= PICKUP_BOUND_S
    with pytest.raises(PermissionDenied):
        call("ListExperiments", t, key, "any/exp", decision)
    call("Decide", t, key, "any/exp", decision)
    assert revoke_key(server.data_dir, key) == 0
    assert _time_until(lambda: _works(t, None)) <= PICKUP_BOUND_S


def test_cli_refusals(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            cli.main(["keys", "create", "--scope", "root", "--data-dir", str(data)])
    with pytest.raises(SystemExit, match="expires_in_days must be > 0"):
        cli.main(["keys", "create", "--scope", "read", "--expires-in-days", "0", "--data-dir", str(data)])
    with pytest.raises(SystemExit, match="no banditd store"):
        cli.main(["keys", "revoke", "abcd", "--data-dir", str(data)])  # and no store is created
    assert not (data / "data.mdb").exists()
    create_key(data, "read")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["keys", "revoke", "abcd", "--data-dir", str(data)]) == 1
    assert "no key 'abcd'" in err.getvalue()
    assert os.path.exists(data / "data.mdb")


def test_every_rpc_has_a_scope() -> None:
    """A new RPC must be classified here (until then it needs admin)."""
    assert set(METHOD_SCOPES) == {m.name for m in pb.DESCRIPTOR.services_by_name["Banditd"].methods}


def test_a_read_only_store_without_the_keys_database_has_no_keys(tmp_path: Path) -> None:
    import lmdb

    from banditd.auth import KeyRing, new_key

    path = tmp_path / "store"
    Store(path).close()
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.drop(env.open_db(b"keys", txn=txn), delete=True)
    env.close()
    store = Store.open_readonly(path)
    try:
        assert store.keys is None and store.api_keys() == {}
        assert KeyRing(store).enabled is False
        with pytest.raises(PermissionError):
            store.add_api_key(new_key(["read"])[1])
    finally:
        store.close()
