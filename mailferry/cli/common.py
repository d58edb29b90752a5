"""Helpers the command modules share: settings and database for a one-shot command."""

from __future__ import annotations

import json
import sys

from mailferry.app import bootstrap
from mailferry.config import Settings
from mailferry.display import print_table  # noqa: F401 (the commands import it from here)


def open_app(*, topology: bool = False) -> Settings:
    """Settings + database (+ topology), without the long-running processes' log set-up."""
    from mailferry.logs import setup_logging
    settings = bootstrap(quiet=True, topology=topology)
    setup_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    return settings


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")
