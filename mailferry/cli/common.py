"""Helpers the command modules share: settings and database for a one-shot command."""

from __future__ import annotations

import json
import sys

from mailferry.app import bootstrap
from mailferry.config import Settings
from mailferry.display import escape


def open_app(*, topology: bool = False) -> Settings:
    """Settings + database (+ topology), without the long-running processes' log set-up."""
    from mailferry.logs import setup_logging
    settings = bootstrap(quiet=True, topology=topology)
    setup_logging("WARNING" if settings.log_level == "INFO" else settings.log_level)
    return settings


def print_json(value) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False, default=str)
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list]) -> None:
    # A cell is one line: a newline in a subject must not start a row of its own.
    cells = [[str(h) for h in headers]] + [["" if c is None else escape(str(c)) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
