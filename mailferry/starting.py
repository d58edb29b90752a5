"""A process's first line: until its loop installs its own handlers, SIGTERM stops it at once
with status 0.

A supervisor (``make run``, systemd, Kubernetes, a test) may stop a process that is still
importing or migrating. Python's default would end it by the signal (status -15), which reads
as a crash; there is nothing to drain yet (nothing was taken from a queue) and a transaction
under way is rolled back, so a clean stop is the truth. Each process's loop replaces this
handler with its own, which drains before it exits (``hand_over``).

The SystemExit is raised wherever the main thread happens to be. Inside a ``__del__`` or a
weakref callback Python cannot raise it: it hands it to ``sys.unraisablehook`` (which would
print a traceback) and goes on starting. So the stop is also remembered, ``hand_over`` passes
it to the loop — one SIGTERM is one stop, whatever it interrupted — and the hook is told that
this SystemExit is no error.
"""

from __future__ import annotations

import signal
import sys
from typing import Callable

_stop_requested = False


def stop_while_starting() -> None:
    signal.signal(signal.SIGTERM, _exit_cleanly)
    sys.unraisablehook = _quiet_about_our_stop


def stop_requested() -> bool:
    """Whether a SIGTERM came while the process was starting."""
    return _stop_requested


def hand_over(stop: Callable[..., None]) -> None:
    """Install the loop's own (flag-setting) handler for SIGTERM and SIGINT, then give it any
    stop that came while starting."""
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    if _stop_requested:
        stop(signal.SIGTERM, None)


def _exit_cleanly(*_args) -> None:
    global _stop_requested
    _stop_requested = True
    raise SystemExit(0)


def _quiet_about_our_stop(unraisable) -> None:
    if unraisable.exc_type is SystemExit and _stop_requested:
        return  # our own stop, swallowed where it landed: hand_over delivers it
    sys.__unraisablehook__(unraisable)
