"""The read API process: uvicorn serving ``api.app`` on MAILFERRY_API_HOST:PORT (loopback by
default), until SIGTERM or SIGINT (uvicorn's own handlers drain the open requests)."""

from __future__ import annotations

import logging

from mailferry.app import bootstrap
from mailferry.config import Settings

log = logging.getLogger(__name__)


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings)
    import uvicorn

    from api.app import build_app
    log.info("api: listening on http://%s:%d (docs at /docs)", settings.api_host, settings.api_port)
    uvicorn.run(build_app(settings), host=settings.api_host, port=settings.api_port,
                log_level="warning", access_log=False)
    return 0
