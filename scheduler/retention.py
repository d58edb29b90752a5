"""Retention (the seed's ``cleanup_tasks`` / ``CLEANUP_CONFIG``): ended tasks older than their
status's retention are deleted in batches, each after an AuditLog row that says what it was.

Per batch, one transaction: the audit rows are inserted first, then the tasks' log lines and
the tasks; a failure rolls back both, so no task is deleted without its audit row. The
DELETE repeats the status condition, so nothing that changed meanwhile is touched.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field


from mailferry import metrics
from mailferry.config import Settings
from mailferry.contracts import iso_utc
from mailferry.db import is_postgres, translated
from mailferry.models import AuditLog, EmailTask, TaskLog, TaskStatus, db, utcnow

log = logging.getLogger(__name__)

AUDIT_ACTION = "task_deleted"


@dataclass
class RetentionSummary:
    deleted: dict[str, int] = field(default_factory=dict)  # status -> tasks (would be) deleted
    batches: int = 0
    dry_run: bool = False

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


def retention_days(settings: Settings) -> dict[str, int]:
    return {
        TaskStatus.COMPLETED: settings.retention_completed_days,
        TaskStatus.FAILED: settings.retention_failed_days,
        TaskStatus.CANCELLED: settings.retention_cancelled_days,
        TaskStatus.SKIPPED: settings.retention_cancelled_days,
    }


def _due(status: str, cutoff: dt.datetime):
    # A terminal task always has completed_at; created_at covers rows that somehow lack it.
    return (EmailTask.status == status) & (
        (EmailTask.completed_at < cutoff)
        | (EmailTask.completed_at.is_null() & (EmailTask.created_at < cutoff)))


def write_transaction():
    """The batch is read inside the transaction that deletes it, under the write lock, so two
    cleanups at once (the scheduler and `mailferry cleanup`) never audit one task twice."""
    if is_postgres():
        return db.atomic()  # and SELECT … FOR UPDATE
    return db.atomic(lock_type="IMMEDIATE")  # SQLite: take the write lock before reading


def locked(query) -> list:
    """A batch read inside ``write_transaction``, its rows locked on PostgreSQL (SQLite's write
    lock is the transaction's)."""
    return list(query.for_update() if is_postgres() else query)


def audit_details(task: EmailTask) -> dict:
    """Statistics for every task; error and details too for those that did not complete."""
    details = {
        "task_id": task.task_id, "source": task.email_source, "user_id": task.user_id,
        "status": task.status, "created_at": iso_utc(task.created_at),
        "started_at": iso_utc(task.started_at), "completed_at": iso_utc(task.completed_at),
        "duration_seconds": (round((task.completed_at - task.started_at).total_seconds(), 3)
                             if task.started_at and task.completed_at else None),
        "emails_fetched": task.emails_fetched, "emails_saved": task.emails_saved,
        "emails_failed": task.emails_failed, "emails_processed": task.emails_processed,
    }
    if task.status != TaskStatus.COMPLETED:
        details["error_message"] = task.error_message
        details["details"] = task.details
    return details


def cleanup_tasks(settings: Settings, *, dry_run: bool = False,
                  now: dt.datetime | None = None) -> RetentionSummary:
    now = now or utcnow()
    summary = RetentionSummary(dry_run=dry_run)
    with translated("retention cleanup"):
        for status, days in retention_days(settings).items():
            condition = _due(status, now - dt.timedelta(days=days))
            if dry_run:
                summary.deleted[status] = EmailTask.select().where(condition).count()
                continue
            summary.deleted[status] = _delete_in_batches(
                status, condition, settings.retention_batch_size, summary, now)
    if summary.total and not dry_run:
        log.info("retention: deleted %s", ", ".join(f"{n} {s.lower()}"
                                                     for s, n in summary.deleted.items() if n))
    return summary


def _delete_in_batches(status: str, condition, batch_size: int, summary: RetentionSummary,
                       now: dt.datetime) -> int:
    deleted = 0
    while True:
        with write_transaction():
            query = EmailTask.select().where(condition).order_by(EmailTask.id).limit(batch_size)
            batch = locked(query)
            if not batch:
                break
            AuditLog.insert_many([{"action": AUDIT_ACTION, "details": audit_details(t),
                                   "created_at": now} for t in batch]).execute()
            ids = [t.id for t in batch]
            TaskLog.delete().where(TaskLog.task.in_(ids)).execute()
            count = EmailTask.delete().where(EmailTask.id.in_(ids), EmailTask.status == status).execute()
        deleted += count
        summary.batches += 1
        metrics.retention_deleted.labels(status).inc(count)
        if len(batch) < batch_size:
            break
    return deleted
