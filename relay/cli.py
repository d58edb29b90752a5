"""The relay's command, registered with the ``mailferry`` CLI (pyproject.toml):
``mailferry relay`` (as ``python -m relay``)."""

from __future__ import annotations


def register(sub, groups: dict) -> None:
    cmd = sub.add_parser("relay", help="publish the events outbox (same as python -m relay)")
    cmd.set_defaults(func=lambda args: _run())


def _run() -> int:
    from mailferry.starting import stop_while_starting
    stop_while_starting()  # before the process's imports: a stop while starting is a clean stop
    from relay.main import main
    return main()
