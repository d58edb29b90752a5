"""The scheduler on SQLite and PostgreSQL, with a real RabbitMQ where it publishes: the tick,
the lease between two schedulers, startup and stale cleanup, the process itself."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from mailferry import broker, tasks
from mailferry.broker import Publisher
from mailferry.models import EmailTask, SchedulerLease, TaskSource, TaskStatus, User, utcnow
from scheduler.cleanup import STALE_GRACE, cleanup_stale_tasks, startup_cleanup
from scheduler.lease import Lease
from scheduler.main import Scheduler
from scheduler.tick import run_tick
from devstack.ports import free_port
from tests.pipeline import ROOT, queue_depth, settings_env, wait_for
from tests.task_fixtures import VALID_IMAP, add_imap_user, drain

S = TaskStatus
IMAP = TaskSource.IMAP


def row(task_id: str) -> EmailTask:
    return EmailTask.get(EmailTask.task_id == task_id)


class CountingPublisher(Publisher):
    def __init__(self, settings):
        super().__init__(settings, declare=True)
        self.count = 0

    def publish(self, *args, **kwargs):
        super().publish(*args, **kwargs)
        self.count += 1


# -- the tick --------------------------------------------------------------------------------

def test_tick_publishes_one_job_per_active_user_with_a_valid_imap_config(broker_settings):
    settings = broker_settings
    ann = add_imap_user("ann@example.org")
    bob = add_imap_user("bob@example.org", imap={**VALID_IMAP, "folder": "Archive"})
    add_imap_user("gone@example.org", active=False)
    add_imap_user("off@example.org", config_active=False)
    add_imap_user("nopass@example.org", imap={**VALID_IMAP, "password": ""})
    add_imap_user("noport@example.org", imap={k: v for k, v in VALID_IMAP.items() if k != "port"})
    User.create(email="smtp-only@example.org")
    publisher = Publisher(settings, declare=True)

    result = run_tick(settings, publisher)
    publisher.close()

    assert result.outcome == "ok", result
    assert (result.fetch.users, result.fetch.invalid, result.fetch.scheduled) == (4, 2, 2)
    jobs = drain(settings.amqp_url, broker.IMAP_FETCH)
    by_user = {body["user_id"]: (props, body) for props, body in jobs}
    assert sorted(by_user) == sorted([ann.id, bob.id]) and len(jobs) == 2
    assert by_user[bob.id][1]["folder"] == "Archive" and by_user[ann.id][1]["folder"] == "INBOX"
    for props, body in jobs:
        task = row(body["task_id"])
        assert (task.status, task.email_source, task.user_id) == (S.PENDING, IMAP, body["user_id"])
        assert task.timeout_seconds == settings.task_timeout
        assert props.message_id == task.task_id and props.delivery_mode == 2
        assert body["v"] == 1
    assert EmailTask.select().count() == 2


def test_a_second_tick_skips_users_whose_task_is_in_flight(broker_settings):
    settings = broker_settings
    users = [add_imap_user(f"u{i}@example.org") for i in range(3)]
    publisher = Publisher(settings, declare=True)
    first = run_tick(settings, publisher)
    holder = {t.user_id: t.task_id for t in EmailTask.select()}
    tasks.start_task(holder[users[0].id])  # one is RUNNING, the others still PENDING
    second = run_tick(settings, publisher)
    publisher.close()

    assert (first.fetch.scheduled, second.fetch.scheduled, second.fetch.skipped) == (3, 0, 3)
    assert queue_depth(settings.amqp_url, broker.IMAP_FETCH) == 3  # no second job for anyone
    skipped = list(EmailTask.select().where(EmailTask.status == S.SKIPPED))
    assert len(skipped) == 3
    for task in skipped:
        assert holder[task.user_id] in task.error_message
        assert task.lock_key is None
    assert EmailTask.select().where(EmailTask.status.in_(S.ACTIVE)).count() == 3


def test_tick_cancels_the_tasks_it_could_not_publish(settings):
    # ``settings`` points at a broker that does not exist (port 1).
    users = [add_imap_user(f"u{i}@example.org") for i in range(3)]
    result = run_tick(settings, Publisher(settings, declare=True))
    assert result.outcome == "partial" and "fetch" in result.failed_steps
    assert (result.fetch.scheduled, result.fetch.unpublished) == (0, 3)
    assert result.retention is not None  # the other steps still ran
    for task in EmailTask.select():
        assert task.status == S.CANCELLED
        assert task.error_message == "fetch job not published: broker unavailable"
    assert tasks.create_task(IMAP, users[0].id).status == S.PENDING  # locks were released


class ListPublisher:
    def __init__(self):
        self.sent = []

    def publish(self, key, body, **kwargs):
        self.sent.append(json.loads(body))

    def close(self):
        pass


def test_publishing_stops_and_cancels_the_rest_when_the_lease_is_lost(settings, monkeypatch):
    import scheduler.fetch as fetch
    monkeypatch.setattr(fetch, "LEASE_CHECK_EVERY", 2)
    for i in range(5):
        add_imap_user(f"u{i}@example.org")
    checks = []
    publisher = ListPublisher()
    summary = fetch.schedule_imap_fetch(settings, publisher,
                                        still_ours=lambda: checks.append(1) or len(checks) < 2)
    assert (summary.scheduled, summary.unpublished) == (4, 1)
    assert summary.errors == ["the scheduler lost its lease"]
    assert len(publisher.sent) == 4
    cancelled = EmailTask.get(EmailTask.status == S.CANCELLED)
    assert cancelled.error_message == "fetch job not published: the scheduler lost its lease"
    assert cancelled.task_id not in {job["task_id"] for job in publisher.sent}


# -- cleanup ---------------------------------------------------------------------------------

def _aged(task_id: str, **fields):
    EmailTask.update(**fields).where(EmailTask.task_id == task_id).execute()


def test_startup_cleanup_cancels_pending_and_timed_out_running_tasks(settings):
    users = [User.create(email=f"u{i}@example.org") for i in range(5)]
    pending = tasks.create_task(IMAP, users[0].id)
    late = tasks.start_task(tasks.create_task(IMAP, users[1].id, timeout_seconds=1).task_id)
    _aged(late.task_id, timeout_at=utcnow() - dt.timedelta(seconds=5))
    busy = tasks.start_task(tasks.create_task(IMAP, users[2].id, timeout_seconds=600).task_id)
    done = tasks.start_task(tasks.create_task(IMAP, users[3].id).task_id)
    tasks.complete_task(done.task_id)
    sweep = tasks.create_task(TaskSource.HARAKA, None)

    counts = startup_cleanup(settings)

    assert counts == {"pending": 2, "running": 1}
    for task in (pending, sweep):
        assert row(task.task_id).status == S.CANCELLED
        assert "scheduler start" in tasks.execution_log(task.task_id)[-1].message
    assert row(late.task_id).status == S.CANCELLED
    assert row(late.task_id).error_message.startswith("timed out")
    assert "timed out" in tasks.execution_log(late.task_id)[-1].message
    assert row(busy.task_id).status == S.RUNNING
    assert row(done.task_id).status == S.COMPLETED
    assert tasks.create_task(IMAP, users[0].id).status == S.PENDING


def test_stale_cleanup_ends_only_tasks_past_their_deadline_and_grace(settings):
    users = [User.create(email=f"u{i}@example.org") for i in range(4)]
    now = utcnow()
    old_pending = tasks.create_task(IMAP, users[0].id)
    _aged(old_pending.task_id,
          created_at=now - dt.timedelta(seconds=settings.fetch_job_ttl + STALE_GRACE + 5))
    fresh_pending = tasks.create_task(IMAP, users[1].id)
    dead_running = tasks.start_task(tasks.create_task(IMAP, users[2].id).task_id)
    _aged(dead_running.task_id, timeout_at=now - dt.timedelta(seconds=STALE_GRACE + 5))
    just_late = tasks.start_task(tasks.create_task(IMAP, users[3].id).task_id)
    _aged(just_late.task_id, timeout_at=now - dt.timedelta(seconds=1))  # the watchdog's turn

    assert cleanup_stale_tasks(settings, now=now) == {"pending": 1, "running": 1}
    assert row(old_pending.task_id).error_message.startswith("expired before start")
    assert row(dead_running.task_id).error_message.startswith("timed out")
    assert row(fresh_pending.task_id).status == S.PENDING
    assert row(just_late.task_id).status == S.RUNNING


# -- the lease -------------------------------------------------------------------------------

def test_lease_has_one_holder_and_expires(settings):
    first, second = Lease(2, holder="first"), Lease(2, holder="second")
    assert first.acquire() and first.acquire()  # take, renew
    assert not second.acquire()
    assert second.current_holder() == "first"
    SchedulerLease.update(expires_at=utcnow() - dt.timedelta(seconds=1)).execute()  # first died
    assert second.acquire()
    assert not first.acquire() and not first.held()
    second.release()
    assert first.acquire()


def _run(scheduler: Scheduler) -> threading.Thread:
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    return thread


def test_two_schedulers_run_at_once_and_only_one_publishes(broker_settings):
    # A lease long enough that a loaded test machine never lets it lapse between renewals.
    settings = broker_settings.replace(schedule_interval=1, lease_seconds=6)
    users = [add_imap_user(f"u{i}@example.org") for i in range(4)]
    a = Scheduler(settings, publisher=CountingPublisher(settings), lease=Lease(6, holder="a"))
    b = Scheduler(settings, publisher=CountingPublisher(settings), lease=Lease(6, holder="b"))
    threads = [_run(a), _run(b)]
    wait_for(lambda: a.ticks + b.ticks >= 3, timeout=20, message="three ticks")
    for s in (a, b):
        s.stop()
    for t in threads:
        t.join(10)

    acting, standby = (a, b) if a.ticks else (b, a)
    assert standby.ticks == 0 and standby.publisher.count == 0
    assert acting.publisher.count == len(users)  # later ticks found every mailbox in flight
    assert queue_depth(settings.amqp_url, broker.IMAP_FETCH) == len(users)
    assert EmailTask.select().where(EmailTask.status == S.PENDING).count() == len(users)
    assert SchedulerLease.get().expires_at < utcnow()  # released at shutdown


def test_a_standby_takes_over_when_the_acting_scheduler_dies(broker_settings):
    settings = broker_settings.replace(schedule_interval=1, lease_seconds=2)
    add_imap_user("ann@example.org")
    dying = Scheduler(settings, publisher=CountingPublisher(settings), lease=Lease(2, holder="dying"))
    dying.lease.release = lambda: None  # a crash: the lease is not given back
    thread = _run(dying)
    wait_for(lambda: dying.ticks >= 1, timeout=20, message="the first scheduler's tick")
    first_task = EmailTask.get(EmailTask.status == S.PENDING)
    dying.stop()
    thread.join(10)
    died_at = time.monotonic()
    dead_lease_expiry = SchedulerLease.get().expires_at
    assert dead_lease_expiry > utcnow()  # not released: it has to run out

    standby = Scheduler(settings, publisher=CountingPublisher(settings), lease=Lease(2, holder="standby"))
    thread = _run(standby)
    wait_for(lambda: standby.ticks >= 1, timeout=20, message="the standby's first tick")
    took = time.monotonic() - died_at
    standby.stop()
    thread.join(10)

    assert took < 10, took
    # Its startup cleanup cancelled the dead scheduler's job, then it scheduled its own —
    # only after the dead holder's lease had run out.
    assert row(first_task.task_id).status == S.CANCELLED
    assert row(first_task.task_id).completed_at >= dead_lease_expiry
    assert standby.publisher.count == 1
    new_task = EmailTask.get(EmailTask.status == S.PENDING)
    assert new_task.created_at >= dead_lease_expiry
    assert SchedulerLease.get().holder == "standby"


# -- the process -----------------------------------------------------------------------------

def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def test_scheduler_process_ticks_serves_readyz_and_stops_on_sigterm(broker_settings, tmp_path):
    settings = broker_settings
    add_imap_user("ann@example.org")
    port = free_port()
    env = settings_env(settings)
    env.update(MAILFERRY_SCHEDULE_INTERVAL="1", MAILFERRY_LEASE_SECONDS="3",
               MAILFERRY_SCHEDULER_METRICS_PORT=str(port), MAILFERRY_METRICS_HOST="127.0.0.1")
    log_path = tmp_path / "scheduler.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "scheduler"], env=env, cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: _get(base + "/readyz")[0] == 200, timeout=30,
                 message="/readyz 200: " + log_path.read_text(errors="replace")[-2000:])
        status, text = _get(base + "/metrics")
        assert status == 200 and 'mailferry_scheduler_ticks_total{outcome="ok"}' in text
        assert "mailferry_scheduler_lease_held 1.0" in text
        wait_for(lambda: queue_depth(settings.amqp_url, broker.IMAP_FETCH) == 1, timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log_path.read_text()
    assert "lease scheduler released" in output, output[-2000:]
    assert SchedulerLease.get().expires_at < utcnow()


def test_readiness_reports_a_scheduler_that_stopped_ticking(settings):
    scheduler = Scheduler(settings.replace(schedule_interval=1), publisher=CountingPublisher(settings))
    assert scheduler.readiness() is not None  # never checked the lease
    scheduler.lease.acquire()
    assert "tick" in scheduler.readiness()
    scheduler.tick_once()
    assert scheduler.readiness() is None
    scheduler.last_tick_at -= 2 * 1 + 31
    assert "tick" in scheduler.readiness()
    standby = Scheduler(settings, publisher=CountingPublisher(settings), lease=Lease(30, holder="x"))
    standby._hold_lease()
    assert standby.readiness() is None  # standing by is healthy
    assert json.dumps(scheduler.last_tick.fetch.__dict__)  # a plain summary
