"""Timeouts carried by RabbitMQ TTLs, against a real broker with 1-second TTLs, on SQLite and
PostgreSQL: fetch jobs that expire unstarted, and the watchdog of RUNNING tasks."""

from __future__ import annotations

import threading
import time

from consumer.expiry import ExpiredJobHandler, WatchdogHandler
from consumer.handler import Handler
from mailferry import broker, tasks
from mailferry.broker import Publisher
from mailferry.contracts import TaskRef
from mailferry.models import EmailTask, TaskSource, TaskStatus, db
from scheduler.fetch import schedule_imap_fetch
from tests.pipeline import consumer_thread, dead_letters, queue_depth, wait_for
from tests.task_fixtures import add_imap_user, expiry_consumer, short_settings  # noqa: F401

S = TaskStatus


def row(task_id: str) -> EmailTask:
    return EmailTask.get(EmailTask.task_id == task_id)


class Recording(Handler):
    """Wraps a handler and remembers the task ids it has handled (after the handler ran)."""

    def __init__(self, handler):
        self.inner, self.queue, self.prefetch = handler, handler.queue, handler.prefetch
        self.seen: list[str] = []

    def handle(self, deliveries):
        outcomes = self.inner.handle(deliveries)
        self.seen.extend(TaskRef.from_body(d.body).task_id for d in deliveries)
        return outcomes


def recording_consumer(settings):
    handlers = [Recording(ExpiredJobHandler(settings)), Recording(WatchdogHandler(settings))]
    return consumer_thread(settings, handlers=handlers), handlers


def test_a_fetch_job_nobody_consumes_ends_cancelled_by_expiry(short_settings):
    settings = short_settings
    add_imap_user("ann@example.org")
    publisher = Publisher(settings, declare=True)
    summary = schedule_imap_fetch(settings, publisher)
    publisher.close()
    assert summary.scheduled == 1
    task = EmailTask.get()
    assert task.status == S.PENDING

    with expiry_consumer(settings):  # no IMAP worker: the job just waits in its queue
        wait_for(lambda: row(task.task_id).status == S.CANCELLED, timeout=20,
                 message="the expired job's task to be cancelled")

    ended = row(task.task_id)
    assert ended.error_message.startswith("expired before start")
    assert ended.started_at is None and ended.lock_key is None
    # Not before the TTL: RabbitMQ held the job for fetch_job_ttl seconds.
    assert (ended.completed_at - ended.created_at).total_seconds() >= 0.9
    assert "expired before start" in tasks.execution_log(task.task_id)[-1].message
    assert queue_depth(settings.amqp_url, broker.IMAP_FETCH) == 0
    assert queue_depth(settings.amqp_url, broker.IMAP_EXPIRED) == 0
    assert tasks.create_task(TaskSource.IMAP, ended.user_id).status == S.PENDING  # lock free


class HangingWorker(threading.Thread):
    """A worker that starts its task, arms the watchdog, then never finishes the fetch; it
    checks ``is_active`` between batches like the IMAP worker does."""

    def __init__(self, settings, task_id: str):
        super().__init__(daemon=True)
        self.settings, self.task_id = settings, task_id
        self.batches = 0
        self.completed: bool | None = None

    def run(self):
        publisher = Publisher(self.settings)
        try:
            task = tasks.start_task(self.task_id)
            tasks.publish_watchdog(publisher, task)
            while tasks.is_active(self.task_id) and self.batches < 400:
                tasks.add_counts(self.task_id, fetched=1, saved=1)
                self.batches += 1
                time.sleep(0.05)
            self.completed = tasks.complete_task(self.task_id, fetched=self.batches)
        finally:
            publisher.close()
            db.close()


def test_a_running_task_whose_worker_hangs_ends_cancelled_by_the_watchdog(short_settings):
    settings = short_settings
    user = add_imap_user("ann@example.org")
    task = tasks.create_task(TaskSource.IMAP, user.id, timeout_seconds=settings.task_timeout)
    with expiry_consumer(settings):
        worker = HangingWorker(settings, task.task_id)
        worker.start()
        worker.join(20)
        assert not worker.is_alive(), "the worker did not notice its task was cancelled"

    ended = row(task.task_id)
    assert ended.status == S.CANCELLED
    assert ended.error_message == "timed out after 1 s"
    assert (ended.completed_at - ended.started_at).total_seconds() >= 0.9
    assert worker.completed is False  # the worker's late completion did not overwrite it
    assert worker.batches < 400
    # Counts are facts about mail handled; they stay.
    assert ended.emails_saved >= worker.batches - 1
    assert queue_depth(settings.amqp_url, broker.watchdog_queue(1)[0]) == 0
    assert queue_depth(settings.amqp_url, broker.TASK_TIMEOUTS) == 0


def test_worker_completing_as_the_watchdog_fires_leaves_exactly_one_outcome(short_settings):
    settings = short_settings
    users = [add_imap_user(f"u{i}@example.org") for i in range(12)]
    created = [tasks.create_task(TaskSource.IMAP, u.id, timeout_seconds=1) for u in users]
    publisher = Publisher(settings, declare=True)
    results: dict[str, bool] = {}

    def finish_at(task_id: str, moment: float):
        time.sleep(max(0.0, moment - time.monotonic()))
        try:
            results[task_id] = tasks.complete_task(task_id, fetched=1)
        finally:
            db.close()

    consumer, (_, watchdog) = recording_consumer(settings)
    with consumer:
        threads = []
        for i, task in enumerate(created):
            running = tasks.start_task(task.task_id)
            tasks.publish_watchdog(publisher, running)
            # Finish around the moment the watchdog comes back: from 0.15 s early to 0.15 s late.
            moment = time.monotonic() + 1.0 + (i - 6) * 0.025
            threads.append(threading.Thread(target=finish_at, args=(task.task_id, moment)))
            threads[-1].start()
        for t in threads:
            t.join(20)
        wait_for(lambda: len(watchdog.seen) == len(created), timeout=20,
                 message="every watchdog handled")
    publisher.close()

    for task in created:
        ended = row(task.task_id)
        assert ended.status in (S.COMPLETED, S.CANCELLED)
        assert results[task.task_id] is (ended.status == S.COMPLETED)
        assert ended.lock_key is None
        endings = [e.message for e in tasks.execution_log(task.task_id) if e.message.startswith("→")]
        assert len(endings) == 1, endings
        if ended.status == S.CANCELLED:
            assert ended.error_message == "timed out after 1 s" and ended.emails_fetched == 0
        else:
            assert ended.error_message is None and ended.emails_fetched == 1


def test_a_watchdog_for_a_finished_task_changes_nothing(short_settings):
    settings = short_settings
    user = add_imap_user("ann@example.org")
    publisher = Publisher(settings, declare=True)
    task = tasks.start_task(tasks.create_task(TaskSource.IMAP, user.id, timeout_seconds=1).task_id)
    tasks.publish_watchdog(publisher, task)
    assert tasks.complete_task(task.task_id, fetched=2, saved=2)
    publisher.close()
    consumer, (_, watchdog) = recording_consumer(settings)
    with consumer:
        wait_for(lambda: task.task_id in watchdog.seen, timeout=20, message="the watchdog")
    ended = row(task.task_id)
    assert (ended.status, ended.error_message, ended.emails_saved) == (S.COMPLETED, None, 2)


def test_an_expiry_for_a_started_task_changes_nothing(short_settings):
    settings = short_settings
    user = add_imap_user("ann@example.org")
    task = tasks.start_task(tasks.create_task(TaskSource.IMAP, user.id, timeout_seconds=60).task_id)
    publisher = Publisher(settings, declare=True)
    publisher.publish(broker.ROUTING_KEYS[broker.IMAP_EXPIRED], TaskRef(task.task_id).to_body())
    publisher.close()
    consumer, (expired, _) = recording_consumer(settings)
    with consumer:
        wait_for(lambda: task.task_id in expired.seen, timeout=20, message="the expiry message")
    assert row(task.task_id).status == S.RUNNING


def test_a_malformed_timeout_message_is_dead_lettered_with_the_reason(short_settings):
    settings = short_settings
    publisher = Publisher(settings, declare=True)
    publisher.publish(broker.ROUTING_KEYS[broker.TASK_TIMEOUTS], b'{"v":1}')
    publisher.close()
    with expiry_consumer(settings):
        letters = wait_for(lambda: dead_letters(settings.amqp_url), timeout=20,
                           message="a dead letter")
    headers, body = letters[0]
    assert body == b'{"v":1}'
    assert "malformed task reference" in headers[broker.H_REASON]
    assert headers[broker.H_QUEUE] == broker.TASK_TIMEOUTS
