"""The task state machine on SQLite and PostgreSQL: transitions, the per-mailbox lock, the
execution log, counters and metrics."""

from __future__ import annotations

import datetime as dt
import threading

import peewee
import pytest

from mailferry import tasks
from mailferry.errors import InvalidTransition, PermanentError
from mailferry.models import EmailTask, TaskLog, TaskSource, TaskStatus, User, db, utcnow

S = TaskStatus
IMAP, HARAKA = TaskSource.IMAP, TaskSource.HARAKA


@pytest.fixture
def user(settings):
    return User.create(email="ann@example.org")


def status_of(task_id: str) -> str:
    return EmailTask.get(EmailTask.task_id == task_id).status


def in_threads(count: int, target) -> list:
    """Run ``target(i)`` in ``count`` threads released together; return their results."""
    results: list = [None] * count
    barrier = threading.Barrier(count)

    def run(i):
        barrier.wait()
        try:
            results[i] = target(i)
        except Exception as exc:  # reported to the test as a value
            results[i] = exc
        finally:
            db.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_create_task_is_pending_and_holds_the_mailbox_lock(user):
    task = tasks.create_task(IMAP, user.id, timeout_seconds=42, details={"folder": "INBOX"})
    row = EmailTask.get(EmailTask.task_id == task.task_id)
    assert row.status == S.PENDING
    assert row.lock_key == f"{IMAP}:{user.id}"
    assert row.timeout_seconds == 42 and row.details == {"folder": "INBOX"}
    assert row.started_at is None and row.timeout_at is None


def test_second_task_for_a_mailbox_in_flight_is_skipped_naming_the_holder(user):
    first = tasks.create_task(IMAP, user.id)
    second = tasks.create_task(IMAP, user.id)
    assert second.status == S.SKIPPED
    assert second.task_id != first.task_id
    assert first.task_id in second.error_message
    assert second.lock_key is None and second.completed_at is not None
    assert second.details["lock_holder"] == first.task_id
    assert [e.message for e in tasks.execution_log(second.task_id)] == [second.error_message]
    assert status_of(first.task_id) == S.PENDING  # the holder is untouched


def test_the_database_itself_refuses_a_second_live_task(user):
    tasks.create_task(IMAP, user.id)
    with pytest.raises(peewee.IntegrityError), db.atomic():
        EmailTask.create(email_source=IMAP, user=user.id, lock_key=tasks.lock_key(IMAP, user.id))


def test_locks_are_per_source_and_per_user(user):
    other = User.create(email="bob@example.org")
    made = [tasks.create_task(IMAP, user.id), tasks.create_task(IMAP, other.id),
            tasks.create_task(HARAKA, user.id), tasks.create_task(HARAKA, None)]
    assert [t.status for t in made] == [S.PENDING] * 4
    assert tasks.create_task(HARAKA, None).status == S.SKIPPED


def test_ending_a_task_releases_the_lock(user):
    first = tasks.create_task(IMAP, user.id)
    tasks.start_task(first.task_id)
    assert tasks.complete_task(first.task_id, fetched=3, saved=3)
    row = EmailTask.get(EmailTask.task_id == first.task_id)
    assert row.lock_key is None and row.completed_at is not None
    assert tasks.create_task(IMAP, user.id).status == S.PENDING


def test_concurrent_creates_for_one_mailbox_leave_exactly_one_pending(user):
    made = in_threads(8, lambda i: tasks.create_task(IMAP, user.id))
    assert all(isinstance(t, EmailTask) for t in made), made
    statuses = sorted(t.status for t in made)
    assert statuses == [S.PENDING] + [S.SKIPPED] * 7
    holder = next(t for t in made if t.status == S.PENDING)
    assert all(holder.task_id in t.error_message for t in made if t.status == S.SKIPPED)


def test_start_task_sets_started_and_timeout_once(user):
    task = tasks.create_task(IMAP, user.id, timeout_seconds=90)
    before = utcnow()
    started = tasks.start_task(task.task_id)
    assert started.status == S.RUNNING
    row = EmailTask.get(EmailTask.task_id == task.task_id)
    assert row.started_at >= before
    assert row.timeout_at == row.started_at + dt.timedelta(seconds=90)
    assert tasks.start_task(task.task_id) is None  # no longer PENDING
    assert tasks.start_task("no-such-task") is None


def test_start_task_of_a_cancelled_task_returns_none(user):
    task = tasks.create_task(IMAP, user.id)
    assert tasks.cancel_task(task.task_id, "expired before start")
    assert tasks.start_task(task.task_id) is None
    assert status_of(task.task_id) == S.CANCELLED


@pytest.mark.parametrize("target", [S.COMPLETED, S.FAILED])
def test_pending_cannot_skip_running(user, target):
    task = tasks.create_task(IMAP, user.id)
    with pytest.raises(InvalidTransition, match="PENDING → " + target):
        tasks.update_status(task.task_id, target)
    assert status_of(task.task_id) == S.PENDING


@pytest.mark.parametrize("target", [S.PENDING, S.SKIPPED, "DONE"])
def test_targets_outside_the_graph_are_refused(user, target):
    task = tasks.create_task(IMAP, user.id)
    with pytest.raises(InvalidTransition):
        tasks.update_status(task.task_id, target)
    assert status_of(task.task_id) == S.PENDING


def test_unknown_task_and_source_are_refused(settings):
    with pytest.raises(InvalidTransition, match="no such task"):
        tasks.cancel_task("no-such-task", "x")
    with pytest.raises(PermanentError, match="unknown task source"):
        tasks.create_task("POP3", None)


def test_an_ended_task_keeps_its_outcome(user):
    task = tasks.create_task(IMAP, user.id)
    tasks.start_task(task.task_id)
    assert tasks.cancel_task(task.task_id, "timed out after 600 s")
    # The worker finishing late loses: False, and nothing of the outcome changes.
    assert tasks.complete_task(task.task_id, fetched=5, saved=5) is False
    assert tasks.fail_task(task.task_id, "late error") is False
    row = EmailTask.get(EmailTask.task_id == task.task_id)
    assert row.status == S.CANCELLED
    assert row.error_message == "timed out after 600 s"
    assert row.emails_saved == 0
    assert [e.message for e in tasks.execution_log(task.task_id)] == [
        "PENDING → RUNNING (timeout 600 s)", "→ CANCELLED: timed out after 600 s"]


def test_only_from_leaves_other_live_states_alone(user):
    task = tasks.create_task(IMAP, user.id)
    assert tasks.cancel_task(task.task_id, "timed out", only_from=(S.RUNNING,)) is False
    assert status_of(task.task_id) == S.PENDING
    tasks.start_task(task.task_id)
    assert tasks.cancel_task(task.task_id, "expired", only_from=(S.PENDING,)) is False
    assert status_of(task.task_id) == S.RUNNING


def test_complete_and_cancel_racing_leave_exactly_one_outcome(user):
    for round_ in range(10):
        task = tasks.create_task(IMAP, user.id)
        tasks.start_task(task.task_id)
        results = in_threads(2, lambda i: tasks.complete_task(task.task_id, fetched=1)
                             if i == 0 else tasks.cancel_task(task.task_id, "timed out"))
        assert sorted(results) == [False, True], (round_, results)
        row = EmailTask.get(EmailTask.task_id == task.task_id)
        assert row.status == (S.COMPLETED if results[0] else S.CANCELLED)
        ends = [e for e in tasks.execution_log(task.task_id) if e.message.startswith("→")]
        assert len(ends) == 1


def test_fail_task_records_error_and_counters(user):
    task = tasks.create_task(IMAP, user.id)
    tasks.start_task(task.task_id)
    assert tasks.fail_task(task.task_id, "IMAP login refused", fetched=4, emails_failed=4)
    row = EmailTask.get(EmailTask.task_id == task.task_id)
    assert (row.status, row.error_message, row.emails_fetched, row.emails_failed) == (
        S.FAILED, "IMAP login refused", 4, 4)
    log = tasks.execution_log(task.task_id)
    assert log[-1].level == "ERROR" and "IMAP login refused" in log[-1].message
    with pytest.raises(TypeError):
        tasks.update_status(task.task_id, S.FAILED, bogus=1)


def test_execution_log_keeps_the_newest_entries(user):
    task = tasks.create_task(IMAP, user.id)
    for i in range(tasks.LOG_KEEP + 30):
        tasks.add_execution_log(task.task_id, "fetch", f"batch {i}", level="debug")
    log = tasks.execution_log(task.task_id)
    assert len(log) == tasks.LOG_KEEP
    assert log[0].message == "batch 30" and log[-1].message == f"batch {tasks.LOG_KEEP + 29}"
    assert {e.level for e in log} == {"DEBUG"}
    assert tasks.add_execution_log("no-such-task", "x", "y") is False


def test_add_counts_is_atomic_under_concurrency(user):
    task = tasks.create_task(IMAP, user.id)
    in_threads(6, lambda i: [tasks.add_counts(task.task_id, fetched=1, saved=1) for _ in range(10)])
    tasks.add_counts(task.task_id, fetched=2, failed=2)
    row = EmailTask.get(EmailTask.task_id == task.task_id)
    assert (row.emails_fetched, row.emails_saved, row.emails_failed, row.emails_processed) == (
        62, 60, 2, 62)


def test_is_timeout_and_is_active(user):
    task = tasks.create_task(IMAP, user.id, timeout_seconds=10)
    assert tasks.is_active(task.task_id)
    assert not tasks.is_timeout(task)
    running = tasks.start_task(task.task_id)
    assert not tasks.is_timeout(running)
    assert tasks.is_timeout(running, now=running.timeout_at + dt.timedelta(seconds=1))
    tasks.complete_task(task.task_id)
    ended = tasks.get_task(task.task_id)
    assert not tasks.is_active(task.task_id)
    assert not tasks.is_timeout(ended, now=ended.timeout_at + dt.timedelta(hours=1))
    assert not tasks.is_active("no-such-task")


def test_get_task_metrics(user):
    now = utcnow()
    done = tasks.create_task(IMAP, user.id)
    tasks.start_task(done.task_id)
    tasks.complete_task(done.task_id)
    failed = tasks.create_task(IMAP, user.id)
    tasks.start_task(failed.task_id)
    tasks.fail_task(failed.task_id, "boom")
    old_failed = tasks.create_task(IMAP, user.id)
    tasks.start_task(old_failed.task_id)
    tasks.fail_task(old_failed.task_id, "old")
    EmailTask.update(completed_at=now - dt.timedelta(hours=2)).where(
        EmailTask.task_id == old_failed.task_id).execute()
    stuck = tasks.create_task(IMAP, user.id, timeout_seconds=1)
    tasks.start_task(stuck.task_id)
    tasks.create_task(IMAP, user.id)  # SKIPPED: stuck holds the lock
    tasks.create_task(HARAKA, None)  # PENDING

    stats = tasks.get_task_metrics(now=now + dt.timedelta(seconds=5))
    assert stats["by_status"] == {S.PENDING: 1, S.RUNNING: 1, S.COMPLETED: 1, S.FAILED: 2,
                                  S.CANCELLED: 0, S.SKIPPED: 1}
    assert stats["total"] == 6
    assert stats["by_source"][HARAKA] == {S.PENDING: 1}
    assert stats["running_past_timeout"] == 1
    assert stats["failed_last_hour"] == 1
    assert stats["oldest_pending_seconds"] >= 0


def test_create_many_skips_mailboxes_in_flight(user):
    others = [User.create(email=f"u{i}@example.org") for i in range(5)]
    holder = tasks.create_task(IMAP, others[0].id)
    made = tasks.create_many(IMAP, [(u.id, {"folder": "INBOX"}) for u in others]
                             + [(others[1].id, {})], timeout_seconds=7, chunk_size=2)
    assert [m.status for m in made] == [S.SKIPPED, S.PENDING, S.PENDING, S.PENDING, S.PENDING,
                                        S.SKIPPED]
    rows = {r.task_id: r for r in EmailTask.select()}
    assert all(rows[m.task_id].status == m.status for m in made)
    assert holder.task_id in rows[made[0].task_id].error_message
    assert rows[made[1].task_id].lock_key == tasks.lock_key(IMAP, others[1].id)
    assert rows[made[1].task_id].timeout_seconds == 7
    assert made[1].task_id in rows[made[5].task_id].error_message  # the same user twice


def test_create_many_falls_back_when_a_lock_is_taken_meanwhile(user, monkeypatch):
    others = [User.create(email=f"u{i}@example.org") for i in range(3)]
    real_select = EmailTask.select
    sneaked = []

    def select_then_race(*fields):
        query = real_select(*fields)
        if fields and fields[0] is EmailTask.lock_key and not sneaked:
            # Another process takes user 1's lock after our read of the live locks.
            sneaked.append(EmailTask.create(email_source=IMAP, user=others[1].id,
                                            lock_key=tasks.lock_key(IMAP, others[1].id)))
            return real_select(*fields).where(EmailTask.id < 0)  # our read saw nothing
        return query

    monkeypatch.setattr(EmailTask, "select", select_then_race)
    made = tasks.create_many(IMAP, [(u.id, {}) for u in others])
    monkeypatch.undo()
    assert [m.status for m in made] == [S.PENDING, S.SKIPPED, S.PENDING]
    assert sneaked[0].task_id in EmailTask.get(EmailTask.task_id == made[1].task_id).error_message
    assert EmailTask.select().where(EmailTask.status == S.PENDING).count() == 3


def test_cancel_where_ends_only_live_matches_and_logs_each(user):
    other = User.create(email="bob@example.org")
    a = tasks.create_task(IMAP, user.id)
    b = tasks.create_task(IMAP, other.id)
    tasks.start_task(b.task_id)
    c = tasks.create_task(HARAKA, None)
    tasks.start_task(c.task_id)
    tasks.complete_task(c.task_id)
    ended = tasks.cancel_where(EmailTask.email_source == IMAP, "operator said so",
                               metric_reason="startup")
    assert sorted(ended) == sorted([a.task_id, b.task_id])
    assert status_of(c.task_id) == S.COMPLETED
    for task_id in ended:
        row = EmailTask.get(EmailTask.task_id == task_id)
        assert row.status == S.CANCELLED and row.lock_key is None
        assert tasks.execution_log(task_id)[-1].message == "→ CANCELLED: operator said so"
    assert tasks.cancel_where(EmailTask.email_source == IMAP, "again", metric_reason="startup") == []


class _FakePublisher:
    def __init__(self):
        self.declared, self.published = [], []

    def declare_watchdog(self, seconds):
        self.declared.append(seconds)
        return f"watchdog.{seconds}s"

    def publish(self, key, body, **kwargs):
        self.published.append((key, body, kwargs))


def test_publish_watchdog_uses_the_tier_of_the_task_timeout(user):
    publisher = _FakePublisher()
    one = tasks.start_task(tasks.create_task(IMAP, user.id, timeout_seconds=5).task_id)
    two = tasks.start_task(tasks.create_task(HARAKA, None, timeout_seconds=5).task_id)
    tasks.publish_watchdog(publisher, one)
    tasks.publish_watchdog(publisher, two)
    assert publisher.declared == [5]  # declared once per tier
    assert [p[0] for p in publisher.published] == ["watchdog.5s", "watchdog.5s"]
    assert publisher.published[0][1] == b'{"task_id":"%s","v":1}' % one.task_id.encode()
    assert publisher.published[0][2]["message_id"] == one.task_id
    assert TaskLog.select().count() == 2  # the two starts
