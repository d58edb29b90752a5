"""The incremental IMAP sync of one folder: new UIDs since the checkpoint, in batches, each
batch parsed, saved and checkpointed in one transaction.

The checkpoint (``MailboxState``) is UIDVALIDITY + the last UID saved (+ HIGHESTMODSEQ when
the server has CONDSTORE), never a date: ``SEARCH SINCE`` has day granularity and looks at
INTERNALDATE, so it misses mail appended with an old date. Because the checkpoint moves in
the transaction that saved the batch, a crash re-fetches only the batches in flight (at most
three), and the unique (user, message_id) key turns what was saved already into a counted
duplicate.

The server is left exactly as it was (EXAMINE + BODY.PEEK[]) unless the user asked for
``mark_seen`` or ``move_to``; those run only after the batch was committed.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import peewee

from consumer import imap_client
from consumer.imap_client import FolderState, ImapSession
from mailread.parse import Limits, ParsedEmail
from consumer.parse_pool import InProcess, Parsed, ParsePool, worth_a_helper
from consumer.pipeline import PIPELINE_DEPTH, STOP, run_ahead
from consumer.route import Route
from consumer.save import (
    REFUSED, SaveRequest, SaveResult, commit_batch, observe_parse, save_for_users,
    save_many, store_batch,
)
from mailferry import metrics, oauth2, outbox
from mailferry.config import Settings
from mailferry.db import translated
from mailferry.errors import EmailConfigError, EmailFetchError, TransientError
from mailferry.mailbox_config import ImapConfig
from mailferry.models import MailboxState, User, db, utcnow
from mailferry.spool import Spool
from mailferry.storage import BlobStore

log = logging.getLogger(__name__)
SOURCE = "imap"
IN_PROCESS = InProcess()
# A run of this many batches or more is parsed in a helper process (consumer.parse_pool):
# it then costs the helper's start once; a few new messages are parsed here.
HELPER_MIN_BATCHES = 4
# A FETCH literal may be a little larger than RFC822.SIZE said (servers count line ends
# differently); beyond this the announcement is refused before a byte of it is read.
LITERAL_SLACK = 64 * 1024


@dataclass
class Counts:
    fetched: int = 0
    saved: int = 0
    duplicates: int = 0
    failed: int = 0
    kinds: collections.Counter = field(default_factory=collections.Counter)  # (outcome, kind)

    def add(self, other: "Counts") -> None:
        self.fetched += other.fetched
        self.saved += other.saved
        self.duplicates += other.duplicates
        self.failed += other.failed
        self.kinds.update(other.kinds)


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
    connect_seconds: float = 0.0  # of which: connecting and logging in
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)  # UIDs not fetched, with the reason
    action_errors: list[str] = field(default_factory=list)  # after-fetch actions that failed


Progress = Callable[[SyncResult, "Counts | None"], None]


@dataclass
class _Item:
    uid: int
    raw: bytes
    parsed: ParsedEmail
    request: SaveRequest | None = None


@dataclass
class _Batch:
    uids: list[int]
    final: bool  # the last batch of the run: its commit also stores HIGHESTMODSEQ
    present: list[tuple[int, bytes]] = field(default_factory=list)  # (uid, raw) fetched
    parser: object = None  # the parser its parse was handed to
    parsing: object = None  # what that parser's collect() turns into the parsed messages
    items: list[_Item] = field(default_factory=list)  # parsed, to save
    counts: Counts = field(default_factory=Counts)
    keep: list[int] = field(default_factory=list)  # saved or already there: safe to mark/move


@dataclass
class _Run:
    """What one run of one folder works with."""

    session: ImapSession
    config: ImapConfig
    route: Route
    folder: FolderState
    state: MailboxState
    result: SyncResult
    progress: Progress
    where: str
    skip: set[int] = field(default_factory=set)  # UIDs over the size limit: not fetched


class MailboxSync:
    """Syncs one user's folder. One instance per thread; the IMAP session is per run."""

    def __init__(self, settings: Settings, *, store: BlobStore | None = None,
                 spool: Spool | None = None,
                 connect: Callable[[ImapConfig, float], ImapSession] = imap_client.connect,
                 parse_in_helper: bool = True):
        self.settings = settings
        self.batch_size = settings.imap_batch_size
        self.batch_bytes = settings.imap_batch_bytes
        self.limits = Limits.from_settings(settings)
        self.store = store or BlobStore.of(settings)
        self.spool = (spool or Spool(settings.resolved_spool_dir)).ensure()
        self.connect = connect
        self.parse_pool = ParsePool() if parse_in_helper and worth_a_helper() else None
        self.tokens = None  # mailferry.oauth2.TokenSource, made for the first OAuth2 mailbox

    def _login(self, user: User, config: ImapConfig) -> ImapSession:
        """A logged-in session: with the password, or with a live OAuth2 access token."""
        return oauth2.login(self.connect, config, user.id, self._token_source,
                            float(self.settings.imap_timeout))

    def _token_source(self) -> oauth2.TokenSource:
        if self.tokens is None:  # made for the first OAuth2 mailbox
            from mailferry.mailbox_config import EmailConfigManager
            self.tokens = oauth2.TokenSource(EmailConfigManager(self.settings))
        return self.tokens

    def close(self) -> None:
        """Stop the parser helper process, if one was started."""
        if self.parse_pool is not None:
            self.parse_pool.close()

    def folders(self, user: User, config: ImapConfig) -> list[str]:
        """Every folder of the mailbox a fetch of ``"*"`` syncs (``syncable_folders``)."""
        session = self._login(user, config)
        try:
            return session.syncable_folders(skip=[config.move_to] if config.move_to else [])
        finally:
            session.close()

    def run(self, user: User, config: ImapConfig, folder: str | None = None, *,
            keep_going: Callable[[], bool] = lambda: True,
            progress: Progress | None = None, deadline: float | None = None) -> SyncResult:
        """Fetch what is new in ``folder`` (default: the configured one) and save it, within
        ``deadline`` seconds (default: ``imap_fetch_deadline``)."""
        started = time.perf_counter()
        result = SyncResult(folder=folder or config.folder)
        session = _timed(result, lambda: self._login(user, config))
        result.connect_seconds = result.imap_seconds
        session.limit_literals(self.limits.max_message_bytes + LITERAL_SLACK)
        # The read timeout is per read: a server that sends a byte every few seconds passes
        # it forever. The deadline closes the socket under the reader, whatever it waits on.
        deadline = self.settings.imap_fetch_deadline if deadline is None else max(1.0, deadline)
        cut_off = threading.Event()  # set before the socket is closed: the reader may wake first

        def cut() -> None:
            cut_off.set()
            session.abort()

        timer = threading.Timer(deadline, cut)
        timer.daemon = True
        timer.start()
        try:
            self._sync(session, user, config, result, keep_going, progress or (lambda r, d: None))
        except TransientError as exc:
            if cut_off.is_set():
                raise EmailFetchError(f"fetch stopped at its deadline of {deadline:.0f} s "
                                      f"(committed batches are kept): {exc}") from exc
            raise
        finally:
            timer.cancel()
            _timed(result, session.close)
            result.seconds = time.perf_counter() - started
            metrics.imap_fetch_seconds.observe(result.seconds)
        return result

    # -- the steps -------------------------------------------------------------------------

    def _sync(self, session: ImapSession, user: User, config: ImapConfig, result: SyncResult,
              keep_going: Callable[[], bool], progress: Progress) -> None:
        where = f"user={user.id} folder={result.folder}"
        folder = _timed(result, lambda: session.select(result.folder, readonly=not config.changes_server))
        state = checkpoint(user.id, result.folder)
        result.uidvalidity = folder.uidvalidity
        if state.pending_action and state.uidvalidity == folder.uidvalidity and config.changes_server:
            # Stored by an earlier run that ended before its action: done now, not refetched.
            self._act(session, config, state, result, where)
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
            uids = _timed(result, lambda: session.uids_after(last_uid))
        result.new = len(uids)
        progress(result, None)
        if not uids:
            _save_checkpoint(state, folder, last_uid, final=True)
            return
        log.info("%s: %d new message(s) above UID %d", where, len(uids), last_uid)
        run = _Run(session, config, Route(user.id, user.email, None), folder, state, result,
                   progress, where)
        self._fetch_all(run, uids, keep_going)

    def _fetch_all(self, run: _Run, uids: list[int], keep_going: Callable[[], bool]) -> None:
        """Batch by batch, through the stage loop the inbound lane uses
        (``consumer.pipeline.run_ahead``): fetch a batch and start its parse, and while the
        parser process parses the next ones, this thread stores and commits the oldest, in
        order. Fetching and storing mostly wait on sockets and disks; parsing is the
        CPU-bound step, on the other core. A few batches are parsed here instead: a helper
        would cost more to start than it saves.
        """
        sizes = _timed(run.result, lambda: run.session.sizes(uids))
        # Over the size limit: never fetched. The checkpoint still moves past it (it stays in
        # its batch's UIDs), and the task says which UIDs were left on the server and why.
        limit = self.limits.max_message_bytes
        run.skip = {uid for uid, size in sizes.items() if size > limit}
        for uid in sorted(run.skip):
            reason = f"uid={uid} is {sizes[uid]} bytes, over the limit of {limit}: not fetched"
            log.warning("%s %s", run.where, reason)
            run.result.skipped.append(reason)
        chunks = plan_batches(uids, {u: (0 if u in run.skip else n) for u, n in sizes.items()},
                              self.batch_size, self.batch_bytes)
        in_helper = self.parse_pool is not None and len(chunks) >= HELPER_MIN_BATCHES
        if in_helper:
            self.parse_pool.start()  # batches are parsed here until it is up
        planned = enumerate(chunks)

        def take(_wait: bool) -> _Batch | object:
            number, chunk = next(planned, (None, None))
            if chunk is None:
                return STOP
            if number and not keep_going():
                # What is prepared is dropped (``_commit``): nothing more is committed for a
                # cancelled task. The next run fetches it again.
                run.result.cancelled = True
                log.info("%s: stopped after %d batch(es): the task is no longer running",
                         run.where, run.result.batches)
                return STOP
            return _Batch(chunk, final=number == len(chunks) - 1)

        run_ahead(take, lambda batch: self._prepare(run, batch, in_helper),
                  lambda batch: self._commit(run, batch), depth=PIPELINE_DEPTH if in_helper else 0)

    def _prepare(self, run: _Run, batch: _Batch, in_helper: bool) -> _Batch:
        """Fetch the batch and start parsing it."""
        wanted = [uid for uid in batch.uids if uid not in run.skip]
        raw = _timed(run.result, lambda: run.session.fetch_raw(wanted)) if wanted else {}
        batch.present = [(uid, raw[uid]) for uid in wanted if uid in raw]  # others: expunged
        batch.counts.fetched = len(batch.present)
        # In the helper once it is up; until then here.
        batch.parser = self.parse_pool if in_helper and self.parse_pool.ready() else IN_PROCESS
        batch.parsing = batch.parser.submit([data for _, data in batch.present], self.limits)
        return batch

    def _store(self, run: _Run, batch: _Batch, parsed: list[Parsed]) -> None:
        """Quarantine the refused, write the files of the others."""
        for (uid, data), outcome in zip(batch.present, parsed):
            if outcome.email is None:
                self._quarantine(run, uid, data, outcome.error)
                batch.counts.failed += 1
                continue
            observe_parse(outcome.email, outcome.seconds, context=f"{run.where} uid={uid}")
            batch.items.append(_Item(uid, data, outcome.email))
        files = store_batch(self.store, [(i.raw, i.parsed) for i in batch.items],
                            bodies=self.settings.body_storage == "storage")
        for item, stored in zip(batch.items, files):
            item.request = SaveRequest(item.parsed, stored, [run.route], SOURCE)

    def _commit(self, run: _Run, batch: _Batch) -> None:
        """Its files first, then the batch's rows and the checkpoint in one transaction, then
        what the user asked to happen on the server."""
        if run.result.cancelled:
            return
        self._store(run, batch, batch.parser.collect(batch.parsing))
        def kept(outcomes: list) -> list:
            """The outcomes; ``batch.keep`` their UIDs saved or already there (the ones the
            after-fetch action may touch: one the database refused stays where it is)."""
            batch.keep = [item.uid for item, saved in zip(batch.items, outcomes) if saved is not None]
            return outcomes

        outcomes = commit_batch(
            f"{run.where}: committing a batch",
            fast=lambda: kept(_save_fast(batch.items)),
            one_by_one=lambda: kept([self._save_one(run, item) for item in batch.items]),
            then=lambda: _save_checkpoint(run.state, run.folder, batch.uids[-1], final=batch.final,
                                          pending=batch.keep if run.config.changes_server else None))
        for saved in outcomes:
            if saved is None:
                batch.counts.failed += 1
                continue
            batch.counts.saved += len(saved.stored)
            batch.counts.duplicates += saved.duplicates
            batch.counts.kinds["stored", saved.kind] += len(saved.stored)
            batch.counts.kinds["duplicate", saved.kind] += saved.duplicates
        _count(batch.counts)
        run.result.add(batch.counts)
        run.result.batches += 1
        run.result.last_uid = batch.uids[-1]
        self._after_save(run, batch)
        run.progress(run.result, batch.counts)

    def _save_one(self, run: _Run, item: _Item) -> SaveResult | None:
        request = item.request
        try:
            return save_for_users(request.parsed, request.files, request.routes, source=SOURCE)
        except REFUSED as exc:
            # save_for_users' savepoint was rolled back: this message alone is left out.
            self._quarantine(run, item.uid, item.raw, f"cannot save: {exc}")
            return None

    def _after_save(self, run: _Run, batch: _Batch) -> None:
        """What the user asked to happen on the server, only for what is safely stored: the
        checkpoint's ``pending_action`` holds those UIDs from the commit until this is done."""
        if run.config.changes_server:
            self._act(run.session, run.config, run.state, run.result, run.where)

    def _act(self, session: ImapSession, config: ImapConfig, state: MailboxState,
             result: SyncResult, where: str) -> None:
        """Do the pending action on ``state``'s UIDs and clear them; a refusal is logged on
        the result (and so on the task) and left pending for the next run."""
        uids = sorted(set(state.pending_action or []))
        if not uids:
            return
        try:
            if config.mark_seen:
                _timed(result, lambda: session.mark_seen(uids))
            if config.move_to:
                _timed(result, lambda: session.move(uids, config.move_to))
            if config.delete:
                _timed(result, lambda: session.delete(uids))
        except (EmailFetchError, EmailConfigError) as exc:
            reason = f"after-fetch action on {len(uids)} message(s) failed, retried next run: {exc}"
            log.warning("%s: %s", where, reason)
            result.action_errors.append(reason)
            return
        with translated("clearing the pending IMAP action"):
            MailboxState.update(pending_action=[]).where(MailboxState.id == state.id).execute()
        state.pending_action = []

    def _quarantine(self, run: _Run, uid: int, raw: bytes, reason: str) -> None:
        # A name made of the message's place on the server: a re-fetch overwrites, not piles up.
        name = f"imap-{run.route.user_id}-{run.folder.uidvalidity}-{uid}.eml"
        log.warning("%s uid=%d quarantined as spool/failed/%s: %s", run.where, uid, name, reason)
        outbox.write([outbox.NewEvent(outbox.QUARANTINED, name, {
            "source": SOURCE, "user_id": run.route.user_id, "folder": run.folder.name,
            "uid": uid, "file": f"spool/failed/{name}", "reason": reason}, run.route.user_id)])
        try:
            self.spool.quarantine(self.spool.failed / name, reason, raw=raw, name=name)
        except OSError as exc:
            raise TransientError(f"cannot write to spool/failed: {exc.strerror}") from exc


def _timed(result: SyncResult, call):
    """Run ``call``, adding the time to the IMAP wait of ``result``."""
    started = time.perf_counter()
    try:
        return call()
    finally:
        result.imap_seconds += time.perf_counter() - started


def plan_batches(uids: list[int], sizes: dict[int, int], max_count: int,
                 max_bytes: int) -> list[list[int]]:
    """Cut ``uids`` into batches of at most ``max_count`` messages and ``max_bytes`` bytes.

    The byte bound keeps memory flat when a mailbox holds big messages (up to three batches
    are in flight); a message bigger than the bound is a batch of its own.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for uid in uids:
        size = sizes.get(uid, 0)  # gone since the search: fetched as nothing
        if current and (len(current) >= max_count or used + size > max_bytes):
            batches.append(current)
            current, used = [], 0
        current.append(uid)
        used += size
    if current:
        batches.append(current)
    return batches


def _save_fast(items: list[_Item]) -> list[SaveResult]:
    return save_many([item.request for item in items]) if items else []


def _unchanged(state: MailboxState, folder: FolderState, refetch: bool) -> bool:
    """True when HIGHESTMODSEQ proves nothing was added since the last complete run.

    Every change to a CONDSTORE mailbox raises HIGHESTMODSEQ, and the checkpoint stores it
    only when a run got to the end of what it found; so equal means nothing new.
    """
    return (not refetch and folder.highestmodseq is not None
            and state.uidvalidity == folder.uidvalidity
            and state.highestmodseq == folder.highestmodseq)


@translated("reading the IMAP checkpoint")
def checkpoint(user_id: int, folder: str) -> MailboxState:
    """The folder's checkpoint row, made (empty) if it has none yet."""
    state = MailboxState.get_or_none((MailboxState.user == user_id) & (MailboxState.folder == folder))
    if state is None:
        try:
            with db.atomic():
                state = MailboxState.create(user=user_id, folder=folder)
        except peewee.IntegrityError:
            state = MailboxState.get((MailboxState.user == user_id) & (MailboxState.folder == folder))
    return state


def _save_checkpoint(state: MailboxState, folder: FolderState, last_uid: int, *, final: bool,
                     pending: list[int] | None = None) -> None:
    """Move the checkpoint; HIGHESTMODSEQ only with the final batch of a run; ``pending``:
    the batch's stored UIDs whose action is still to do (added to those not yet done)."""
    same_mailbox = state.uidvalidity == folder.uidvalidity
    modseq = folder.highestmodseq if final else (state.highestmodseq if same_mailbox else None)
    values = {"uidvalidity": folder.uidvalidity, "last_uid": last_uid,
              "highestmodseq": modseq, "last_fetch_at": utcnow()}
    if pending is not None:
        values["pending_action"] = sorted(set((state.pending_action or []) if same_mailbox else [])
                                          | set(pending))
    with translated("moving the IMAP checkpoint"):
        MailboxState.update(**values).where(MailboxState.id == state.id).execute()
    for name, value in values.items():
        setattr(state, name, value)


def _count(counts: Counts) -> None:
    for (outcome, kind), number in counts.kinds.items():
        metrics.record(SOURCE, outcome, number, kind)
    metrics.record(SOURCE, "quarantined", counts.failed)
