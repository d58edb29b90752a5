"""Parsing in a helper process: the inbound worker's batches, and long IMAP runs.

Parsing is CPU-bound Python: in one process it holds the GIL, so fetching, writing files and
committing can only fill its pauses. A helper process parses batch n while the worker's own
process stores and commits batch n−1, and two cores work. The helper runs the same
``parse_email``; each outcome (the value, or the reason it was refused) comes back whole, and
the caller logs the warnings and observes the metric (``consumer.save.observe_parse``).

Owner and helper share one pipe and no threads of the owner's: ``submit`` pickles a request
onto the pipe and returns a ``Ticket``; ``collect`` reads replies off the pipe — they come in
the order of the requests, each request's in replies of ``REPLY_CHUNK`` messages — until its
ticket's last has come. (concurrent.futures would add a feeder thread and a result thread
to the owner, each woken for every batch: on two cores those hand-offs cost as much CPU as
the rest of a batch's bookkeeping.) In the helper a reader thread takes requests off the
pipe as they arrive, so a large request never waits for the owner to read a large reply: the
two would wait for each other.

The helper is started with ``forkserver`` (never ``fork``: the consumer has threads) when
first needed and kept until ``close()``. A helper that died (killed, out of memory) is a
TransientError; the next ``submit`` starts a new one. A helper whose owner died reads the
end of its pipe and leaves. Like every multiprocessing child it imports the parent's main
script unless that is a package's ``__main__`` (``python -m consumer``) — a script that uses
it must keep its work under ``if __name__ == "__main__"``.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

from consumer.parse import Limits, ParsedEmail, parse_email
from mailferry.errors import EmailParseError, TransientError
from mailferry.spool import message_of, read_regular

CLOSE_TIMEOUT = 5.0  # seconds a helper may take to leave before it is killed
# The helper answers a request in replies of at most this many messages: holding a whole
# batch of 128 parsed messages before sending any made its parsing 5–8 % slower per message
# than batches of 32 (a larger live heap for the garbage collector and the caches).
REPLY_CHUNK = 32


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
            raw = message_of(read_regular(path))
        except OSError as exc:
            out.append(Parsed(None, f"unreadable: {exc.strerror}", 0.0, unreadable=True,
                              missing=isinstance(exc, FileNotFoundError)))
            continue
        out.extend(parse_many([raw], limits))
    return out


WORK = {"raws": parse_many, "files": parse_files}


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

    def submit_files(self, paths: list[str], limits: Limits) -> list[Parsed]:
        return parse_files(paths, limits)

    def collect(self, ticket: list[Parsed]) -> list[Parsed]:
        return ticket

    def close(self) -> None:
        pass


def parser_for(setting: str) -> "ParsePool | InProcess | StdlibPool":
    """The parser a consumer uses: ``on`` a helper process, ``off`` in process, ``auto`` a
    helper when there is a second core (MAILFERRY_PARSE_PROCESS); ``stdlib`` the helper on
    ProcessPoolExecutor, for comparison."""
    if setting == "stdlib":
        return StdlibPool()
    wanted = {"on": True, "off": False}.get(setting, worth_a_helper())
    return ParsePool() if wanted else InProcess()


# -- the helper's side -------------------------------------------------------------------------


def _serve(conn) -> None:
    """The helper's main: answer requests in order until the owner closes the pipe."""
    # Ctrl-C in `mailferry fetch` reaches the whole process group; the owner handles it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    requests: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_read_requests, args=(conn, requests), daemon=True,
                     name="requests").start()
    while (request := requests.get()) is not None:
        try:
            _answer(conn, *request)
        except OSError:  # the owner is gone
            break
    os._exit(0)  # nothing to flush; don't wait for the reader thread


def _answer(conn, work: str, items: list, limits: Limits) -> None:
    """Send the outcomes of ``items`` in replies of ``REPLY_CHUNK``: (ok, value, last)."""
    start = 0
    while True:
        chunk = items[start:start + REPLY_CHUNK]
        start += REPLY_CHUNK
        try:
            reply = (True, WORK[work](chunk, limits), start >= len(items))
        except Exception as exc:  # a bug, not a verdict on a message: the owner decides
            reply = (False, f"{type(exc).__name__}: {exc}", True)
        conn.send(reply)
        if reply[2]:
            return


def _read_requests(conn, requests: queue.SimpleQueue) -> None:
    try:
        while True:
            requests.put(conn.recv())
    except (EOFError, OSError):  # the owner closed the pipe, or died
        requests.put(None)


# -- the owner's side --------------------------------------------------------------------------


class Ticket:
    """A request sent to the helper; ``collect`` turns it into its reply."""

    __slots__ = ("done", "ok", "value")

    def __init__(self) -> None:
        self.done = False
        self.ok = True
        self.value: object = []

    def take(self, ok: bool, value: object, last: bool) -> None:
        """One reply: outcomes to add, or the failure of the request; ``last`` settles it."""
        if not ok:
            self.ok, self.value = False, value
        elif self.ok:
            self.value.extend(value)  # type: ignore[union-attr]
        self.done = last

    def settle(self, ok: bool, value: object) -> None:
        self.ok, self.value, self.done = ok, value, True


class ParsePool:
    """One helper process, started by ``start()`` or the first ``submit``.

    ``submit`` and ``collect`` may be called from different threads (an IMAP run submits on
    its fetching thread and collects on its writing thread); replies are matched to tickets
    in the order the requests were sent.
    """

    def __init__(self) -> None:
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn = None
        self._pending: deque[Ticket] = deque()  # sent, reply not read yet; pipe order
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._warm: Ticket | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self, wait: bool = False) -> None:
        """Start the helper (it takes a while to import flanker); ``wait``: until it is up."""
        if self._process is None:
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                # The fork server imports the parser once; each helper forked from it starts warm.
                context.set_forkserver_preload([__name__])
            else:
                context = multiprocessing.get_context("spawn")
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs,), daemon=True,
                                      name="mailferry-parser")
            process.start()
            theirs.close()  # the helper holds the only other end: it sees our exit as EOF
            self._process, self._conn = process, ours
            self._warm = self._submit("raws", [], Limits())  # answered once it is up
        if wait:
            self.collect(self._warm)

    def ready(self) -> bool:
        """True once the helper is up: until then a batch is better parsed here."""
        warm = self._warm
        if warm is None:
            return False
        if not warm.done and self._recv_lock.acquire(blocking=False):
            try:
                while not warm.done and self._conn is not None and self._conn.poll(0):
                    self._receive_one()
            except TransientError:
                return False
            finally:
                self._recv_lock.release()
        return warm.done and warm.ok

    def submit(self, raws: list[bytes], limits: Limits) -> Ticket:
        return self._submit("raws", raws, limits)

    def submit_files(self, paths: list[str], limits: Limits) -> Ticket:
        return self._submit("files", paths, limits)

    def _submit(self, work: str, items: list, limits: Limits) -> Ticket:
        if self._process is None:
            self.start()
        ticket = Ticket()
        with self._send_lock:
            conn = self._conn
            self._pending.append(ticket)  # under the lock: the order of the pipe
            try:
                conn.send((work, items, limits))
            except (OSError, ValueError) as exc:  # ValueError: closed meanwhile
                self._broken(exc)
        return ticket

    def collect(self, ticket: Ticket) -> list[Parsed]:
        with self._recv_lock:
            while not ticket.done:
                self._receive_one()
        if isinstance(ticket.value, TransientError):
            raise ticket.value
        if not ticket.ok:
            raise RuntimeError(f"the parser process failed: {ticket.value}")
        return ticket.value  # type: ignore[return-value]

    def _receive_one(self) -> None:
        """Read one reply into the oldest ticket, and settle it with its last reply (holding
        the receive lock)."""
        try:
            ok, value, last = self._conn.recv()
        except (EOFError, OSError, AttributeError) as exc:  # AttributeError: no pipe any more
            self._broken(exc)
        self._pending[0].take(ok, value, last)
        if last:
            self._pending.popleft()

    def _broken(self, exc: BaseException) -> None:
        """The helper died: fail what it held, forget it (the next submit starts another)."""
        error = TransientError(f"the parser process died: {exc!r}")
        self._stop(error)
        raise error

    def close(self) -> None:
        self._stop(TransientError("the parser process was closed"))

    def _stop(self, error: TransientError) -> None:
        process, conn = self._process, self._conn
        self._process = self._conn = self._warm = None
        while self._pending:
            self._pending.popleft().settle(False, error)
        if conn is not None:
            conn.close()  # the helper reads EOF and leaves
        if process is not None:
            process.join(CLOSE_TIMEOUT)
            if process.is_alive():
                process.kill()
                process.join(CLOSE_TIMEOUT)


class StdlibPool:
    """``ParsePool``'s interface on the standard library's ``ProcessPoolExecutor`` (one
    forkserver worker): kept to measure the hand-made protocol against, as issue #15 asks
    (``MAILFERRY_PARSE_PROCESS=stdlib``; docs/BENCHMARKS.md has the paired runs)."""

    def __init__(self) -> None:
        self._executor = None

    def start(self, wait: bool = False) -> None:
        if self._executor is None:
            from concurrent.futures import ProcessPoolExecutor
            self._executor = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("forkserver"))
        if wait:
            self._executor.submit(worth_a_helper).result()

    def ready(self) -> bool:
        return self._executor is not None

    def submit(self, raws: list[bytes], limits: Limits):
        self.start()
        return self._executor.submit(parse_many, raws, limits)

    def submit_files(self, paths: list[str], limits: Limits):
        self.start()
        return self._executor.submit(parse_files, paths, limits)

    def collect(self, future) -> list[Parsed]:
        try:
            return future.result()
        except Exception as exc:  # BrokenProcessPool: the worker died
            self._executor = None
            raise TransientError(f"parser process failed: {exc!r}") from exc

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
