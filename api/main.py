"""The read API process: uvicorn serving ``api.app`` on MAILFERRY_API_HOST:PORT (loopback by
default), until SIGTERM or SIGINT (uvicorn's own handlers drain the open requests)."""

from __future__ import annotations

import contextlib
import logging

from mailferry import starting
from mailferry.app import bootstrap
from mailferry.config import Settings

log = logging.getLogger(__name__)


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings)
    import uvicorn

    from api.app import build_app

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's handlers are in from here: a stop that came while starting (see
            # mailferry/starting.py) is handed to them, and the server stops once it is up.
            with super().capture_signals():
                if starting.stop_requested():
                    self.should_exit = True
                yield

    log.info("api: listening on http://%s:%d (docs at /docs)", settings.api_host, settings.api_port)
    config = uvicorn.Config(build_app(settings), host=settings.api_host, port=settings.api_port,
                            log_level="warning", access_log=False)
    server = Server(config)
    server.run()
    return 0 if server.started else 3  # uvicorn.run's status when it cannot start (port in use)
