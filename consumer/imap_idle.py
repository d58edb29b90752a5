"""The IDLE lane: one long-lived IMAP connection per mailbox, and a sync within a second of
its server saying that new mail EXISTS (RFC 2177).

Three kinds of thread, so that no mailbox's slowness is another's:

- the **watcher**, alone in changing a ``Watch``: one selector over every IDLE socket; it
  reads what the servers push (without blocking) and decides when a mailbox is synced,
  renewed or reconnected;
- **connectors** (``imap_idle_connects``): the blocking work of connecting, logging in,
  EXAMINE and IDLE, renewing, closing, and reading the mailbox list;
- **syncers** (``imap_lanes``): the incremental sync the poll runs (``run_fetch_task``), as
  a task of its own under the same (source, user) lock and on the same checkpoint, so the
  poll and IDLE never fetch one mailbox at once and neither fetches what the other stored.

The IDLE connection never fetches: it stays in IDLE while a syncer logs in on a second one.

Reconnecting: each mailbox backs off on its own (1 s doubling to 5 min, jittered; 15 min
after a refused login) and every connection attempt takes a token from one bucket
(``imap_idle_connect_rate`` a second, ``imap_idle_connects`` at once). A server restart that
drops every connection at once is met by a bounded trickle, not a storm. After each
(re)connect the folder's state is compared with the checkpoint, so mail that came while the
connection was down is fetched then, not at the next poll.

Which mailboxes this consumer holds is decided by leases in the database
(``mailferry.idle_leases``), renewed at each reading of the mailbox list: each consumer takes
its fair share (at most ``imap_idle_max``). When a consumer dies its leases expire after
``imap_idle_lease`` seconds and the others take its mailboxes; when it stops, it lets them go
at once.

A connection that covers every folder its mailbox syncs marks its checkpoint
``idle_until`` (renewed with each IDLE): until then the scheduler polls that mailbox only
every ``imap_idle_poll_interval`` seconds, as a safety net.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import queue
import random
import resource
import selectors
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from peewee import chunked

from consumer import imap_client
from consumer.imap_client import ImapSession
from consumer.imap_sync import MailboxSync, checkpoint
from consumer.imap_worker import arm_watchdog, run_fetch_task
from mailferry import broker, idle_leases, metrics, oauth2, tasks
from mailferry.config import Settings
from mailferry.db import translated
from mailferry.errors import EmailConfigError, MailferryError, PermanentError
from mailferry.mailbox_config import (
    EmailConfigManager, ImapConfig, active_imap_configs, validate_imap_config,
)
from mailferry.models import MailboxState, TaskSource, TaskStatus, utcnow

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0  # seconds before the first reconnect; doubles per failure
BACKOFF_MAX = 300.0
REFUSED_RETRY = 900.0  # seconds after a refused login or an unusable configuration
UNSUPPORTED_RETRY = 3600.0  # seconds before asking a server without IDLE again
BUSY_RETRY = 2.0  # seconds before a sync is tried again while another task holds the lock
REFRESH_SECONDS = 30.0  # how often the list of mailboxes is read again
IDLE_GRACE = 300  # seconds idle_until outlives a renewal that should have come
EMPTY_READS = 3  # readable with nothing to read this often in a row: the peer is gone

WAITING, CONNECTING, IDLE, RENEWING, UNSUPPORTED = (
    "waiting", "connecting", "idle", "renewing", "unsupported")


@dataclass(eq=False)
class Watch:
    """One mailbox held in IDLE. Changed only on the watcher thread."""

    user_id: int
    fingerprint: str  # of the stored configuration: a change means a new connection
    folder: str
    marks_idle: bool  # the folder is all the mailbox syncs: idle_until is set on it
    state: str = WAITING
    due: float = 0.0  # WAITING/UNSUPPORTED: when to connect; IDLE: when to renew
    failures: int = 0
    session: ImapSession | None = None
    sock: socket.socket | None = None
    empty_reads: int = 0
    dirty: bool = False  # new mail seen, or the folder ahead of the checkpoint: sync it
    syncing: bool = False
    sync_after: float = 0.0
    gone: bool = False  # dropped from the list: whatever comes back for it is closed


class TokenBucket:
    """``rate`` tokens a second, at most ``rate`` saved up."""

    def __init__(self, rate: float, clock: Callable[[], float]):
        self.rate, self.clock = float(rate), clock
        self.tokens, self.at = float(rate), clock()

    def take(self) -> bool:
        now = self.clock()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self) -> float:
        """Seconds until the next token."""
        now = self.clock()
        tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def backoff(failures: int) -> float:
    """Seconds before reconnect number ``failures`` (1, 2 …): doubling, capped, jittered so
    that mailboxes dropped together do not come back together."""
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 1)) * random.uniform(0.5, 1.0)


def raise_fd_limit() -> int:
    """The soft limit of open files raised to the hard one (a socket per mailbox); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return soft


class IdleLane:
    """``start()`` the threads, ``stop()`` them; ``problem()`` for the readiness check."""

    name = "imap_idle"

    def __init__(self, settings: Settings, *, configs: EmailConfigManager | None = None,
                 connect: Callable[[ImapConfig, float], ImapSession] = imap_client.connect,
                 clock: Callable[[], float] = time.monotonic, refresh: float = REFRESH_SECONDS):
        self.settings = settings
        # Seconds between readings of the mailbox list, which renew this consumer's leases:
        # well inside a lease, so that one late reading never loses them.
        self.refresh = min(refresh, settings.imap_idle_lease / 3)
        self.holder = idle_leases.holder_name()
        self.configs = configs or EmailConfigManager(settings)
        self.connect = connect
        self.clock = clock
        self.watches: dict[int, Watch] = {}
        self._results: queue.Queue = queue.Queue()  # callables for the watcher thread
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._bucket = TokenBucket(settings.imap_idle_connect_rate, clock)
        self._connectors = ThreadPoolExecutor(settings.imap_idle_connects, "idle-connect")
        self._syncers = ThreadPoolExecutor(settings.imap_lanes, "idle-sync")
        self._local = threading.local()  # a syncer's MailboxSync and publisher
        self._syncs: list[tuple] = []  # every syncer's (MailboxSync, Publisher), closed at stop
        self._tokens = None  # mailferry.oauth2.TokenSource, made for the first OAuth2 mailbox
        self._tokens_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loading = False
        self._connecting = 0  # connect jobs submitted and not yet answered
        self._next_load = 0.0
        self._next_gauges = 0.0
        self.crashed: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> "IdleLane":
        raise_fd_limit()
        self._thread = threading.Thread(target=self._run, name="idle-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._connectors.shutdown(wait=True, cancel_futures=True)
        self._syncers.shutdown(wait=True, cancel_futures=True)
        held = [w for w in self.watches.values() if w.session is not None]
        for watch in held:
            _close(watch.session)
        self._clear_idle_until([w for w in held if w.marks_idle])
        try:  # let the mailboxes go at once: another consumer takes them at its next reading
            with translated("letting the IDLE leases go"):
                idle_leases.release(self.holder)
        except MailferryError as exc:
            log.warning("IDLE: could not let the leases go (they expire in %d s): %s",
                        self.settings.imap_idle_lease, exc)
        for sync, publisher in self._syncs:
            sync.close()
            publisher.close()
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def problem(self) -> str | None:
        if self.crashed:
            return self.crashed
        if self._thread is not None and not self._thread.is_alive() and not self._stop.is_set():
            return "the IDLE watcher thread stopped"
        return None

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - say so on /readyz; the process goes on polling
            self.crashed = f"IDLE lane died: {exc!r}"
            log.critical(self.crashed, exc_info=True)

    # -- the watcher -----------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = self.clock()
            if now >= self._next_load and not self._loading:
                self._loading = True
                self._connectors.submit(self._load_job)
            self._connect_due(now)
            self._renew_due(now)
            self._start_syncs(now)
            if now >= self._next_gauges:
                self._gauges()
                self._next_gauges = now + 1.0
            for key, _ in self._selector.select(self._timeout(now)):
                if key.data is None:
                    _drain(self._wake_r)
                else:
                    self._readable(key.data)
            while True:
                try:
                    self._results.get_nowait()()
                except queue.Empty:
                    break

    def _timeout(self, now: float) -> float:
        """Seconds until something is due. A mailbox waiting for a connection slot counts
        only when a slot is free (a finished connect wakes the loop anyway), and one waiting
        for the bucket only when its next token comes: the loop never spins."""
        due = [self._next_gauges] + ([] if self._loading else [self._next_load])
        connecting = self._connecting < self.settings.imap_idle_connects
        for watch in self.watches.values():
            if watch.state == IDLE or (connecting and watch.state in (WAITING, UNSUPPORTED)):
                due.append(watch.due)
            if watch.dirty and not watch.syncing:
                due.append(watch.sync_after)
        soonest = min(due)
        if connecting and soonest <= now:
            soonest = max(soonest, now + self._bucket.wait())
        return min(1.0, max(0.0, soonest - now))

    def _post(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the watcher thread (from a connector or a syncer)."""
        self._results.put(call)
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or stopping

    def _readable(self, watch: Watch) -> None:
        try:
            exists, closed = watch.session.idle_read()
        except MailferryError as exc:
            self._lost(watch, "read", str(exc))
            return
        if exists:
            metrics.imap_idle_wakeups.inc()
            watch.dirty = True
        if not closed:
            watch.empty_reads = 0
            return
        watch.empty_reads += 1
        if watch.empty_reads >= EMPTY_READS:
            self._lost(watch, "read", "the server closed the connection")

    def _lost(self, watch: Watch, kind: str, reason: str) -> None:
        """Connection gone or unusable: closed (on a connector) and reconnected after backoff."""
        metrics.imap_idle_lost.labels(kind).inc()
        self._let_go(watch)
        watch.failures += 1
        delay = REFUSED_RETRY if kind == "auth" else backoff(watch.failures)
        watch.state, watch.due = WAITING, self.clock() + delay
        log.warning("IDLE user=%s folder=%s: %s; reconnecting in %.0f s", watch.user_id,
                    watch.folder, reason, delay)

    def _let_go(self, watch: Watch) -> None:
        """Stop watching the connection and close it (on a connector)."""
        session, watch.session = watch.session, None
        self._unregister(watch)
        if session is not None:
            self._connectors.submit(self._close_job, watch, session)

    def _unregister(self, watch: Watch, *, forget: bool = True) -> None:
        """Stop watching the socket; ``forget``: the connection is going away too."""
        if watch.sock is not None:
            try:
                self._selector.unregister(watch.sock)
            except (KeyError, ValueError):
                pass
            if forget:
                watch.sock = None
        watch.empty_reads = 0

    def _connect_due(self, now: float) -> None:
        for watch in self.watches.values():
            if self._connecting >= self.settings.imap_idle_connects:
                return
            if watch.state in (WAITING, UNSUPPORTED) and watch.due <= now:
                if not self._bucket.take():
                    return
                watch.state = CONNECTING
                self._connecting += 1
                self._connectors.submit(self._connect_job, watch)

    def _renew_due(self, now: float) -> None:
        for watch in self.watches.values():
            if watch.state == IDLE and watch.due <= now:
                self._unregister(watch, forget=False)  # the connector reads DONE's answers
                watch.state = RENEWING
                self._connectors.submit(self._renew_job, watch)

    def _start_syncs(self, now: float) -> None:
        for watch in self.watches.values():
            if watch.dirty and not watch.syncing and watch.sync_after <= now and not watch.gone:
                watch.dirty, watch.syncing = False, True  # new mail during the sync: dirty again
                self._syncers.submit(self._sync_job, watch)

    def _gauges(self) -> None:
        counts = {state: 0 for state in (IDLE, CONNECTING, WAITING, UNSUPPORTED)}
        for watch in self.watches.values():
            state = CONNECTING if watch.state == RENEWING else watch.state
            counts[state] += 1
        for state, number in counts.items():
            metrics.imap_idle_mailboxes.labels(state).set(number)

    # -- results, on the watcher thread ----------------------------------------------------

    def _loaded(self, wanted: dict[int, tuple[str, str, bool]]) -> None:
        self._loading = False
        self._next_load = self.clock() + self.refresh
        for user_id in list(self.watches):
            watch = self.watches[user_id]
            if user_id not in wanted or wanted[user_id][0] != watch.fingerprint:
                self._drop(watch)
        for user_id, (fingerprint, folder, marks_idle) in wanted.items():
            if user_id not in self.watches:
                self.watches[user_id] = Watch(user_id, fingerprint, folder, marks_idle)

    def _load_failed(self) -> None:
        self._loading = False
        self._next_load = self.clock() + self.refresh

    def _drop(self, watch: Watch) -> None:
        del self.watches[watch.user_id]
        watch.gone = True
        self._let_go(watch)

    def _connected(self, watch: Watch, session: ImapSession, sock, behind: bool) -> None:
        self._connecting -= 1
        if watch.gone or self._stop.is_set():
            self._connectors.submit(self._close_job, watch, session)
            return
        watch.session, watch.sock = session, sock
        self._selector.register(sock, selectors.EVENT_READ, watch)
        watch.state, watch.due = IDLE, self.clock() + self.settings.imap_idle_renew
        watch.failures = 0
        watch.dirty = watch.dirty or behind
        log.info("IDLE user=%s folder=%s: holding", watch.user_id, watch.folder)

    def _renewed(self, watch: Watch, exists: bool) -> None:
        if watch.gone or watch.session is None:
            return
        self._selector.register(watch.sock, selectors.EVENT_READ, watch)
        watch.state, watch.due = IDLE, self.clock() + self.settings.imap_idle_renew
        watch.dirty = watch.dirty or exists

    def _connect_failed(self, watch: Watch, kind: str, reason: str) -> None:
        self._connecting -= 1
        self._failed(watch, kind, reason)

    def _failed(self, watch: Watch, kind: str, reason: str) -> None:
        if not watch.gone:
            self._lost(watch, kind, reason)

    def _unsupported(self, watch: Watch) -> None:
        self._connecting -= 1
        watch.state, watch.due = UNSUPPORTED, self.clock() + UNSUPPORTED_RETRY
        log.warning("IDLE user=%s: the server does not offer IDLE; polled as usual, asked again "
                    "in %.0f min", watch.user_id, UNSUPPORTED_RETRY / 60)

    def _synced(self, watch: Watch, busy: bool) -> None:
        watch.syncing = False
        if busy:
            watch.dirty, watch.sync_after = True, self.clock() + BUSY_RETRY

    # -- jobs, on connectors and syncers ---------------------------------------------------

    def _load_job(self) -> None:
        try:
            wanted = self._wanted()
        except Exception as exc:  # noqa: BLE001 - a database outage: keep what is held, try again
            log.warning("IDLE: cannot read the mailbox list: %s", exc)
            self._post(self._load_failed)
            return
        self._post(lambda: self._loaded(wanted))

    def _wanted(self) -> dict[int, tuple[str, str, bool]]:
        """{user id: (fingerprint, folder, marks_idle)} of the IDLE mailboxes this consumer
        holds the lease of: its share of them (``mailferry.idle_leases``)."""
        wanted = {}
        with translated("reading the IDLE mailboxes"):
            for user_id, raw in active_imap_configs():
                try:
                    config = validate_imap_config(raw)
                except EmailConfigError:
                    continue  # the poll reports it on its task
                if config.wants_idle(self.settings.imap_idle):
                    fingerprint = hashlib.sha256(json.dumps(raw, sort_keys=True, default=str)
                                                 .encode()).hexdigest()
                    wanted[user_id] = (fingerprint, config.idle_folder, config.idle_covers_all)
            leases = idle_leases.balance(self.holder, list(wanted), seconds=self.settings.imap_idle_lease,
                                         limit=self.settings.imap_idle_max)
        if leases.taken or leases.released:
            log.info("IDLE: %d mailboxes held (%d taken, %d let go; %d consumers share %d)",
                     len(leases.held), leases.taken, leases.released, leases.holders, len(wanted))
        return {user_id: wanted[user_id] for user_id in leases.held}

    def _connect_job(self, watch: Watch) -> None:
        session = None
        try:
            session = self._login(watch.user_id)
            if not session.has_idle:
                _close(session)
                self._post(lambda: self._unsupported(watch))
                return
            folder = session.select(watch.folder, readonly=True)
            behind = _behind(checkpoint(watch.user_id, watch.folder), folder)
            sock = session.idle_start()
            if watch.marks_idle:
                self._mark_idle_until(watch)
        except Exception as exc:  # noqa: BLE001 - whatever it was, this mailbox backs off
            if session is not None:
                _close(session)
            kind = "auth" if isinstance(exc, PermanentError) else "connect"
            if not isinstance(exc, MailferryError):
                log.exception("IDLE user=%s: unexpected error while connecting", watch.user_id)
            self._post(functools.partial(self._connect_failed, watch, kind, str(exc)))
            return
        self._post(lambda: self._connected(watch, session, sock, behind))

    def _renew_job(self, watch: Watch) -> None:
        try:
            exists = watch.session.idle_renew()
            if watch.marks_idle:
                self._mark_idle_until(watch)
        except Exception as exc:  # noqa: BLE001
            self._post(functools.partial(self._failed, watch, "renew", str(exc)))
            return
        self._post(lambda: self._renewed(watch, exists))

    def _close_job(self, watch: Watch, session: ImapSession) -> None:
        _close(session)
        if watch.marks_idle:
            self._clear_idle_until([watch])

    def _sync_job(self, watch: Watch) -> None:
        busy = False
        try:
            busy = not self._sync(watch)
        except Exception:  # noqa: BLE001 - the task records what it can; the next EXISTS retries
            log.exception("IDLE user=%s: sync failed", watch.user_id)
        finally:
            self._post(lambda: self._synced(watch, busy))

    def _sync(self, watch: Watch) -> bool:
        """One fetch task for the mailbox, as the poll would run it; False when another task
        holds its lock (tried again shortly: that one may have searched before the mail came)."""
        if tasks.lock_holder(TaskSource.IMAP, watch.user_id):
            return False
        task = tasks.create_task(TaskSource.IMAP, watch.user_id,
                                 timeout_seconds=self.settings.task_timeout,
                                 details={"folder": watch.folder, "trigger": "idle"})
        if task.status == TaskStatus.SKIPPED:
            return False
        task = tasks.start_task(task.task_id)
        if task is None:
            return True  # cancelled before it started
        local = self._thread_local()
        arm_watchdog(local.publisher, task)
        run_fetch_task(task, watch.folder, sync=local.sync, configs=self.configs,
                       attempt_deadline=self.settings.imap_fetch_deadline)
        return True

    def _thread_local(self):
        local = self._local
        if not hasattr(local, "sync"):
            local.sync = MailboxSync(self.settings)
            local.publisher = broker.Publisher(self.settings)
            self._syncs.append((local.sync, local.publisher))
        return local

    def _login(self, user_id: int) -> ImapSession:
        return oauth2.login(self.connect, self.configs.get_imap_config(user_id), user_id,
                            self._token_source, float(self.settings.imap_timeout))

    def _token_source(self) -> oauth2.TokenSource:
        with self._tokens_lock:  # connectors log in at once
            if self._tokens is None:  # made for the first OAuth2 mailbox
                self._tokens = oauth2.TokenSource(self.configs)
            return self._tokens

    def _mark_idle_until(self, watch: Watch) -> None:
        until = utcnow() + dt.timedelta(seconds=self.settings.imap_idle_renew + IDLE_GRACE)
        with translated("marking an IDLE checkpoint"):
            (MailboxState.update(idle_until=until)
             .where(MailboxState.user == watch.user_id, MailboxState.folder == watch.folder)
             .execute())

    def _clear_idle_until(self, watches: list[Watch]) -> None:
        """One UPDATE per 500 mailboxes: a stop lets go of all of them at once."""
        try:
            with translated("clearing IDLE checkpoints"):
                for chunk in chunked([w.user_id for w in watches], 500):
                    (MailboxState.update(idle_until=None)
                     .where(MailboxState.user.in_(chunk), MailboxState.idle_until.is_null(False))
                     .execute())
        except MailferryError as exc:  # idle_until runs out by itself within IDLE_GRACE
            log.warning("IDLE: cannot clear idle_until: %s", exc)


def _behind(state: MailboxState, folder) -> bool:
    """True when the folder may hold what the checkpoint has not seen (or an action is due)."""
    if state.uidvalidity != folder.uidvalidity or state.pending_action:
        return True
    if folder.highestmodseq is not None and state.highestmodseq is not None:
        return folder.highestmodseq != state.highestmodseq
    return folder.uidnext is None or folder.uidnext > state.last_uid + 1


def _close(session: ImapSession) -> None:
    """Drop the connection without waiting for the server: the socket is closed."""
    try:
        session.client.shutdown()
    except Exception:  # noqa: BLE001 - already gone
        pass


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass
