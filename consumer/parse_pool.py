"""Parsing in a helper process: the inbound worker's batches, and long IMAP runs.

Parsing is CPU-bound Python: in one process it holds the GIL, so fetching, writing files and
committing can only fill its pauses. A helper process parses batch n while the worker's own
process stores and commits batch n−1, and two cores work. The helper runs the same
``parse_email``; each outcome (the value, or the reason it was refused) comes back whole, and
the caller logs the warnings and observes the metric (``consumer.save.observe_parse``).

Two implementations of one interface (``start``, ``ready``, ``submit``, ``submit_files``,
``collect``, ``close``): ``ParsePool``, one worker of the standard library's
``ProcessPoolExecutor``, and ``InProcess``, for one core. Until 2026-12-02 the helper spoke a
hand-made pipe protocol (tickets, replies of 32, a reader thread), written to spare the owner
the executor's feeder and result threads; paired runs of the consumer benchmark showed it
gained nothing over the executor (docs/BENCHMARKS.md), so the executor it is.

The worker is started with ``forkserver`` (never ``fork``: the consumer has threads), which
imports the parser once. A worker that died (killed, out of memory) is a TransientError; the
next ``submit`` starts a new one. A worker whose owner died finds its queue closed and leaves,
and so does the fork server. Like every multiprocessing child it imports the parent's main
script unless that is a package's ``__main__`` (``python -m consumer``) — a script that uses
it must keep its work under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from mailread.parse import Limits, ParsedEmail, parse_email
from mailferry.errors import EmailParseError, TransientError
from mailferry.pids import pid_alive
from mailferry.spool import SpoolEntry, TornRecord

CLOSE_TIMEOUT = 5.0  # seconds a worker may take to leave before it is killed


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


def parse_files(entries: list[SpoolEntry], limits: Limits) -> list[Parsed]:
    """``parse_many`` of spooled messages, read where they are parsed: the bytes never cross
    processes.

    One that cannot be read comes back ``unreadable``, with ``missing`` telling a vanished
    file or a torn segment record (never acknowledged) from another failure.
    """
    out = []
    for entry in entries:
        try:
            raw = entry.message()
        except OSError as exc:
            out.append(Parsed(None, f"unreadable: {exc.strerror}", 0.0, unreadable=True,
                              missing=isinstance(exc, (FileNotFoundError, TornRecord))))
            continue
        out.extend(parse_many([raw], limits))
    return out


def worth_a_helper() -> bool:
    """A helper only pays off with a second core to run on."""
    return (os.cpu_count() or 1) > 1


class InProcess:
    """``ParsePool``'s interface, parsing here, when ``submit`` is called: for one core (no
    second one to run a helper on), and for what is parsed before a helper is up."""

    def start(self, wait: bool = False) -> None:
        pass

    def ready(self) -> bool:
        return True

    def submit(self, raws: list[bytes], limits: Limits) -> list[Parsed]:
        return parse_many(raws, limits)

    def submit_files(self, entries: list[SpoolEntry], limits: Limits) -> list[Parsed]:
        return parse_files(entries, limits)

    def collect(self, ticket: list[Parsed]) -> list[Parsed]:
        return ticket

    def close(self) -> None:
        pass


def parser_for(setting: str) -> "ParsePool | InProcess":
    """The parser a consumer uses: ``on`` a helper process, ``off`` in process, ``auto`` a
    helper when there is a second core (MAILFERRY_PARSE_PROCESS)."""
    wanted = {"on": True, "off": False}.get(setting, worth_a_helper())
    return ParsePool() if wanted else InProcess()


class ParsePool:
    """One helper process (a ``ProcessPoolExecutor`` of one worker), started by ``start()``
    or the first ``submit``. ``submit`` and ``collect`` may be called from different threads."""

    def __init__(self) -> None:
        self._executor: ProcessPoolExecutor | None = None
        self._warm: Future | None = None

    @property
    def pid(self) -> int | None:
        processes = getattr(self._executor, "_processes", None) or {}
        return next(iter(processes), None)

    def start(self, wait: bool = False) -> None:
        """Start the helper (it takes a while to import flanker); ``wait``: until it is up."""
        if self._executor is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                # The fork server imports the parser once; each helper forked from it starts warm.
                context.set_forkserver_preload([__name__])
            else:
                context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(1, mp_context=context, initializer=_watch_owner,
                                                 initargs=(os.getpid(),))
            self._warm = self._executor.submit(worth_a_helper)  # answered once it is up
        if wait:
            self.collect(self._warm)

    def ready(self) -> bool:
        """True once the helper is up: until then a batch is better parsed here."""
        warm = self._warm
        return warm is not None and warm.done() and warm.exception() is None

    def submit(self, raws: list[bytes], limits: Limits) -> Future:
        return self._submit(parse_many, raws, limits)

    def submit_files(self, entries: list[SpoolEntry], limits: Limits) -> Future:
        return self._submit(parse_files, entries, limits)

    def _submit(self, work, items: list, limits: Limits) -> Future:
        if self._executor is None:
            self.start()
        try:
            return self._executor.submit(work, items, limits)
        except (BrokenProcessPool, RuntimeError) as exc:  # RuntimeError: shut down meanwhile
            self._broken()
            raise TransientError(f"the parser process died: {exc!r}") from exc

    def collect(self, future: Future) -> list[Parsed]:
        try:
            return future.result()
        except BrokenProcessPool as exc:
            self._broken()
            raise TransientError(f"the parser process died: {exc!r}") from exc

    def _broken(self) -> None:
        """Forget a pool whose worker died: the next submit starts another."""
        executor, self._executor, self._warm = self._executor, None, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        executor, self._executor, self._warm = self._executor, None, None
        if executor is None:
            return
        pids = list(getattr(executor, "_processes", None) or {})
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for pid in pids:  # a worker busy with a large batch is not waited for long
            while time.monotonic() < deadline and pid_alive(pid):
                time.sleep(0.02)
            if pid_alive(pid):
                # It may leave between the look and the kill: gone is what was wanted.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _watch_owner(owner: int) -> None:
    """In the worker: leave when the owner is gone. The worker holds both ends of its call
    queue's pipe, so it would never see the owner's death as an end of file; a consumer
    killed outright (out of memory) must not leave its parser behind."""
    import threading
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in `mailferry fetch` is the owner's

    def watch() -> None:
        while pid_alive(owner):
            time.sleep(OWNER_CHECK)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="owner-watch").start()


OWNER_CHECK = 0.5  # seconds between the worker's looks at its owner
