"""The HTTP side of banditd (`--http-port`): the dashboard, its CSV export and JSON, and the
Prometheus `/metrics` scrape.

| path                              | what                                              |
|-----------------------------------|---------------------------------------------------|
| `/`                               | list of experiments                               |
| `/experiments/{id}`               | one experiment's page                             |
| `/experiments/{id}/events.csv`    | its newest 10,000 decisions with outcomes         |
| `/api/experiments/{id}`           | the page's data as JSON                           |
| `/metrics`                        | Prometheus text format                            |
| `/static/{name}`                  | the stylesheet                                    |

The stdlib's threading HTTP server is enough here: a few people and one Prometheus scrape,
not the decision path (that is gRPC). Pages are rendered on the server, with no script at all;
`Content-Security-Policy: script-src 'none'` makes sure nothing injected could run even if an
id escaped the escaping. With API keys on, every path needs a key with the `read` scope, as
`Authorization: Bearer <key>` (Prometheus' bearer_token) or as the password of HTTP basic auth
(a browser's prompt); a key with a prefix sees only its experiments. Several worker processes
share the port (SO_REUSEPORT) like the gRPC one.
"""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import orjson

from banditd.auth import Denied, KeyRing
from banditd.dashboard import events_csv, render_experiment, render_index, static_file
from banditd.dashboard.data import CSV_EVENTS, DashboardData
from banditd.errors import BanditdError, ExperimentNotFound
from banditd.metrics import exposition

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from banditd.engine import Engine

log = logging.getLogger("banditd")
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self' data:; script-src 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class WebServer:
    def __init__(
        self, engine: Engine, registry: CollectorRegistry, keys: KeyRing | None, host: str, port: int
    ) -> None:
        self.data = DashboardData(engine)
        self.registry = registry
        self.keys = keys
        web = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "banditd"
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                web.handle(self)

            def do_HEAD(self) -> None:  # noqa: N802
                web.handle(self, head=True)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                log.debug("http " + format, *args)

        self.httpd = _Server((host, port), Handler)
        self.port = self.httpd.server_address[1]

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="banditd-http", daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _prefix(self, req: BaseHTTPRequestHandler) -> str | None:
        """The experiment prefix the caller may see ("" = all), None when refused."""
        if self.keys is None:
            return ""
        self.keys.reload()
        if not self.keys.view.enabled:
            return ""
        header = req.headers.get("Authorization", "")
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() == "basic":
            try:
                value = base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
            except (ValueError, UnicodeDecodeError):
                return None
            header = f"Bearer {value}"
        try:
            principal = self.keys.authenticate([("authorization", header)])
        except Denied:
            return None
        return principal.prefix if "read" in principal.grants else None

    def handle(self, req: BaseHTTPRequestHandler, head: bool = False) -> None:
        try:
            status, ctype, body = self._route(req)
        except Exception:  # a bug here must not kill the server thread
            log.exception("dashboard request %s failed", req.path)
            status, ctype, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        for k, v in SECURITY_HEADERS:
            req.send_header(k, v)
        if status == 401:
            req.send_header("WWW-Authenticate", 'Basic realm="banditd", charset="UTF-8"')
        req.end_headers()
        if not head:
            req.wfile.write(body)

    def _route(self, req: BaseHTTPRequestHandler) -> tuple[int, str, bytes]:
        path = urlsplit(req.path).path
        html = "text/html; charset=utf-8"
        if path.startswith("/static/"):
            found = static_file(path[len("/static/") :])
            return (200, found[1], found[0]) if found else (404, "text/plain", b"not found\n")
        prefix = self._prefix(req)
        if prefix is None:
            return 401, "text/plain; charset=utf-8", b"an API key with the read scope is required\n"
        now_ms = int(time.time() * 1000)
        if path == "/metrics":
            body, ctype = exposition(self.registry)
            return 200, ctype, body
        if path in ("/", "/experiments", "/experiments/"):
            return 200, html, render_index(self.data.index(prefix), now_ms).encode()
        for base, kind in (("/api/experiments/", "json"), ("/experiments/", "page")):
            if not path.startswith(base):
                continue
            rest = path[len(base) :]
            csv = kind == "page" and rest.endswith("/events.csv")
            try:
                exp = unquote(rest[: -len("/events.csv")] if csv else rest, errors="strict")
                if not exp.startswith(prefix):
                    return 404, "text/plain", b"no such experiment\n"
                if csv:
                    body = events_csv(self.data.events(exp, CSV_EVENTS)).encode()
                    return 200, "text/csv; charset=utf-8", body
                view = self.data.view(exp)
            except (ExperimentNotFound, BanditdError, UnicodeDecodeError):
                return 404, "text/plain", b"no such experiment\n"
            if kind == "json":
                return 200, "application/json", orjson.dumps(view, option=orjson.OPT_SERIALIZE_NUMPY, default=str)
            return 200, html, render_experiment(view, now_ms).encode()
        return 404, "text/plain", b"not found\n"
