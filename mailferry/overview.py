"""What an operator needs at a glance, read from the database and the spool: the figures behind
the scrape-time metrics (mailferry/metrics.py) and `mailferry status`.

Every figure here is the same whichever process reads it, so each process that serves
/metrics may export them; alert rules aggregate with ``max`` rather than ``sum``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass, field
from pathlib import Path

import peewee

from mailferry.errors import TransientError
from mailferry.models import (
    EmailTask, InboundReceipt, MailboxState, SchedulerLease, Settings as SettingsRow, TaskSource, TaskStatus,
    UnroutedMessage, User, db, utcnow,
)
from mailferry.spool import FAILED

# Labels of "last success" by source: the same values as mailferry_emails_total's source.
IMAP = "imap"
SMTP = "smtp"
LEASE_NAME = "scheduler"  # scheduler.lease.DEFAULT_NAME (the core does not import the scheduler)


@dataclass
class Overview:
    tasks: dict[str, dict[str, int]]  # source -> status -> count (every status, zeros too)
    running_past_timeout: int
    failed_last_hour: int
    oldest_pending_seconds: float | None
    # imap: the newest COMPLETED IMAP fetch task; smtp: the newest inbound message handled.
    last_success: dict[str, dt.datetime | None]
    imap_mailboxes: int  # active users with an active email_config
    imap_idle: int  # folders a consumer holds in IDLE now (idle_until ahead)
    unrouted: int
    quarantined: int  # message files in spool/failed
    lease_holder: str | None  # the acting scheduler, if its lease is unexpired
    lease_expires_at: dt.datetime | None
    read_at: dt.datetime = field(default_factory=utcnow)

    def tasks_by_status(self) -> dict[str, int]:
        totals = {status: 0 for status in TaskStatus.ALL}
        for counts in self.tasks.values():
            for status, n in counts.items():
                totals[status] = totals.get(status, 0) + n
        return totals


@contextlib.contextmanager
def own_connection():
    """A database connection for this thread, closed afterwards if it was opened here.

    The metrics server answers each request on a new thread; peewee's connections are
    per thread, so without this every scrape would leave a connection behind.
    """
    opened = db.is_closed()
    if opened:
        db.connect()
    try:
        yield
    finally:
        if opened:
            db.close()


def database_problem() -> str | None:
    """None when the database answers a query, else the reason (for /readyz)."""
    try:
        with own_connection():
            db.execute_sql("SELECT 1")
    except peewee.PeeweeException as exc:
        return f"database unreachable: {str(exc).strip() or type(exc).__name__}"
    return None


def read_overview(spool_dir: Path, now: dt.datetime | None = None) -> Overview:
    """Every figure at once; TransientError if the database cannot be read."""
    now = now or utcnow()
    try:
        with own_connection():
            return _read(spool_dir, now)
    except peewee.PeeweeException as exc:
        raise TransientError(f"database unavailable: {str(exc).strip()}") from exc


def _read(spool_dir: Path, now: dt.datetime) -> Overview:
    tasks = {source: {status: 0 for status in TaskStatus.ALL} for source in TaskSource.ALL}
    query = (EmailTask.select(EmailTask.email_source, EmailTask.status,
                              peewee.fn.COUNT(EmailTask.id))
             .group_by(EmailTask.email_source, EmailTask.status).tuples())
    for source, status, n in query:
        tasks.setdefault(source, {s: 0 for s in TaskStatus.ALL})[status] = n
    past_timeout = EmailTask.select().where(
        EmailTask.status == TaskStatus.RUNNING, EmailTask.timeout_at < now).count()
    failed_hour = EmailTask.select().where(
        EmailTask.status == TaskStatus.FAILED,
        EmailTask.completed_at >= now - dt.timedelta(hours=1)).count()
    oldest_pending = _as_datetime(EmailTask.select(peewee.fn.MIN(EmailTask.created_at))
                                  .where(EmailTask.status == TaskStatus.PENDING).scalar())
    last_imap = _as_datetime(EmailTask.select(peewee.fn.MAX(EmailTask.completed_at)).where(
        EmailTask.email_source == TaskSource.IMAP,
        EmailTask.status == TaskStatus.COMPLETED).scalar())
    last_smtp = _as_datetime(InboundReceipt.select(peewee.fn.MAX(InboundReceipt.created_at)).scalar())
    mailboxes = (SettingsRow.select().join(User)
                 .where(SettingsRow.key == "email_config", SettingsRow.is_active == True,  # noqa: E712
                        User.is_active == True).count())  # noqa: E712
    idle = MailboxState.select().where(MailboxState.idle_until > now).count()
    lease = SchedulerLease.get_or_none(SchedulerLease.name == LEASE_NAME)
    lease_expires = _as_datetime(lease.expires_at) if lease else None
    return Overview(
        tasks=tasks, running_past_timeout=past_timeout, failed_last_hour=failed_hour,
        oldest_pending_seconds=(now - oldest_pending).total_seconds() if oldest_pending else None,
        last_success={IMAP: last_imap, SMTP: last_smtp}, imap_mailboxes=mailboxes, imap_idle=idle,
        unrouted=UnroutedMessage.select().count(), quarantined=quarantined_count(spool_dir),
        lease_holder=lease.holder if lease and lease_expires and lease_expires >= now else None,
        lease_expires_at=lease_expires, read_at=now)


def quarantined_count(spool_dir: Path) -> int:
    """Message files in ``spool/failed`` (their ``.reason`` companions are not counted)."""
    try:
        with os.scandir(Path(spool_dir) / FAILED) as entries:
            return sum(1 for e in entries if e.name.endswith(".eml") and e.is_file())
    except FileNotFoundError:
        return 0


def _as_datetime(value) -> dt.datetime | None:
    """Aggregates come back as strings on SQLite (peewee cannot type MIN/MAX there)."""
    if value is None or isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))


def epoch(value: dt.datetime | None) -> float:
    """Seconds since the epoch of a naive UTC datetime; 0 for None (Prometheus' "never")."""
    return value.replace(tzinfo=dt.timezone.utc).timestamp() if value else 0.0
