"""A private PostgreSQL cluster for tests (importable helper, not a test module).

    with PostgresCluster() as pg:
        env = pgkv.Environment(pg.url)
        pg.restart()

The cluster lives in a temporary directory, listens on a free TCP port of 127.0.0.1 (and a
Unix socket in that directory) and trusts local connections of user `banditd`. PostgreSQL
refuses to run as root: then every server command runs as the `postgres` OS user (created with
`useradd --system` if missing), which owns the directory.

Fixtures (`pytest_plugins = ["pg"]` in a test module): `pg_cluster` (session) and `pg_url`
(session, the cluster's `banditd` database); `fresh_pg_url` creates a new database per call;
`private_pg_cluster` is a cluster of the test's own, to stop, kill or restart. They skip the
test only when no PostgreSQL server binaries exist at all (as root, `apt-get install -y
postgresql` is tried first).
"""

from __future__ import annotations

import glob
import grp
import itertools
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

USER = "banditd"
DATABASE = "banditd"
OS_USER = "postgres"
_REQUIRED = ("initdb", "postgres", "pg_ctl", "pg_isready")


def _version_key(path: str) -> tuple[int, ...]:
    name = Path(path).parent.name  # /usr/lib/postgresql/<version>/bin
    return tuple(int(p) for p in name.split(".") if p.isdigit()) or (0,)


def find_bindir() -> Path | None:
    """The directory with initdb/postgres/pg_ctl: the highest /usr/lib/postgresql/*/bin (also
    /usr/local/pgsql/bin), `pg_config --bindir`, or PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    candidates += ["/usr/local/pgsql/bin"]
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True)
            candidates.append(out.stdout.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(str(Path(initdb).parent))
    for cand in candidates:
        if cand and all(os.access(Path(cand) / tool, os.X_OK) for tool in _REQUIRED):
            return Path(cand)
    return None


def ensure_bindir() -> Path | None:
    """find_bindir(), installing the distribution's postgresql package first when root."""
    found = find_bindir()
    if found is not None or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", "postgresql"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "postgresql"]):  # fmt: skip
        try:
            subprocess.run(cmd, env=env, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        found = find_bindir()
        if found is not None:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresCluster:
    """initdb + postgres in a temporary directory; `url` is
    postgresql://banditd@127.0.0.1:PORT/banditd. `fsync=False` trades crash safety for speed
    (fsync, full_page_writes and synchronous_commit off)."""

    def __init__(self, *, fsync: bool = True, bindir: Path | None = None, port: int | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise FileNotFoundError("no PostgreSQL server binaries (initdb, postgres, pg_ctl) found")
        self.bindir = found
        self.fsync = fsync
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._as_postgres = os.geteuid() == 0
        self._names = itertools.count(1)

    # Paths and URLs.
    @property
    def datadir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        assert self.root is not None
        return self.root / "postgres.log"

    @property
    def url(self) -> str:
        return self.url_for(DATABASE)

    def url_for(self, dbname: str) -> str:
        return f"postgresql://{USER}@{self.host}:{self.port}/{dbname}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    # Processes.
    def _user_kwargs(self) -> dict[str, Any]:
        if not self._as_postgres:
            return {}
        pw = pwd.getpwnam(OS_USER)
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": [], "env": {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.root), "LC_ALL": "C", "LANG": "C",
        }}  # fmt: skip

    def _run(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        kwargs = self._user_kwargs()
        if not kwargs:
            kwargs = {"env": {**os.environ, "LC_ALL": "C", "LANG": "C"}}
        res = subprocess.run(
            [str(self.bindir / tool), *args], capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
        if res.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({res.returncode}): {res.stderr or res.stdout}")
        return res

    @staticmethod
    def _ensure_os_user() -> None:
        try:
            pwd.getpwnam(OS_USER)
        except KeyError:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", OS_USER],
                check=True, capture_output=True,
            )  # fmt: skip

    def _make_root(self) -> Path:
        base = None
        if self._as_postgres:
            self._ensure_os_user()
            # The directory must be reachable by `postgres`: pytest's and root's temp dirs may not be.
            tmp = Path(tempfile.gettempdir())
            base = tmp if all(os.stat(p).st_mode & 0o001 for p in (tmp, *tmp.parents)) else Path("/tmp")
        root = Path(tempfile.mkdtemp(prefix="banditd-pg-", dir=base))
        if self._as_postgres:
            pw = pwd.getpwnam(OS_USER)
            os.chown(root, pw.pw_uid, pw.pw_gid)
        return root

    def start(self) -> PostgresCluster:
        """Creates the cluster (first time) and starts the server; returns when it accepts
        connections and the `banditd` database exists."""
        if self.root is None:
            self.root = self._make_root()
            self._run("initdb", "-D", str(self.datadir), "-U", USER, "-A", "trust", "-E", "UTF8", "--locale=C",
                      "--no-sync", "--no-instructions", timeout=120)  # fmt: skip
            settings = {
                "listen_addresses": f"'{self.host}'",
                "unix_socket_directories": f"'{self.root}'",
                "max_connections": "60",
                "shared_buffers": "32MB",
                "fsync": "on" if self.fsync else "off",
                "synchronous_commit": "on" if self.fsync else "off",
                "full_page_writes": "on" if self.fsync else "off",
                "logging_collector": "off",
                "log_min_messages": "warning",
            }
            with open(self.datadir / "postgresql.conf", "a") as f:
                f.write("".join(f"{k} = {v}\n" for k, v in settings.items()))
            self._start_server()
            self.create_database(DATABASE)
        else:
            self._start_server()
        return self

    def _start_server(self, timeout: float = 60.0) -> None:
        assert self.root is not None
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the server process
        try:
            self.proc = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                **self._user_kwargs(),
            )  # fmt: skip
        finally:
            log.close()
        if self._as_postgres:
            os.chown(self.log_path, pwd.getpwnam(OS_USER).pw_uid, grp.getgrnam(OS_USER).gr_gid)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.proc.returncode}:\n{self.log_tail()}")
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", self.host, "-p", str(self.port), "-U", USER,
                 "-d", "postgres", "-t", "2"],
                capture_output=True, check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not become ready in {timeout:g} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def create_database(self, name: str) -> str:
        """Creates database `name` (owned by banditd); returns its URL."""
        import psycopg

        with psycopg.connect(self.url_for("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]  # test-chosen name
        return self.url_for(name)

    def fresh_database(self) -> str:
        """A new, empty database; returns its URL."""
        return self.create_database(f"t{os.getpid()}_{next(self._names)}")

    def stop(self, mode: str = "fast", timeout: float = 60.0) -> None:
        """Shuts the server down (smart: SIGTERM, fast: SIGINT, immediate: SIGQUIT)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            self.proc = None
            return
        sig = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL to the server and all its processes (a crash; the next start recovers)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
        self.proc = None
        # Backends die with their process group; wait until none holds the port any more.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((self.host, self.port)) != 0:
                    break
            time.sleep(0.05)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self._start_server()

    def close(self) -> None:
        try:
            self.stop("fast", timeout=30)
        finally:
            if self.proc is not None:
                self.kill()
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> PostgresCluster:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _skip_without_postgres() -> Path:
    bindir = ensure_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries: looked in /usr/lib/postgresql/*/bin, pg_config --bindir and PATH")
    return bindir


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresCluster]:
    """One private cluster for the session (fsync on, as in production)."""
    bindir = _skip_without_postgres()
    with PostgresCluster(bindir=bindir) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def pg_url(pg_cluster: PostgresCluster) -> str:
    return pg_cluster.url


@pytest.fixture
def private_pg_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own (fsync off), for tests that stop, kill or restart it."""
    bindir = _skip_without_postgres()
    with PostgresCluster(bindir=bindir, fsync=False) as cluster:
        yield cluster


@pytest.fixture
def fresh_pg_url(pg_cluster: PostgresCluster) -> Callable[[], str]:
    """Call it for the URL of a new, empty database."""
    return pg_cluster.fresh_database
