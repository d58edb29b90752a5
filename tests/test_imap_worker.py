"""The IMAP worker: fetch jobs → task state, counts, execution log; real Dovecot, SQLite and
PostgreSQL; the watchdog publisher is a fake at its seam, except in the RabbitMQ test."""

from __future__ import annotations

import threading

import pika
import pytest

from consumer import imap_client
from consumer.imap_sync import MailboxSync
from consumer.imap_worker import FETCH_ATTEMPTS, ImapFetchHandler
from mailferry import broker, tasks
from mailferry.contracts import FetchJob
from mailferry.errors import TransientError
from mailferry.models import EmailMessage, EmailTask, MailboxState, TaskSource, TaskStatus
from consumer.handler import Delivery
from devstack.ports import free_port
from tests.imap_fixtures import *  # noqa: F401,F403
from tests.imap_fixtures import FakePublisher, append, generated, stop_dovecot
from tests.pipeline import consumer_thread, queue_depth, wait_for


def delivery(body: bytes, tag: int = 1) -> Delivery:
    return Delivery(tag, body, pika.BasicProperties(), False, "imap_fetch", 1)


def job_for(task: EmailTask, folder: str = "INBOX") -> Delivery:
    return delivery(FetchJob(task.task_id, task.user_id, folder).to_body())


class CountingConnect:
    """Wraps the real imap_client.connect to count connection attempts."""

    def __init__(self):
        self.calls = 0

    def __call__(self, config, timeout):
        self.calls += 1
        return imap_client.connect(config, timeout)


def handler_for(imap_user, *, settings=None, publisher=None, connect=None, backoff=0.01,
                progress=None) -> ImapFetchHandler:
    settings = settings or imap_user.settings
    sync = MailboxSync(settings, connect=connect or imap_client.connect)
    if progress is not None:
        run = sync.run

        def run_with_progress(*args, **kwargs):
            kwargs["progress"] = _chain(kwargs.get("progress"), progress)
            return run(*args, **kwargs)
        sync.run = run_with_progress
    return ImapFetchHandler(settings, publisher=publisher or FakePublisher(), sync=sync,
                            configs=imap_user.configs, backoff=backoff)


def _chain(first, second):
    def both(result, delta):
        if first:
            first(result, delta)
        second(result, delta)
    return both


def new_task(imap_user, timeout: int = 600) -> EmailTask:
    task = tasks.create_task(TaskSource.IMAP, imap_user.user.id, timeout_seconds=timeout)
    assert task.status == TaskStatus.PENDING
    return task


def log_lines(task: EmailTask) -> list[str]:
    return [entry.message for entry in tasks.execution_log(task.task_id)]


def test_a_job_runs_its_task_to_completed_with_counts_and_log(imap_user):
    append(imap_user.account, generated(0, 12))
    publisher = FakePublisher()
    task = new_task(imap_user, timeout=600)

    outcomes = handler_for(imap_user, publisher=publisher).handle([job_for(task)])

    assert [o.action for o in outcomes] == ["ack"]
    done = tasks.get_task(task.task_id)
    assert done.status == TaskStatus.COMPLETED
    assert (done.emails_fetched, done.emails_saved, done.emails_failed) == (12, 12, 0)
    assert done.lock_key is None and done.started_at and done.completed_at
    assert done.details["last_uid"] == 12
    lines = log_lines(task)
    assert any(line.startswith(f"Email fetch completed: user={imap_user.user.email}, "
                               f"source=IMAP_EMAIL_FETCH, count=12") for line in lines)
    assert any("12 new message(s)" in line for line in lines)
    assert publisher.declared == [600]  # the watchdog tier of the task's timeout
    assert publisher.published == [("watchdog.600s", f'{{"task_id":"{task.task_id}","v":1}}'.encode())]
    assert EmailMessage.select().count() == 12


def test_a_job_whose_task_is_no_longer_pending_is_acked_and_left(imap_user):
    append(imap_user.account, generated(0, 3))
    task = new_task(imap_user)
    tasks.cancel_task(task.task_id, "expired before start")
    connect = CountingConnect()

    outcomes = handler_for(imap_user, connect=connect).handle([job_for(task)])

    assert [o.action for o in outcomes] == ["ack"]
    assert tasks.get_task(task.task_id).status == TaskStatus.CANCELLED
    assert tasks.get_task(task.task_id).error_message == "expired before start"
    assert connect.calls == 0 and EmailMessage.select().count() == 0


def test_wrong_password_fails_the_task_at_once_without_retry(imap_user):
    imap_user.configure(password="wrong-password")
    task = new_task(imap_user)
    connect = CountingConnect()

    handler_for(imap_user, connect=connect, backoff=5).handle([job_for(task)])

    done = tasks.get_task(task.task_id)
    assert done.status == TaskStatus.FAILED
    assert "login refused" in done.error_message and "AUTHENTICATIONFAILED" in done.error_message
    assert connect.calls == 1
    assert not any("retrying" in line for line in log_lines(task))
    assert "wrong-password" not in done.error_message


def test_network_errors_are_retried_with_backoff_then_failed(imap_user):
    imap_user.configure(port=free_port())  # nothing listens there
    task = new_task(imap_user)
    connect = CountingConnect()

    handler_for(imap_user, connect=connect, backoff=0.01).handle([job_for(task)])

    done = tasks.get_task(task.task_id)
    assert done.status == TaskStatus.FAILED
    assert done.error_message.startswith(f"gave up after {FETCH_ATTEMPTS} attempts")
    assert connect.calls == FETCH_ATTEMPTS
    retries = [line for line in log_lines(task) if "retrying in" in line]
    assert len(retries) == FETCH_ATTEMPTS - 1


def test_dovecot_stopped_mid_fetch_then_the_next_task_stores_every_message_once(imap_user, dovecot):
    settings = imap_user.settings.replace(imap_batch_size=20)
    append(imap_user.account, generated(0, 200))
    stopped = threading.Event()

    def stop_after_two_batches(result, delta):
        if result.batches == 2 and not stopped.is_set():
            stopped.set()
            stop_dovecot(dovecot)

    first = new_task(imap_user)
    try:
        handler_for(imap_user, settings=settings, progress=stop_after_two_batches).handle([job_for(first)])
    finally:
        dovecot.start()
    failed = tasks.get_task(first.task_id)
    assert failed.status == TaskStatus.FAILED
    assert "gave up after" in failed.error_message
    # what was committed: two batches, and those fetched ahead before the server went
    assert failed.emails_fetched == failed.emails_saved
    assert 40 <= failed.emails_saved < 200 and failed.emails_saved % 20 == 0

    second = new_task(imap_user)
    handler_for(imap_user, settings=settings).handle([job_for(second)])

    done = tasks.get_task(second.task_id)
    assert done.status == TaskStatus.COMPLETED
    assert done.emails_fetched == done.emails_saved == 200 - failed.emails_saved
    ids = [m.message_id for m in EmailMessage.select()]
    assert len(ids) == len(set(ids)) == 200


def test_cancelled_by_the_watchdog_mid_run_stops_and_keeps_the_outcome(imap_user):
    settings = imap_user.settings.replace(imap_batch_size=10)
    append(imap_user.account, generated(0, 50))
    task = new_task(imap_user)

    def watchdog_fires(result, delta):
        if result.batches == 1:
            assert tasks.cancel_task(task.task_id, "timed out after 600 s",
                                     only_from=(TaskStatus.RUNNING,))

    handler_for(imap_user, settings=settings, progress=watchdog_fires).handle([job_for(task)])

    done = tasks.get_task(task.task_id)
    assert done.status == TaskStatus.CANCELLED
    assert done.error_message == "timed out after 600 s"
    assert (done.emails_fetched, done.emails_saved) == (10, 10)
    assert EmailMessage.select().count() == 10
    state = MailboxState.get()
    assert state.last_uid == 10  # the next task goes on from there


def test_a_user_without_imap_configuration_fails(imap_user):
    from mailferry.models import Settings as SettingsRow
    SettingsRow.delete().execute()
    task = new_task(imap_user)

    handler_for(imap_user).handle([job_for(task)])

    done = tasks.get_task(task.task_id)
    assert done.status == TaskStatus.FAILED
    assert "no IMAP configuration" in done.error_message


def test_a_malformed_job_is_dead_lettered(imap_user):
    outcomes = handler_for(imap_user).handle([delivery(b'{"v":1,"user_id":1}')])
    assert outcomes[0].action == "dead" and "task_id" in outcomes[0].reason


def test_a_watchdog_that_cannot_be_published_does_not_stop_the_fetch(imap_user):
    append(imap_user.account, generated(0, 2))
    task = new_task(imap_user)

    handler_for(imap_user, publisher=FakePublisher(fail=TransientError("broker down"))).handle([job_for(task)])

    assert tasks.get_task(task.task_id).status == TaskStatus.COMPLETED
    assert any("watchdog not published: broker down" in line for line in log_lines(task))


def test_a_fetch_job_through_rabbitmq_completes_and_arms_the_watchdog(imap_user, broker_settings):
    settings = broker_settings
    append(imap_user.account, generated(0, 8))
    task = tasks.create_task(TaskSource.IMAP, imap_user.user.id, timeout_seconds=settings.task_timeout)
    publisher = broker.Publisher(settings, declare=True)
    publisher.publish(broker.ROUTING_KEYS[broker.IMAP_FETCH],
                      FetchJob(task.task_id, imap_user.user.id).to_body(), message_id=task.task_id)
    publisher.close()

    with consumer_thread(settings, [ImapFetchHandler(settings)]):
        wait_for(lambda: tasks.get_task(task.task_id).status == TaskStatus.COMPLETED,
                 timeout=60, message="the fetch task to complete")
        wait_for(lambda: queue_depth(settings.amqp_url, broker.IMAP_FETCH) == 0)

    assert EmailMessage.select().count() == 8
    watchdog_queue, _ = broker.watchdog_queue(settings.task_timeout)
    assert queue_depth(settings.amqp_url, watchdog_queue) == 1


@pytest.mark.parametrize("status", [TaskStatus.RUNNING, TaskStatus.COMPLETED])
def test_a_redelivered_job_does_not_fetch_twice(imap_user, status):
    append(imap_user.account, generated(0, 3))
    task = new_task(imap_user)
    handler = handler_for(imap_user)
    handler.handle([job_for(task)])
    if status == TaskStatus.RUNNING:
        other = new_task(imap_user)
        tasks.start_task(other.task_id)
        task = other
    connect = CountingConnect()

    outcomes = handler_for(imap_user, connect=connect).handle([job_for(task)])

    assert outcomes[0].action == "ack" and connect.calls == 0
    assert tasks.get_task(task.task_id).status == status


def test_a_throttled_server_is_given_the_backoff_it_asked_for(imap_user):
    """Exchange's answer to too many commands; the retry waits what it suggests, not 0.01 s."""
    from imapclient.exceptions import IMAPClientError
    append(imap_user.account, generated(0, 2))
    refusals = []

    def throttled_once(config, timeout):
        session = imap_client.connect(config, timeout)
        search = session.client.search
        if not refusals:
            def refuse(*_args, **_kwargs):
                refusals.append(1)
                raise IMAPClientError(b"[THROTTLED] Request is throttled. Suggested Backoff "
                                      b"Time: 1500 milliseconds")
            session.client.search = refuse
        else:
            session.client.search = search
        return session

    task = new_task(imap_user)
    handler_for(imap_user, connect=throttled_once, backoff=0.01).handle([job_for(task)])

    assert tasks.get_task(task.task_id).status == TaskStatus.COMPLETED
    assert EmailMessage.select().count() == 2 and refusals == [1]
    assert [line for line in log_lines(task) if "retrying in" in line][0].endswith(
        "retrying in 1.5 s")


def test_retry_after_reads_the_servers_hint():
    from imapclient.exceptions import IMAPClientError
    assert imap_client.retry_after(IMAPClientError(b"NO [THROTTLED] Suggested Backoff Time: "
                                                   b"250 milliseconds")) == 0.25
    assert imap_client.retry_after(IMAPClientError(b"backoff time: 9999 seconds")) == \
        imap_client.MAX_RETRY_AFTER
    assert imap_client.retry_after(IMAPClientError(b"NO [UNAVAILABLE] try later")) is None
