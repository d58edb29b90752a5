"""Parsing in a helper process, for long runs of messages (an IMAP first sync).

Parsing is CPU-bound Python: in one process it holds the GIL, so fetching, writing files and
committing can only fill its pauses. A helper process parses batch n while the worker's own
process stores and commits batch n−1, and two cores work. The helper runs the same
``parse_email``; each outcome (the value, or the reason it was refused) comes back whole, and
the caller logs the warnings and observes the metric (``consumer.save.observe_parse``).

The helper is started with ``forkserver`` (never ``fork``: the consumer has threads) when
first needed and kept until ``close()``. A helper that died (killed, out of memory) is a
TransientError; the next ``submit`` starts a new one. Like every multiprocessing child it
imports the parent's main script unless that is a package's ``__main__`` (``python -m
consumer``) — a script that uses it must keep its work under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from consumer.parse import Limits, ParsedEmail, parse_email
from mailferry.errors import EmailParseError, TransientError
from mailferry.pids import pid_alive

OWNER_POLL_SECONDS = 1.0  # how soon a helper notices that its owner is gone


@dataclass
class Parsed:
    """One message's outcome: ``email``, or the ``error`` that refused it."""

    email: ParsedEmail | None
    error: str | None
    seconds: float
    unreadable: bool = False  # the file could not be read (not a verdict on the message)
    missing: bool = False  # … because it is gone


def parse_many(raws: list[bytes], limits: Limits) -> list[Parsed]:
    """Parse each message, going on past the ones refused (in the helper, or here)."""
    out = []
    for raw in raws:
        started = time.perf_counter()
        try:
            out.append(Parsed(parse_email(raw, limits), None, time.perf_counter() - started))
        except EmailParseError as exc:
            out.append(Parsed(None, str(exc), time.perf_counter() - started))
    return out


def parse_files(paths: list[str], limits: Limits) -> list[Parsed]:
    """``parse_many`` of files, read where they are parsed: the bytes never cross processes.

    A file that cannot be read comes back ``unreadable``, with ``missing`` telling a vanished
    file from another failure.
    """
    out = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            out.append(Parsed(None, f"unreadable: {exc.strerror}", 0.0, unreadable=True,
                              missing=isinstance(exc, FileNotFoundError)))
            continue
        out.extend(parse_many([raw], limits))
    return out


def worth_a_helper() -> bool:
    """A helper only pays off with a second core to run on."""
    return (os.cpu_count() or 1) > 1


def _start_helper(owner: int) -> None:
    """Runs first in the helper."""
    # Ctrl-C in `mailferry fetch` reaches the whole process group; the owner handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(owner,), daemon=True, name="owner-watch").start()


def _exit_with(owner: int) -> None:
    # A helper whose owner was killed (SIGKILL, OOM) would wait for work forever: it holds
    # both ends of its own job pipe, so it never sees end-of-file — and it keeps the fork
    # server alive with it. So it watches its owner and leaves with it.
    while pid_alive(owner):
        time.sleep(OWNER_POLL_SECONDS)
    os._exit(0)


class ParsePool:
    """One helper process, started by ``start()`` or the first ``submit``."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._warm: Future | None = None

    def start(self, wait: bool = False) -> None:
        """Start the helper (it takes a while to import flanker); ``wait``: until it is up."""
        if self._executor is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                # The fork server imports the parser once; each helper forked from it starts warm.
                context.set_forkserver_preload([__name__])
            else:
                context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(1, mp_context=context, initializer=_start_helper,
                                                 initargs=(os.getpid(),))
            self._warm = self._executor.submit(parse_many, [], Limits())
        if wait:
            self.collect(self._warm)

    def ready(self) -> bool:
        """True once the helper is up: until then a batch is better parsed here."""
        return self._warm is not None and self._warm.done() and self._warm.exception() is None

    def submit(self, raws: list[bytes], limits: Limits) -> Future:
        return self._submit(parse_many, raws, limits)

    def submit_files(self, paths: list[str], limits: Limits) -> Future:
        return self._submit(parse_files, paths, limits)

    def _submit(self, work, items: list, limits: Limits) -> Future:
        self.start()
        try:
            return self._executor.submit(work, items, limits)
        except BrokenProcessPool as exc:
            self.close()
            raise TransientError(f"the parser process died: {exc}") from exc

    def collect(self, future: Future) -> list[Parsed]:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self.close()
            raise TransientError(f"the parser process died: {exc}") from exc

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = self._warm = None
