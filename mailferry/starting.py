"""A process's first line: until its loop installs its own handlers, SIGTERM stops it at once
with status 0.

A supervisor (``make run``, systemd, Kubernetes, a test) may stop a process that is still
importing or migrating. Python's default would end it by the signal (status -15), which reads
as a crash; there is nothing to drain yet (nothing was taken from a queue) and a transaction
under way is rolled back, so a clean stop is the truth. Each process's loop replaces this
handler with its own, which drains before it exits.
"""

from __future__ import annotations

import signal


def stop_while_starting() -> None:
    signal.signal(signal.SIGTERM, _exit_cleanly)


def _exit_cleanly(*_args) -> None:
    raise SystemExit(0)
