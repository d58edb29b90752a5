"""The incremental IMAP sync of one folder: new UIDs since the checkpoint, in batches, each
batch parsed, saved and checkpointed in one transaction.

The checkpoint (``MailboxState``) is UIDVALIDITY + the last UID saved (+ HIGHESTMODSEQ when
the server has CONDSTORE), never a date: ``SEARCH SINCE`` has day granularity and looks at
INTERNALDATE, so it misses mail appended with an old date. Because the checkpoint moves in
the transaction that saved the batch, a crash re-fetches at most one batch, and the unique
(user, message_id) key turns what was saved already into a counted duplicate.

The server is left exactly as it was (EXAMINE + BODY.PEEK[]) unless the user asked for
``mark_seen`` or ``move_to``; those run only after the batch was committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import peewee

from consumer import imap_client
from consumer.imap_client import FolderState, ImapSession
from consumer.parse import Limits, ParsedEmail
from consumer.route import Route
from consumer.save import StoredFiles, parse_and_store, save_for_users
from mailferry import metrics
from mailferry.config import Settings
from mailferry.errors import EmailParseError, TransientError
from mailferry.mailbox_config import ImapConfig
from mailferry.models import MailboxState, User, db, utcnow
from mailferry.spool import Spool
from mailferry.storage import BlobStore

log = logging.getLogger(__name__)
SOURCE = "imap"


@dataclass
class Counts:
    fetched: int = 0
    saved: int = 0
    duplicates: int = 0
    failed: int = 0

    def add(self, other: "Counts") -> None:
        self.fetched += other.fetched
        self.saved += other.saved
        self.duplicates += other.duplicates
        self.failed += other.failed


@dataclass
class SyncResult(Counts):
    folder: str = ""
    uidvalidity: int | None = None
    new: int = 0  # UIDs above the checkpoint when the run started
    batches: int = 0
    refetch: bool = False  # UIDVALIDITY changed: the whole folder was fetched again
    cancelled: bool = False  # stopped between batches because keep_going() said so
    last_uid: int = 0
    imap_seconds: float = 0.0  # time spent waiting for the server
    seconds: float = 0.0


Progress = Callable[[SyncResult, "Counts | None"], None]


@dataclass
class _Batch:
    uids: list[int]
    counts: Counts = field(default_factory=Counts)
    keep: list[int] = field(default_factory=list)  # saved or already there: safe to mark/move


class MailboxSync:
    """Syncs one user's folder. One instance per thread; the IMAP session is per run."""

    def __init__(self, settings: Settings, *, store: BlobStore | None = None,
                 spool: Spool | None = None,
                 connect: Callable[[ImapConfig, float], ImapSession] = imap_client.connect):
        self.settings = settings
        self.batch_size = settings.imap_batch_size
        self.limits = Limits.from_settings(settings)
        self.store = store or BlobStore(settings.resolved_storage_dir)
        self.spool = (spool or Spool(settings.resolved_spool_dir)).ensure()
        self.connect = connect

    def run(self, user: User, config: ImapConfig, folder: str | None = None, *,
            keep_going: Callable[[], bool] = lambda: True,
            progress: Progress | None = None) -> SyncResult:
        """Fetch what is new in ``folder`` (default: the configured one) and save it."""
        started = time.perf_counter()
        result = SyncResult(folder=folder or config.folder)
        session = self._timed(result, lambda: self.connect(config, float(self.settings.imap_timeout)))
        try:
            self._sync(session, user, config, result, keep_going, progress or (lambda r, d: None))
        finally:
            self._timed(result, session.close)
            result.seconds = time.perf_counter() - started
            metrics.imap_fetch_seconds.observe(result.seconds)
        return result

    # -- the steps -------------------------------------------------------------------------

    def _sync(self, session: ImapSession, user: User, config: ImapConfig, result: SyncResult,
              keep_going: Callable[[], bool], progress: Progress) -> None:
        where = f"user={user.id} folder={result.folder}"
        folder = self._timed(result, lambda: session.select(result.folder, readonly=not config.changes_server))
        state = _checkpoint(user.id, result.folder)
        result.uidvalidity = folder.uidvalidity
        last_uid = state.last_uid
        if state.uidvalidity != folder.uidvalidity:
            if state.uidvalidity is not None:
                log.warning("%s: UIDVALIDITY changed from %s to %s: fetching the folder again "
                            "(messages already stored are not stored twice)",
                            where, state.uidvalidity, folder.uidvalidity)
                result.refetch = True
            last_uid = 0
        result.last_uid = last_uid

        if _unchanged(state, folder, result.refetch):
            uids: list[int] = []  # HIGHESTMODSEQ as at the end of the last complete run
        else:
            uids = self._timed(result, lambda: session.uids_after(last_uid))
        result.new = len(uids)
        progress(result, None)
        if not uids:
            _save_checkpoint(state, folder, last_uid, final=True)
            return

        log.info("%s: %d new message(s) above UID %d", where, len(uids), last_uid)
        batches = [uids[i:i + self.batch_size] for i in range(0, len(uids), self.batch_size)]
        route = Route(user.id, user.email, None)
        for number, uids_in_batch in enumerate(batches):
            if number and not keep_going():
                result.cancelled = True
                log.info("%s: stopped after %d batch(es): the task is no longer running",
                         where, number)
                return
            batch = _Batch(uids_in_batch)
            raw = self._timed(result, lambda: session.fetch_raw(uids_in_batch))
            self._save_batch(batch, raw, route, state, folder, final=number == len(batches) - 1,
                             where=where)
            result.add(batch.counts)
            result.batches += 1
            result.last_uid = uids_in_batch[-1]
            self._after_save(session, config, batch, result)
            progress(result, batch.counts)

    def _save_batch(self, batch: _Batch, raw: dict[int, bytes], route: Route,
                    state: MailboxState, folder: FolderState, *, final: bool, where: str) -> None:
        prepared: list[tuple[int, bytes, ParsedEmail, StoredFiles]] = []
        counts = batch.counts
        for uid in batch.uids:
            data = raw.get(uid)
            if data is None:
                continue  # expunged between SEARCH and FETCH
            counts.fetched += 1
            try:
                parsed, files = parse_and_store(self.store, data, self.limits,
                                                context=f"{where} uid={uid}")
            except EmailParseError as exc:
                self._quarantine(route.user_id, folder, uid, data, str(exc), where)
                counts.failed += 1
                continue
            prepared.append((uid, data, parsed, files))
        try:
            with db.atomic():
                for uid, data, parsed, files in prepared:
                    try:
                        saved = save_for_users(parsed, files, [route], source=SOURCE)
                    except peewee.OperationalError:
                        raise
                    except (peewee.PeeweeException, ValueError) as exc:
                        # A value the database refuses (PostgreSQL: a NUL in text): this
                        # message alone; save_for_users' savepoint was rolled back.
                        self._quarantine(route.user_id, folder, uid, data, f"cannot save: {exc}", where)
                        counts.failed += 1
                        continue
                    counts.saved += len(saved.stored)
                    counts.duplicates += saved.duplicates
                    batch.keep.append(uid)
                _save_checkpoint(state, folder, batch.uids[-1], final=final)
        except peewee.OperationalError as exc:
            raise TransientError(f"{where}: database commit failed: {exc}") from exc
        _count(counts)

    def _after_save(self, session: ImapSession, config: ImapConfig, batch: _Batch,
                    result: SyncResult) -> None:
        """What the user asked to happen on the server, only for what is safely stored."""
        if config.mark_seen:
            self._timed(result, lambda: session.mark_seen(batch.keep))
        if config.move_to:
            self._timed(result, lambda: session.move(batch.keep, config.move_to))

    def _quarantine(self, user_id: int, folder: FolderState, uid: int, raw: bytes,
                    reason: str, where: str) -> None:
        # A name made of the message's place on the server: a re-fetch overwrites, not piles up.
        name = f"imap-{user_id}-{folder.uidvalidity}-{uid}.eml"
        log.warning("%s uid=%d quarantined as spool/failed/%s: %s", where, uid, name, reason)
        try:
            self.spool.quarantine(self.spool.failed / name, reason, raw=raw, name=name)
        except OSError as exc:
            raise TransientError(f"cannot write to spool/failed: {exc.strerror}") from exc

    @staticmethod
    def _timed(result: SyncResult, call):
        started = time.perf_counter()
        try:
            return call()
        finally:
            result.imap_seconds += time.perf_counter() - started


def _unchanged(state: MailboxState, folder: FolderState, refetch: bool) -> bool:
    """True when HIGHESTMODSEQ proves nothing was added since the last complete run.

    Every change to a CONDSTORE mailbox raises HIGHESTMODSEQ, and the checkpoint stores it
    only when a run got to the end of what it found; so equal means nothing new.
    """
    return (not refetch and folder.highestmodseq is not None
            and state.uidvalidity == folder.uidvalidity
            and state.highestmodseq == folder.highestmodseq)


def _checkpoint(user_id: int, folder: str) -> MailboxState:
    try:
        state = MailboxState.get_or_none((MailboxState.user == user_id) & (MailboxState.folder == folder))
        if state is None:
            try:
                with db.atomic():
                    state = MailboxState.create(user=user_id, folder=folder)
            except peewee.IntegrityError:
                state = MailboxState.get((MailboxState.user == user_id) & (MailboxState.folder == folder))
        return state
    except peewee.OperationalError as exc:
        raise TransientError(f"database unavailable: {exc}") from exc


def _save_checkpoint(state: MailboxState, folder: FolderState, last_uid: int, *, final: bool) -> None:
    """Move the checkpoint; HIGHESTMODSEQ only with the final batch of a run."""
    same_mailbox = state.uidvalidity == folder.uidvalidity
    modseq = folder.highestmodseq if final else (state.highestmodseq if same_mailbox else None)
    values = {"uidvalidity": folder.uidvalidity, "last_uid": last_uid,
              "highestmodseq": modseq, "last_fetch_at": utcnow()}
    try:
        MailboxState.update(**values).where(MailboxState.id == state.id).execute()
    except peewee.OperationalError as exc:
        raise TransientError(f"database unavailable: {exc}") from exc
    for name, value in values.items():
        setattr(state, name, value)


def _count(counts: Counts) -> None:
    for outcome, number in (("stored", counts.saved), ("duplicate", counts.duplicates),
                            ("quarantined", counts.failed)):
        if number:
            metrics.emails.labels(SOURCE, outcome).inc(number)
    if counts.saved:
        metrics.last_success.labels(SOURCE).set_to_current_time()
