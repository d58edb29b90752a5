"""`mailferry consumer` (and the other long-running processes)."""

from __future__ import annotations


def register(sub) -> None:
    consumer = sub.add_parser("consumer", help="run the consumer (same as python -m consumer)")
    consumer.set_defaults(func=lambda args: _run("consumer.main"))
    scheduler = sub.add_parser("scheduler", help="run the scheduler (same as python -m scheduler)")
    scheduler.set_defaults(func=lambda args: _run("scheduler.main"))


def _run(module: str) -> int:
    import importlib
    return importlib.import_module(module).main()
