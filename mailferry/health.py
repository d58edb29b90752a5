"""The HTTP endpoint every long-running process serves: /metrics, /healthz, /readyz."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mailferry.config import Settings

log = logging.getLogger(__name__)

_checks: dict[str, Callable[[], str | None]] = {}


def add_readiness_check(name: str, check: Callable[[], str | None]) -> None:
    """``check`` returns None when ready, else a reason."""
    _checks[name] = check


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's naming)
        if self.path.startswith("/metrics"):
            self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
        elif self.path.startswith("/healthz"):
            self._send(200, b"ok\n")
        elif self.path.startswith("/readyz"):
            problems = []
            for name, check in list(_checks.items()):
                try:
                    reason = check()
                except Exception as exc:  # a check must never take the endpoint down
                    reason = repr(exc)
                if reason:
                    problems.append(f"{name}: {reason}")
            body = ("\n".join(problems) or "ready") + "\n"
            self._send(503 if problems else 200, body.encode())
        else:
            self._send(404, b"not found\n")

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # keep scrapes out of the log
        pass


def serve(settings: Settings, port: int, role: str) -> ThreadingHTTPServer | None:
    if not port:
        return None
    try:
        server = ThreadingHTTPServer((settings.metrics_host, port), _Handler)
    except OSError as exc:
        log.error("%s: cannot serve metrics on %s:%d: %s", role, settings.metrics_host, port, exc.strerror)
        return None
    threading.Thread(target=server.serve_forever, daemon=True, name="metrics").start()
    log.info("%s: metrics and health on http://%s:%d/metrics", role, settings.metrics_host, port)
    return server
