"""Retention of delivery records (``retention_event_days``, 30 by default; 0 keeps them for
ever): outbox events published longer ago than that, and webhook attempts made longer ago,
are deleted in batches, each with an AuditLog row. Each stored message writes an event and
one attempt or more per endpoint, so without this both tables grow for ever, even with a
message retention set.

An event not yet published is never deleted, whatever its age: the outbox row is the promise
that it will be. Past the retention a webhook event replayed from the dead letters (``mailferry
replay``) finds no attempt that says an endpoint took it, and is POSTed again under its same
id (``webhook-id``), which the application dedups by.

Inbound receipts are kept: a receipt is how the spool sweep knows a record is done, and a
record may wait on the spool of a host that is down for as long as it is down, so deleting
a receipt could store its mail a second time. They are the smallest rows (a queue id).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

import peewee

from mailferry import metrics
from mailferry.config import Settings
from mailferry.db import translated
from mailferry.models import AuditLog, Event, WebhookAttempt, utcnow
from scheduler.retention import locked, write_transaction

log = logging.getLogger(__name__)

AUDIT_ACTION = "events_deleted"


@dataclass
class EventRetentionSummary:
    events: int = 0  # published events deleted (or due, in a dry run)
    attempts: int = 0  # webhook attempts deleted (or due)
    dry_run: bool = False


def _kinds(cutoff: dt.datetime):
    """(kind, model, the condition a row is due by)."""
    return (("event", Event, Event.published_at < cutoff),  # NULL (unpublished) is never < cutoff
            ("webhook_attempt", WebhookAttempt, WebhookAttempt.created_at < cutoff))


def cleanup_events(settings: Settings, *, dry_run: bool = False,
                   now: dt.datetime | None = None) -> EventRetentionSummary:
    summary = EventRetentionSummary(dry_run=dry_run)
    if not settings.retention_event_days:
        return summary
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=settings.retention_event_days)
    counts = {}
    with translated("event retention"):
        for kind, model, due in _kinds(cutoff):
            if dry_run:
                counts[kind] = model.select().where(due).count()
                continue
            counts[kind] = 0
            while (deleted := _expire(kind, model, due, cutoff, settings.retention_batch_size, now)):
                counts[kind] += deleted
                metrics.retention_events_deleted.labels(kind).inc(deleted)
                if deleted < settings.retention_batch_size:
                    break
    summary.events, summary.attempts = counts["event"], counts["webhook_attempt"]
    if not dry_run and (summary.events or summary.attempts):
        log.info("retention: deleted %d published event(s) and %d webhook attempt(s) older than "
                 "%d day(s)", summary.events, summary.attempts, settings.retention_event_days)
    return summary


def _expire(kind: str, model: type[peewee.Model], due, cutoff: dt.datetime, batch_size: int,
            now: dt.datetime) -> int:
    """One batch, in one transaction, with its audit row: how many rows went."""
    with write_transaction():
        ids = [row.id for row in locked(model.select(model.id).where(due)
                                        .order_by(model.id).limit(batch_size))]
        if not ids:
            return 0
        deleted = model.delete().where(model.id.in_(ids) & due).execute()
        AuditLog.create(action=AUDIT_ACTION, created_at=now, details={
            "kind": kind, "count": deleted, "first_id": ids[0], "last_id": ids[-1],
            "before": cutoff.isoformat(timespec="seconds") + "Z"})
    return deleted
