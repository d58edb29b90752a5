"""The ``mailferry`` command line. Each command group lives in its own module and registers
its sub-commands with ``register(subparsers)``; ``COMMAND_MODULES`` lists them. A group may
return its own sub-parsers by name, for the process packages to add to: those (the consumer,
the scheduler) register their commands through the ``mailferry.commands`` entry point, so the
core never imports a process."""

from __future__ import annotations

import argparse
import importlib
import sys
from importlib.metadata import entry_points

from mailferry.display import EscapingWriter
from mailferry.errors import MailferryError

COMMAND_MODULES = [
    "mailferry.cli.users",
    "mailferry.cli.mail",
    "mailferry.cli.settings",
    "mailferry.cli.imap",
    "mailferry.cli.tasks",
    "mailferry.cli.ops",
    "mailferry.cli.webhooks",
    "mailferry.cli.storage",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailferry", description="Inbound mail from Haraka and IMAP, parsed, routed and stored.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict = {}
    for name in COMMAND_MODULES:
        groups.update(importlib.import_module(name).register(sub) or {})
    for entry in sorted(entry_points(group="mailferry.commands"), key=lambda e: e.name):
        entry.load()(sub, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Every line a command prints may carry mail text: escape terminal controls and bidi
    # overrides once, here, for every command (mailferry.display).
    stdout = sys.stdout
    sys.stdout = writer = EscapingWriter(stdout)
    try:
        return args.func(args) or 0
    except MailferryError as exc:
        print(f"mailferry {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0
    finally:
        # Put back only our own writer: sys.stdout is the process's, and a command run in a
        # thread that ends late must not put back a stream its caller has since closed.
        if sys.stdout is writer:
            sys.stdout = stdout
