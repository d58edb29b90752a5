"""Start-up shared by every process: settings, logging, database, broker topology."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from mailferry import broker
from mailferry.config import Settings, load_settings
from mailferry.db import open_database
from mailferry.errors import ConfigError
from mailferry.logs import setup_logging
from mailferry.mailbox_config import check_secret_key

log = logging.getLogger(__name__)


def settings_or_exit() -> Settings:
    """Load the settings; an invalid value stops the process with one readable line."""
    try:
        return load_settings()
    except ConfigError as exc:
        _exit_on(exc)


def _exit_on(exc: ConfigError) -> NoReturn:
    print(f"mailferry: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


PRIVATE_UMASK = 0o077  # mail, the database and its WAL are for this user alone


def bootstrap(settings: Settings | None = None, *, topology: bool = False, quiet: bool = False) -> Settings:
    os.umask(PRIVATE_UMASK)  # every file and folder this process makes: 0600 / 0700
    settings = settings or settings_or_exit()
    if not quiet:
        setup_logging(settings.log_level)
    settings.var_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        check_secret_key(settings)
    except ConfigError as exc:
        _exit_on(exc)
    open_database(settings.resolved_database_url)
    if topology:
        broker.setup_topology(settings)
    return settings
