"""Retention of stored mail (``retention_message_days``; 0, the default, keeps it for ever):
messages, their attachments and unrouted mail received longer ago than that are deleted in
batches, each with an AuditLog row, and then the objects in storage only they referenced.

Rows first, objects after, so no row ever names an object that is gone: a crash in between
leaves objects no row names (the next run deletes them), never the reverse.

Objects go by day (``mailferry.storage``). A writer only ever names keys filed under the day
it writes, and a row is received (``received_at``) after its objects were written: they are
durable before the commit that names them. So once no row received before day D + 2 is left
(a day's margin for a batch that straddles midnight, or a host clock a little off), nothing
references day D's objects and nothing will: the day is deleted whole, a listing and bulk
deletes, with no reference counting and no race with a consumer writing the same bytes
today (today's copy is another key). The objects of duplicates whose rows were refused go
with their day too. Shared keys from before objects were filed by day (``ab/cd/<sha256>``)
are never written again, so a reference check inside the deleting transaction is enough:
one goes when the last row naming it does, by a ``PendingDelete`` row written in that
transaction and removed once the store deleted it (a DELETE that fails is tried again by
the next run, not leaked).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

from mailferry import metrics
from mailferry.config import Settings
from mailferry.contracts import iso_utc
from mailferry.db import translated
from mailferry.db import insert_rows
from mailferry.models import (
    AuditLog, EmailAttachment, EmailMessage, PendingDelete, UnroutedMessage, utcnow,
)
from mailferry.storage import BlobStore
from scheduler.retention import locked, write_transaction

log = logging.getLogger(__name__)

AUDIT_ACTION = "messages_deleted"
MARGIN = dt.timedelta(days=2)  # a day's objects go once no row received before its end + 1 day is left
IN_CHUNK = 500  # keys per IN (…) when shared keys are checked


@dataclass
class MessageRetentionSummary:
    messages: int = 0
    attachments: int = 0
    unrouted: int = 0
    days: list[str] = field(default_factory=list)  # day folders deleted (or due, in a dry run)
    objects: int = 0  # objects deleted
    dry_run: bool = False


def cleanup_messages(settings: Settings, store: BlobStore | None = None, *, dry_run: bool = False,
                     now: dt.datetime | None = None) -> MessageRetentionSummary:
    summary = MessageRetentionSummary(dry_run=dry_run)
    if not settings.retention_message_days:
        return summary
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=settings.retention_message_days)
    store = store or BlobStore.of(settings)
    with translated("message retention"):
        if not dry_run:
            _delete_pending(store, summary)  # what a run before could not
        if dry_run:
            summary.messages = EmailMessage.select().where(EmailMessage.received_at < cutoff).count()
            summary.unrouted = UnroutedMessage.select().where(UnroutedMessage.created_at < cutoff).count()
            summary.days = _days_due(store, cutoff)
            return summary
        while _expire_messages(store, cutoff, settings.retention_batch_size, summary, now):
            pass
        while _expire_unrouted(cutoff, settings.retention_batch_size, summary, now):
            pass
        for day in _days_due(store, cutoff):
            if _received_before(_day_start(day) + MARGIN):
                log.error("retention: rows received before %s remain; day %s kept", cutoff, day)
                break
            deleted = store.delete_day(day)
            metrics.retention_objects_deleted.inc(deleted)
            if deleted:  # a store may list a day it emptied a moment ago (SeaweedFS does)
                summary.objects += deleted
                summary.days.append(day)
    if summary.messages or summary.unrouted or summary.days:
        log.info("retention: deleted %d message(s), %d unrouted, %d object(s) of %d day(s)",
                 summary.messages, summary.unrouted, summary.objects, len(summary.days))
    return summary


def _expire_messages(store: BlobStore, cutoff: dt.datetime, batch_size: int,
                     summary: MessageRetentionSummary, now: dt.datetime) -> bool:
    """One batch, in one transaction: whether there may be more."""
    with write_transaction():
        query = (EmailMessage.select(EmailMessage.id, EmailMessage.user, EmailMessage.raw_path,
                                     EmailMessage.text_path, EmailMessage.html_path,
                                     EmailMessage.size)
                 .where(EmailMessage.received_at < cutoff).order_by(EmailMessage.received_at)
                 .limit(batch_size))  # in the index's order: a backlog costs each batch its own rows
        batch = locked(query)
        if not batch:
            return False
        ids = [m.id for m in batch]
        keys = {key for m in batch for key in m.storage_keys} | {
            a.file_path for a in EmailAttachment.select(EmailAttachment.file_path)
            .where(EmailAttachment.email_message.in_(ids))}
        attachments = EmailAttachment.delete().where(EmailAttachment.email_message.in_(ids)).execute()
        EmailMessage.delete().where(EmailMessage.id.in_(ids)).execute()
        AuditLog.create(action=AUDIT_ACTION, created_at=now, details={
            "kind": "message", "count": len(batch), "attachments": attachments,
            "first_id": min(ids), "last_id": max(ids), "received_before": iso_utc(cutoff),
            "users": len({m.user_id for m in batch}), "bytes": sum(m.size for m in batch)})
        # (A column holding no key of this store names nothing to delete: a row is read as
        # hostile too, and one bad row must not stop retention.)
        shared = {key for key in keys
                  if BlobStore.day_of_key(key) is None and BlobStore.sha256_of_key(key)}
        unreferenced = sorted(shared - _referenced(shared))
        insert_rows(PendingDelete, ("key", "created_at"), [(key, now) for key in unreferenced],
                    skip_duplicates=True)
    summary.messages += len(batch)
    summary.attachments += attachments
    metrics.retention_messages_deleted.labels("message").inc(len(batch))
    _delete_pending(store, summary)  # after the commit: no row ever names a deleted object
    return len(batch) == batch_size


def _delete_pending(store: BlobStore, summary: MessageRetentionSummary) -> None:
    """Delete the objects pending deletion, then their rows; a failure leaves the rows for the
    next run."""
    while keys := [row[0] for row in PendingDelete.select(PendingDelete.key)
                   .order_by(PendingDelete.id).limit(IN_CHUNK).tuples()]:
        store.delete(keys)
        PendingDelete.delete().where(PendingDelete.key.in_(keys)).execute()
        metrics.retention_objects_deleted.inc(len(keys))
        summary.objects += len(keys)


def _expire_unrouted(cutoff: dt.datetime, batch_size: int, summary: MessageRetentionSummary,
                     now: dt.datetime) -> bool:
    """Unrouted mail's raw sources are filed by day: they go with their day."""
    with write_transaction():
        query = (UnroutedMessage.select(UnroutedMessage.id, UnroutedMessage.size)
                 .where(UnroutedMessage.created_at < cutoff).order_by(UnroutedMessage.created_at)
                 .limit(batch_size))
        batch = locked(query)
        if not batch:
            return False
        ids = [u.id for u in batch]
        UnroutedMessage.delete().where(UnroutedMessage.id.in_(ids)).execute()
        AuditLog.create(action=AUDIT_ACTION, created_at=now, details={
            "kind": "unrouted", "count": len(batch), "first_id": min(ids), "last_id": max(ids),
            "received_before": iso_utc(cutoff), "bytes": sum(u.size for u in batch)})
    summary.unrouted += len(batch)
    metrics.retention_messages_deleted.labels("unrouted").inc(len(batch))
    return len(batch) == batch_size


def _referenced(keys: set[str]) -> set[str]:
    """Which of these shared keys a row still names (an attachment, or a body: the same
    bytes may be both)."""
    keys = sorted(keys)
    found: set[str] = set()
    for start in range(0, len(keys), IN_CHUNK):
        chunk = keys[start:start + IN_CHUNK]
        for column in (EmailMessage.text_path, EmailMessage.html_path):
            found |= {row[0] for row in EmailMessage.select(column).where(column.in_(chunk)).tuples()}
        found |= {row[0] for row in EmailAttachment.select(EmailAttachment.file_path)
                  .where(EmailAttachment.file_path.in_(chunk)).tuples()}
    return found


def _days_due(store: BlobStore, cutoff: dt.datetime) -> list[str]:
    return sorted(day for day in store.days() if _day_start(day) + MARGIN <= cutoff)


def _received_before(moment: dt.datetime) -> bool:
    """A last check before a day goes: no row that could name its objects is left."""
    return (EmailMessage.select().where(EmailMessage.received_at < moment).exists()
            or UnroutedMessage.select().where(UnroutedMessage.created_at < moment).exists())


def _day_start(day: str) -> dt.datetime:
    return dt.datetime.strptime(day, "%Y-%m-%d")
