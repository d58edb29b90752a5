"""Retention cleanup on SQLite and PostgreSQL: only what is due goes, in batches, each task
after its audit row, and a failure part-way deletes nothing unaudited."""

from __future__ import annotations

import datetime as dt
import logging

import peewee
import pytest

from mailferry import tasks
from mailferry.errors import TransientError
from mailferry.models import AuditLog, EmailTask, TaskLog, TaskSource, TaskStatus, User, utcnow
from scheduler.retention import AUDIT_ACTION, cleanup_tasks

S = TaskStatus


def ended(status: str, age: dt.timedelta, user=None, error=None, **counts) -> EmailTask:
    """A task that ended ``age`` ago with ``status``."""
    now = utcnow()
    task = EmailTask.create(
        email_source=TaskSource.IMAP, user=user, status=status, created_at=now - age,
        started_at=None if status == S.SKIPPED else now - age - dt.timedelta(seconds=3),
        completed_at=now - age, error_message=error, details={"folder": "INBOX"}, **counts)
    TaskLog.create(task=task, step="status", message=f"→ {status}")
    return task


@pytest.fixture
def population(settings):
    user = User.create(email="ann@example.org")
    day, hour = dt.timedelta(days=1), dt.timedelta(hours=1)
    due = [
        ended(S.COMPLETED, 2 * day, user, emails_fetched=5, emails_saved=4, emails_failed=1),
        ended(S.COMPLETED, 3 * day, user),
        ended(S.COMPLETED, 30 * day, user),
        ended(S.FAILED, 8 * day, user, error="IMAP login refused"),
        ended(S.CANCELLED, 2 * day, user, error="timed out after 600 s"),
        ended(S.SKIPPED, 2 * day, user, error="skipped: task x holds the lock"),
    ]
    kept = [
        ended(S.COMPLETED, 12 * hour, user),
        ended(S.FAILED, 3 * day, user, error="recent failure"),
        ended(S.CANCELLED, hour, user, error="expired before start"),
        ended(S.SKIPPED, hour, user, error="skipped"),
    ]
    old_running = tasks.create_task(TaskSource.IMAP, user.id)
    EmailTask.update(created_at=utcnow() - 40 * day).where(EmailTask.id == old_running.id).execute()
    kept.append(old_running)
    return settings.replace(retention_batch_size=2), due, kept


def test_retention_deletes_only_what_is_due_with_an_audit_row_each(population):
    settings, due, kept = population
    summary = cleanup_tasks(settings)

    assert summary.deleted == {S.COMPLETED: 3, S.FAILED: 1, S.CANCELLED: 1, S.SKIPPED: 1}
    assert summary.batches == 5  # 3 completed in batches of 2, then one batch per other status
    remaining = {t.task_id for t in EmailTask.select()}
    assert remaining == {t.task_id for t in kept}
    assert TaskLog.select().join(EmailTask).count() == TaskLog.select().count() == len(kept) - 1

    audits = {a.details["task_id"]: a for a in AuditLog.select()}
    assert sorted(audits) == sorted(t.task_id for t in due)
    assert {a.action for a in audits.values()} == {AUDIT_ACTION}
    stats = audits[due[0].task_id].details
    assert (stats["status"], stats["emails_fetched"], stats["emails_saved"],
            stats["emails_failed"], stats["user_id"]) == (S.COMPLETED, 5, 4, 1, due[0].user_id)
    assert stats["duration_seconds"] == 3.0 and "error_message" not in stats
    failed = audits[due[3].task_id].details
    assert failed["error_message"] == "IMAP login refused"
    assert failed["details"] == {"folder": "INBOX"}
    assert audits[due[4].task_id].details["error_message"] == "timed out after 600 s"

    assert cleanup_tasks(settings).total == 0  # nothing more is due
    assert AuditLog.select().count() == len(due)


def test_audit_rows_are_written_before_the_delete_in_every_batch(population, caplog):
    settings, due, _ = population
    with caplog.at_level(logging.DEBUG, logger="peewee"):
        cleanup_tasks(settings)
    # peewee logs each statement as (sql, params) on its "peewee" logger.
    statements = [r.msg[0] for r in caplog.records if r.name == "peewee" and isinstance(r.msg, tuple)]
    order = [("audit" if sql.startswith('INSERT INTO "audit_log"') else "delete")
             for sql in statements
             if sql.startswith(('INSERT INTO "audit_log"', 'DELETE FROM "email_task"'))]
    assert order == ["audit", "delete"] * 5, order


def test_a_failure_mid_batch_deletes_nothing_unaudited(population, monkeypatch):
    settings, due, kept = population
    real_delete = EmailTask.delete

    def failing_delete():
        raise peewee.OperationalError("disk I/O error")

    monkeypatch.setattr(EmailTask, "delete", failing_delete)
    with pytest.raises(TransientError, match="retention cleanup"):
        cleanup_tasks(settings)
    monkeypatch.setattr(EmailTask, "delete", real_delete)
    assert EmailTask.select().count() == len(due) + len(kept)
    assert AuditLog.select().count() == 0  # rolled back with the batch it described
    assert TaskLog.select().count() == len(due) + len(kept) - 1


def test_dry_run_counts_and_changes_nothing(population):
    settings, due, kept = population
    summary = cleanup_tasks(settings, dry_run=True)
    assert summary.deleted == {S.COMPLETED: 3, S.FAILED: 1, S.CANCELLED: 1, S.SKIPPED: 1}
    assert EmailTask.select().count() == len(due) + len(kept)
    assert AuditLog.select().count() == 0


def test_retention_periods_are_configurable(population):
    settings, due, kept = population
    summary = cleanup_tasks(settings.replace(retention_failed_days=0, retention_completed_days=60))
    assert summary.deleted == {S.COMPLETED: 0, S.FAILED: 2, S.CANCELLED: 1, S.SKIPPED: 1}
