"""The EmailTask state machine: create, start, finish, log and count fetch tasks.

    PENDING ─► RUNNING ─► COMPLETED | FAILED | CANCELLED
    PENDING ─► CANCELLED                    lock collision ─► a new SKIPPED task

Every transition is one conditional UPDATE (``… WHERE status IN (allowed sources)``): when a
worker finishing and a watchdog cancelling race, the database picks exactly one winner and
the loser sees ``False``. The per-(source, user) lock is the task row's unique ``lock_key``,
set while PENDING/RUNNING and cleared in the same UPDATE that ends the task.

peewee errors are translated here: a locked or unreachable database is a TransientError.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import uuid
import weakref
from dataclasses import dataclass
from typing import Iterable

import peewee

from mailferry import metrics, outbox
from mailferry.contracts import TaskRef
from mailferry.db import translated
from mailferry.errors import InvalidTransition, PermanentError, TransientError
from mailferry.models import EmailTask, TaskLog, TaskSource, TaskStatus, db, utcnow

log = logging.getLogger(__name__)

S = TaskStatus

# target status -> statuses it may be reached from. SKIPPED is never a transition: a
# collision creates a new task that is SKIPPED from birth.
ALLOWED_SOURCES: dict[str, tuple[str, ...]] = {
    S.RUNNING: (S.PENDING,),
    S.COMPLETED: (S.RUNNING,),
    S.FAILED: (S.RUNNING,),
    S.CANCELLED: (S.PENDING, S.RUNNING),
}

LOG_KEEP = 200  # execution-log lines kept per task (the newest)
LOG_MESSAGE_MAX = 4_000  # characters of one log line
ERROR_MESSAGE_MAX = 4_000
DEFAULT_TIMEOUT = 600  # seconds, the column default
INSERT_CHUNK = 500  # rows per INSERT: well under SQLite's limit of bound variables
COUNTERS = ("emails_fetched", "emails_saved", "emails_failed", "emails_processed")
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def lock_key(source: str, user_id: int | None) -> str:
    """The value of ``EmailTask.lock_key`` while a task of (source, user) is live."""
    return f"{source}:{'-' if user_id is None else int(user_id)}"


def _db_errors(func):
    """A locked or unreachable database is worth retrying; say so in our own terms."""
    return functools.wraps(func)(translated(func.__name__)(func))


# -- creating ----------------------------------------------------------------------------------

@_db_errors
def create_task(source: str, user_id: int | None, *, timeout_seconds: int | None = None,
                details: dict | None = None) -> EmailTask:
    """A new PENDING task holding the (source, user) lock.

    If another PENDING/RUNNING task holds that lock, the result is a new SKIPPED task whose
    ``error_message`` (and log) names the holder; check ``task.status``.
    """
    if source not in TaskSource.ALL:
        raise PermanentError(f"unknown task source {source!r}; one of {', '.join(TaskSource.ALL)}")
    timeout = int(timeout_seconds or DEFAULT_TIMEOUT)
    key = lock_key(source, user_id)
    for _ in range(3):
        try:
            with db.atomic():  # a savepoint: the collision must not abort an outer transaction
                return EmailTask.create(email_source=source, user=user_id, lock_key=key,
                                        timeout_seconds=timeout, details=details or {})
        except peewee.IntegrityError:
            holder = EmailTask.get_or_none(EmailTask.lock_key == key)
            if holder is None:
                continue  # the holder ended between our insert and the look-up: try again
            return _create_skipped(source, user_id, timeout, details, holder)
    raise TransientError(f"cannot take the task lock {key}: it changes hands too fast")


@_db_errors
def lock_holder(source: str, user_id: int | None) -> str | None:
    """The task id holding the (source, user) lock, or None when it is free."""
    row = (EmailTask.select(EmailTask.task_id)
           .where(EmailTask.lock_key == lock_key(source, user_id)).tuples().first())
    return row[0] if row else None


@dataclass(frozen=True)
class NewTask:
    """What ``create_many`` made for one user: a PENDING task to publish, or a SKIPPED one."""

    task_id: str
    user_id: int | None
    status: str
    details: dict


@_db_errors
def create_many(source: str, items: Iterable[tuple[int | None, dict]], *,
                timeout_seconds: int | None = None, chunk_size: int = INSERT_CHUNK) -> list[NewTask]:
    """``create_task`` for many users at once: one read of the live locks, chunked inserts.

    A user whose lock is held gets a SKIPPED task naming the holder. If another process takes
    a lock between the read and an insert, that chunk falls back to ``create_task`` row by row,
    so the database's unique lock_key still decides.
    """
    if source not in TaskSource.ALL:
        raise PermanentError(f"unknown task source {source!r}; one of {', '.join(TaskSource.ALL)}")
    timeout = int(timeout_seconds or DEFAULT_TIMEOUT)
    holders = {key: (task_id, status) for key, task_id, status in
               EmailTask.select(EmailTask.lock_key, EmailTask.task_id, EmailTask.status)
               .where(EmailTask.email_source == source, EmailTask.status.in_(S.ACTIVE),
                      EmailTask.lock_key.is_null(False)).tuples()}  # the (source, status) index
    now = utcnow()
    rows, made = [], []
    for user_id, details in items:
        key, task_id = lock_key(source, user_id), new_task_id()
        row = {"task_id": task_id, "email_source": source, "user": user_id, "created_at": now,
               "timeout_seconds": timeout, "status": S.PENDING, "lock_key": key,
               "details": details or {}, "error_message": None, "completed_at": None}
        holder = holders.get(key)
        if holder is not None:
            row.update(status=S.SKIPPED, lock_key=None, completed_at=now,
                       error_message=skip_reason(*holder),
                       details={**(details or {}), "lock_holder": holder[0]})
        else:
            holders[key] = (task_id, S.PENDING)  # the same user twice in items
        rows.append(row)
        made.append(NewTask(task_id, user_id, row["status"], row["details"]))
    for start in range(0, len(rows), chunk_size):
        chunk = rows[start:start + chunk_size]
        try:
            with db.atomic():
                EmailTask.insert_many(chunk).execute()
        except peewee.IntegrityError:
            for offset, row in enumerate(chunk):
                task = create_task(source, row["user"], timeout_seconds=timeout,
                                   details=row["details"])
                made[start + offset] = NewTask(task.task_id, row["user"], task.status, task.details)
            continue
        skipped = sum(1 for row in chunk if row["status"] == S.SKIPPED)
        if skipped:
            metrics.task_transitions.labels(source, S.SKIPPED).inc(skipped)
    return made


def skip_reason(holder_task_id: str, holder_status: str) -> str:
    return f"skipped: task {holder_task_id} ({holder_status}) holds the lock for this mailbox"


def _create_skipped(source, user_id, timeout, details, holder: EmailTask) -> EmailTask:
    reason = skip_reason(holder.task_id, holder.status)
    now = utcnow()
    with db.atomic():
        task = EmailTask.create(
            email_source=source, user=user_id, status=S.SKIPPED, lock_key=None,
            timeout_seconds=timeout, details={**(details or {}), "lock_holder": holder.task_id},
            error_message=reason, completed_at=now)
        TaskLog.create(task=task.id, step="lock", message=reason, level="WARNING")
    metrics.task_transitions.labels(source, S.SKIPPED).inc()
    log.info("task=%s source=%s user=%s %s", task.task_id, source, user_id, reason)
    return task


# -- transitions -------------------------------------------------------------------------------

@_db_errors
def start_task(task_id: str) -> EmailTask | None:
    """PENDING → RUNNING, setting started_at and timeout_at; None if no longer PENDING."""
    task = EmailTask.get_or_none(EmailTask.task_id == task_id)
    if task is None or task.status != S.PENDING:
        return None
    now = utcnow()
    # timeout_seconds never changes after creation, so computing timeout_at from the row read
    # above is safe; the status condition is what decides.
    timeout_at = now + dt.timedelta(seconds=task.timeout_seconds)
    with db.atomic():
        changed = (EmailTask.update(status=S.RUNNING, started_at=now, timeout_at=timeout_at)
                   .where(EmailTask.task_id == task_id, EmailTask.status == S.PENDING)
                   .execute())
        if not changed:
            return None
        _log(task.id, "status", f"PENDING → RUNNING (timeout {task.timeout_seconds} s)")
    metrics.task_transitions.labels(task.email_source, S.RUNNING).inc()
    task.status, task.started_at, task.timeout_at = S.RUNNING, now, timeout_at
    return task


@_db_errors
def update_status(task_id: str, new_status: str, *, error_message: str | None = None,
                  details: dict | None = None, only_from: tuple[str, ...] | None = None,
                  **counters: int) -> bool:
    """Move a task to ``new_status`` in one conditional UPDATE.

    True: this call made the change. False: the task had already ended (COMPLETED, FAILED,
    CANCELLED, SKIPPED) — someone else decided its outcome, e.g. the watchdog; the caller
    stops and must not try to overwrite it. Raises InvalidTransition for an unknown task or
    status, or a change the graph does not allow from a live state (PENDING → COMPLETED).
    ``counters`` set emails_fetched/saved/failed/processed (the ``emails_`` may be left off).
    ``only_from`` narrows the allowed sources (the watchdog cancels only RUNNING tasks); a task
    in another live state is then left alone and the answer is False.
    """
    sources = ALLOWED_SOURCES.get(new_status)
    if sources is None:
        raise InvalidTransition(f"task {task_id}: cannot move to {new_status!r}; allowed targets "
                                f"are {', '.join(ALLOWED_SOURCES)}")
    narrowed = sources if only_from is None else tuple(s for s in sources if s in only_from)
    if new_status == S.RUNNING:
        return start_task(task_id) is not None
    values = _terminal_values(new_status, error_message, details, counters)
    for _ in range(3):
        with db.atomic():
            changed = (EmailTask.update(**values)
                       .where(EmailTask.task_id == task_id, EmailTask.status.in_(narrowed))
                       .execute())
            row = (EmailTask.select(EmailTask.id, EmailTask.status, EmailTask.email_source,
                                    EmailTask.started_at, EmailTask.user)
                   .where(EmailTask.task_id == task_id).first())
            if row is None:
                raise InvalidTransition(f"task {task_id}: no such task")
            if changed:
                text = f"→ {new_status}" + (f": {error_message}" if error_message else "")
                _log(row.id, "status", text, _level_for(new_status))
                if new_status == S.FAILED:
                    outbox.add([outbox.NewEvent(outbox.TASK_FAILED, task_id, {
                        "task_id": task_id, "source": row.email_source, "user_id": row.user_id,
                        "error": error_message or ""}, row.user_id)])
        if changed:
            _observe_end(task_id, row, new_status, values["completed_at"], error_message)
            return True
        if row.status in S.TERMINAL:
            log.info("task=%s already %s; %s not applied", task_id, row.status, new_status)
            return False
        if row.status not in sources:
            raise InvalidTransition(f"task {task_id}: {row.status} → {new_status} is not allowed")
        if row.status not in narrowed:
            return False  # live, allowed by the graph, but not what the caller asked to end
        # The row reached an allowed state between the UPDATE and the read: decide again.
    raise TransientError(f"task {task_id}: status keeps changing, {new_status} not applied")


def _terminal_values(new_status: str, error_message, details, counters: dict) -> dict:
    values: dict = {"status": new_status, "completed_at": utcnow(), "lock_key": None}
    if error_message is not None:
        values["error_message"] = str(error_message)[:ERROR_MESSAGE_MAX]
    if details is not None:
        values["details"] = details
    for name, number in counters.items():
        column = name if name.startswith("emails_") else f"emails_{name}"
        if column not in COUNTERS:
            raise TypeError(f"update_status() got an unknown counter {name!r}")
        values[column] = int(number)
    return values


def _observe_end(task_id, row, new_status, completed_at, error_message) -> None:
    metrics.task_transitions.labels(row.email_source, new_status).inc()
    if row.started_at is not None:
        metrics.task_duration_seconds.labels(row.email_source, new_status).observe(
            max(0.0, (completed_at - row.started_at).total_seconds()))
    level = logging.INFO if new_status == S.COMPLETED else logging.WARNING
    log.log(level, "task=%s source=%s user=%s → %s%s", task_id, row.email_source,
            row.user_id, new_status, f": {error_message}" if error_message else "")


def _level_for(status: str) -> str:
    return {S.FAILED: "ERROR", S.CANCELLED: "WARNING"}.get(status, "INFO")


def complete_task(task_id: str, **counters: int) -> bool:
    return update_status(task_id, S.COMPLETED, **counters)


def fail_task(task_id: str, error_message: str, **counters: int) -> bool:
    return update_status(task_id, S.FAILED, error_message=error_message, **counters)


def cancel_task(task_id: str, reason: str, *, only_from: tuple[str, ...] | None = None) -> bool:
    return update_status(task_id, S.CANCELLED, error_message=reason, only_from=only_from)


@_db_errors
def cancel_where(condition, reason: str, *, metric_reason: str,
                 only_from: tuple[str, ...] = S.ACTIVE) -> list[str]:
    """Cancel every task matching ``condition`` (and in ``only_from``) in one UPDATE.

    The UPDATE … RETURNING names exactly the tasks this call ended, so each gets its log line
    and nothing another process ended meanwhile is touched. Returns their task ids.
    """
    now = utcnow()
    with db.atomic():
        rows = list(EmailTask.update(status=S.CANCELLED, completed_at=now, lock_key=None,
                                     error_message=reason[:ERROR_MESSAGE_MAX])
                    .where(EmailTask.status.in_(only_from), condition)
                    .returning(EmailTask.id, EmailTask.task_id, EmailTask.email_source,
                               EmailTask.started_at)
                    .execute())
        for chunk in peewee.chunked(rows, 500):
            TaskLog.insert_many([{"task": r.id, "step": "status", "level": "WARNING",
                                  "message": f"→ CANCELLED: {reason}"[:LOG_MESSAGE_MAX],
                                  "timestamp": now} for r in chunk]).execute()
    for row in rows:
        metrics.task_transitions.labels(row.email_source, S.CANCELLED).inc()
        if row.started_at is not None:
            metrics.task_duration_seconds.labels(row.email_source, S.CANCELLED).observe(
                max(0.0, (now - row.started_at).total_seconds()))
    if rows:
        metrics.task_timeouts.labels(metric_reason).inc(len(rows))
        log.warning("cancelled %d task(s): %s", len(rows), reason)
    return [row.task_id for row in rows]


# -- log, counts, queries ----------------------------------------------------------------------

def _log(task_pk: int, step: str, message: str, level: str = "INFO") -> None:
    TaskLog.create(task=task_pk, step=step[:64], message=str(message)[:LOG_MESSAGE_MAX],
                   level=level if level in LEVELS else "INFO")
    # Keep the newest LOG_KEEP lines: everything older than the LOG_KEEP-th newest goes.
    cutoff = (TaskLog.select(TaskLog.id).where(TaskLog.task == task_pk)
              .order_by(TaskLog.id.desc()).offset(LOG_KEEP).limit(1).scalar())
    if cutoff is not None:
        TaskLog.delete().where(TaskLog.task == task_pk, TaskLog.id <= cutoff).execute()


@_db_errors
def add_execution_log(task_id: str, step: str, message: str, level: str = "INFO") -> bool:
    """Append one line to a task's execution log (bounded to the newest LOG_KEEP)."""
    pk = EmailTask.select(EmailTask.id).where(EmailTask.task_id == task_id).scalar()
    if pk is None:
        return False
    with db.atomic():
        _log(pk, step, message, level.upper())
    return True


def execution_log(task_id: str) -> list[TaskLog]:
    return list(TaskLog.select().join(EmailTask)
                .where(EmailTask.task_id == task_id).order_by(TaskLog.id))


@_db_errors
def add_counts(task_id: str, fetched: int = 0, saved: int = 0, failed: int = 0) -> bool:
    """Add to the task's counters atomically; processed grows by saved + failed.

    Counts are facts about mail already handled, so they are added even after the task ended.
    """
    changed = (EmailTask.update(
        emails_fetched=EmailTask.emails_fetched + int(fetched),
        emails_saved=EmailTask.emails_saved + int(saved),
        emails_failed=EmailTask.emails_failed + int(failed),
        emails_processed=EmailTask.emails_processed + int(saved) + int(failed),
    ).where(EmailTask.task_id == task_id).execute())
    return bool(changed)


def is_timeout(task: EmailTask, now: dt.datetime | None = None) -> bool:
    """True if the task is RUNNING past its timeout_at."""
    return (task.status == S.RUNNING and task.timeout_at is not None
            and (now or utcnow()) >= task.timeout_at)


@_db_errors
def is_active(task_id: str) -> bool:
    """True while the task is PENDING or RUNNING: a worker checks this between batches."""
    status = EmailTask.select(EmailTask.status).where(EmailTask.task_id == task_id).scalar()
    return status in S.ACTIVE


def get_task(task_id: str) -> EmailTask | None:
    return EmailTask.get_or_none(EmailTask.task_id == task_id)


@_db_errors
def get_task_metrics(now: dt.datetime | None = None) -> dict:
    """Totals by status and by source, RUNNING past timeout, FAILED in the last hour."""
    now = now or utcnow()
    by_status = {status: 0 for status in S.ALL}
    by_source: dict[str, dict[str, int]] = {}
    query = (EmailTask.select(EmailTask.email_source, EmailTask.status,
                              peewee.fn.COUNT(EmailTask.id).alias("n"))
             .group_by(EmailTask.email_source, EmailTask.status).tuples())
    for source, status, n in query:
        by_status[status] = by_status.get(status, 0) + n
        by_source.setdefault(source, {})[status] = n
    past_timeout = EmailTask.select().where(
        EmailTask.status == S.RUNNING, EmailTask.timeout_at < now).count()
    failed_hour = EmailTask.select().where(
        EmailTask.status == S.FAILED, EmailTask.completed_at >= now - dt.timedelta(hours=1)).count()
    oldest_pending = (EmailTask.select(peewee.fn.MIN(EmailTask.created_at))
                      .where(EmailTask.status == S.PENDING).scalar())
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_source": by_source,
        "running_past_timeout": past_timeout,
        "failed_last_hour": failed_hour,
        "oldest_pending_seconds": (now - oldest_pending).total_seconds() if oldest_pending else None,
    }


# -- watchdog ----------------------------------------------------------------------------------

# publisher -> {seconds: routing key}: each tier is declared once per publisher (declaring is
# idempotent on the broker, but costs a round trip per task).
_watchdog_tiers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def publish_watchdog(publisher, task: EmailTask) -> None:
    """Publish the task's watchdog to the delay tier of its timeout (declared if new).

    Call it right after ``start_task``: the tier's queue-level TTL is the timeout, so the
    message dead-letters to ``mailferry.task_timeouts`` when timeout_at has passed.
    """
    seconds = int(task.timeout_seconds or DEFAULT_TIMEOUT)
    declared = _watchdog_tiers.setdefault(publisher, {})
    key = declared.get(seconds)
    if key is None:
        key = declared[seconds] = publisher.declare_watchdog(seconds)
    publisher.publish(key, TaskRef(task.task_id).to_body(), message_id=task.task_id)


def new_task_id() -> str:
    return str(uuid.uuid4())
