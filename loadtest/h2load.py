"""h2load (Debian's nghttp2-client) as a gRPC load generator for unary calls.

A compiled generator costs ~35 µs of CPU per call where the Python one (grpc.aio, see
_common.LoadGenerator) costs ~225 µs: on a small machine it leaves the cores to the server
it measures. gRPC over HTTP/2 is a POST with `content-type: application/grpc` and
`te: trailers` whose body is a 5-byte frame header (0x00, 4-byte big-endian length) and the
serialised request; h2load sends the same body with every request.

h2load only sees the HTTP status, and a gRPC error is an HTTP 200 with `grpc-status` in the
trailers: callers check that the server did the work (a decision count, the response bytes
received) and `grpc_status()` asks nghttp, from the same package, for the trailer of one call.

    from h2load import ensure_h2load, write_body, closed_loop
    body = write_body(DecideRequest(...).SerializeToString())
    res = closed_loop(port, body, seconds=6)   # res.completed, res.failed, res.cpu
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

DECIDE_PATH = "/banditd.v1.Banditd/Decide"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
PACKAGE = "nghttp2-client"  # Debian / Ubuntu: h2load and nghttp

_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s)\b")
_DATA = re.compile(r"\((\d+)\) data")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


@dataclass
class H2Result:
    """One h2load run. `completed` counts HTTP 2xx responses, not gRPC successes."""

    completed: int
    failed: int  # non-2xx, stream errors and timeouts
    started: int  # requests sent, including those still in flight when the run ended
    data_bytes: int  # response DATA received: gRPC frames (a trailers-only error has none)
    elapsed: float  # seconds of the measured period
    cpu: float  # h2load's CPU seconds (user + system), from wait4
    output: str

    @property
    def throughput(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0


def ensure_h2load(install: bool = True) -> str | None:
    """The path of h2load; installs nghttp2-client with apt-get when it is missing and this
    process is root. None (with a message) when that is not possible."""
    found = shutil.which("h2load")
    if found or not install:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        print(f"h2load not found and cannot install it (needs root and apt-get): apt-get install -y {PACKAGE}")
        return None
    print(f"h2load not found: apt-get install -y {PACKAGE}", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-q", PACKAGE], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", PACKAGE]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if cmd[1] == "install" and done.returncode == 0:
            break
    found = shutil.which("h2load")
    if found is None:
        print(f"installing {PACKAGE} failed:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    return found


def grpc_frame(payload: bytes) -> bytes:
    """A length-prefixed gRPC message, uncompressed."""
    return b"\x00" + struct.pack(">I", len(payload)) + payload


def write_body(payload: bytes, directory: Path | None = None) -> Path:
    """Writes the gRPC frame of one serialised request to a file for `h2load -d`."""
    fd, name = tempfile.mkstemp(prefix="h2load-body-", suffix=".bin", dir=directory)
    with os.fdopen(fd, "wb") as f:
        f.write(grpc_frame(payload))
    return Path(name)


def url(port: int, host: str = "127.0.0.1", path: str = DECIDE_PATH) -> str:
    return f"http://{host}:{port}{path}"


def parse(output: str) -> tuple[int, int, int, int, float]:
    """(succeeded, failed, started, data bytes, seconds) from h2load's summary."""
    req = _REQUESTS.search(output)
    fin = _FINISHED.search(output)
    if req is None or fin is None:
        raise RuntimeError(f"h2load printed no summary:\n{output[-2000:]}")
    _total, started, _done, succeeded, failed, _errored, _timeout = (int(g) for g in req.groups())
    data = _DATA.search(output)
    return succeeded, failed, started, int(data.group(1)) if data else 0, float(fin.group(1)) * _UNITS[fin.group(2)]


def run(args: list[str], timeout: float, nice: int = 0) -> H2Result:
    """Runs h2load with `args`; its CPU time comes from wait4 on that one child, so other
    children of this process (servers) never count."""
    exe = shutil.which("h2load")
    if exe is None:
        raise RuntimeError("h2load is not installed (ensure_h2load())")
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [exe, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=(lambda: _renice(nice)) if nice else None,
        )
        watchdog = threading.Timer(timeout, lambda: _kill(proc.pid))
        watchdog.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            _kill(proc.pid)
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"h2load exited with {proc.returncode}:\n{text[-2000:]}")
    completed, failed, started, data, elapsed = parse(text)
    return H2Result(completed, failed, started, data, elapsed, usage.ru_utime + usage.ru_stime, text)


def _renice(increment: int) -> None:
    try:
        os.nice(increment)
    except OSError:  # a negative increment needs root
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _common(body: Path, seconds: int, conns: int, streams: int) -> list[str]:
    headers = [a for h in GRPC_HEADERS for a in ("-H", h)]
    return ["-D", str(seconds), "-c", str(conns), "-m", str(streams), "-t", "1", "-d", str(body), *headers]


def closed_loop(
    port: int, body: Path, seconds: float, conns: int = 4, streams: int = 8,
    host: str = "127.0.0.1", path: str = DECIDE_PATH, nice: int = 0,
) -> H2Result:
    """`conns` connections with `streams` calls in flight on each, for `seconds` (whole
    seconds: h2load's -D takes an integer)."""
    secs = max(1, round(seconds))
    return run([*_common(body, secs, conns, streams), url(port, host, path)], timeout=secs + 30, nice=nice)


def open_loop(
    port: int, body: Path, seconds: float, rps: int, streams: int = 16,
    host: str = "127.0.0.1", path: str = DECIDE_PATH, nice: int = 0,
) -> H2Result:
    """`rps` calls per second on one connection for `seconds` (up to `streams` in flight, so a
    slow call does not hold the next ones back)."""
    secs = max(1, round(seconds))
    args = [*_common(body, secs, 1, streams), f"--rps={int(rps)}", url(port, host, path)]
    return run(args, timeout=secs + 30, nice=nice)


def grpc_status(port: int, body: Path, host: str = "127.0.0.1", path: str = DECIDE_PATH) -> tuple[int | None, str]:
    """(grpc-status, grpc-message) of one call with the same body and headers, read from the
    trailers by nghttp (same package as h2load); (None, output) when there is none."""
    exe = shutil.which("nghttp")
    if exe is None:
        return None, "nghttp not installed"
    cmd = [exe, "-v", "-d", str(body), *(a for h in GRPC_HEADERS for a in ("-H", h)), url(port, host, path)]
    done = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    text = done.stdout.decode(errors="replace")
    status = re.search(r"grpc-status: (\d+)", text)
    message = re.search(r"grpc-message: ([^\n]*)", text)
    if status is None:
        return None, text[-2000:] + done.stderr.decode(errors="replace")[-500:]
    return int(status.group(1)), message.group(1).strip() if message else ""


def version() -> str:
    exe = shutil.which("h2load")
    if exe is None:
        return "h2load not installed"
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or done.stderr.strip()
