"""`mailferry status` and the figures behind it (mailferry/overview.py), also as scrape-time
metrics (DatabaseCollector), on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json

import peewee
import pika
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mailferry import broker
from mailferry.users import add_user
from mailferry.management import endpoint
from mailferry.metrics import DatabaseCollector
from mailferry.models import (
    EmailTask, SchedulerLease, TaskSource, UnroutedMessage, db, utcnow,
)
from mailferry.overview import database_problem, read_overview
from mailferry.spool import Spool
from mailferry.tasks import complete_task, create_task, fail_task, start_task
from tests.ops_helpers import run_cli
from tests.pipeline import wait_for
from tests.task_fixtures import add_imap_user


def _scrape(spool_dir) -> dict[str, list]:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(spool_dir))
    text = generate_latest(registry).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(families, name, **labels) -> float:
    matches = [s.value for f in families.values() for s in f
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, matches)
    return matches[0]


def _seed(settings) -> None:
    """Tasks in several states, an unrouted message, a quarantined file, a lease."""
    ann = add_imap_user("ann@example.org")
    bob = add_user("bob@example.org")
    done = create_task(TaskSource.IMAP, ann.id)
    start_task(done.task_id)
    complete_task(done.task_id)
    failed = create_task(TaskSource.IMAP, bob.id)
    start_task(failed.task_id)
    fail_task(failed.task_id, "login refused")
    late = create_task(TaskSource.HARAKA, None, timeout_seconds=1)
    start_task(late.task_id)
    EmailTask.update(timeout_at=utcnow() - dt.timedelta(seconds=30)).where(
        EmailTask.task_id == late.task_id).execute()
    create_task(TaskSource.IMAP, ann.id)  # PENDING
    UnroutedMessage.create(queue_id="Q1", message_id="<m@x>", mail_from="a@x", rcpt_to=["n@y"],
                           raw_path="ab/cd/ef", sha256="ef", size=10)
    spool = Spool(settings.resolved_spool_dir).ensure()
    spool.quarantine(spool.incoming / "Q2.eml", "too big", raw=b"Subject: x\r\n\r\nbig")
    SchedulerLease.create(name="scheduler", holder="host:1:abcd",
                          expires_at=utcnow() + dt.timedelta(seconds=30))


def test_database_figures_are_read_at_scrape_time(settings):
    spool_dir = settings.resolved_spool_dir
    before = _scrape(spool_dir)
    assert _value(before, "mailferry_database_up") == 1
    assert _value(before, "mailferry_tasks", source="IMAP_EMAIL_FETCH", status="FAILED") == 0
    assert _value(before, "mailferry_last_successful_fetch_timestamp_seconds", source="imap") == 0
    assert "mailferry_scheduler_lease" not in before or not before["mailferry_scheduler_lease"]

    _seed(settings)
    after = _scrape(spool_dir)
    tasks = {(s.labels["source"], s.labels["status"]): s.value for s in after["mailferry_tasks"]}
    assert {k: v for k, v in tasks.items() if v} == {
        ("IMAP_EMAIL_FETCH", "COMPLETED"): 1, ("IMAP_EMAIL_FETCH", "FAILED"): 1,
        ("IMAP_EMAIL_FETCH", "PENDING"): 1, ("HARAKA_EMAIL_FETCH", "RUNNING"): 1}
    assert len(tasks) == 12  # every source × status, zeros included
    assert _value(after, "mailferry_tasks_running_past_timeout") == 1
    assert _value(after, "mailferry_tasks_failed_last_hour") == 1
    assert _value(after, "mailferry_unrouted_messages") == 1
    assert _value(after, "mailferry_quarantined_files") == 1
    assert _value(after, "mailferry_imap_mailboxes") == 1
    assert 0 <= _value(after, "mailferry_tasks_oldest_pending_seconds") < 60
    now = utcnow().replace(tzinfo=dt.timezone.utc).timestamp()
    assert now - 60 < _value(after, "mailferry_last_successful_fetch_timestamp_seconds", source="imap") <= now + 1
    assert _value(after, "mailferry_last_successful_fetch_timestamp_seconds", source="smtp") == 0
    assert _value(after, "mailferry_scheduler_lease_info", holder="host:1:abcd") == 1
    assert now < _value(after, "mailferry_scheduler_lease_expires_timestamp_seconds") < now + 31


def test_a_database_that_cannot_be_read_gives_database_up_0_not_a_failed_scrape(sqlite_settings, tmp_path):
    good = db.obj
    db.initialize(peewee.SqliteDatabase(str(tmp_path / "no" / "such" / "dir" / "x.db")))
    try:
        families = _scrape(sqlite_settings.resolved_spool_dir)
        assert list(families) == ["mailferry_database_up"]
        assert _value(families, "mailferry_database_up") == 0
        assert database_problem().startswith("database unreachable: ")
    finally:
        db.initialize(good)
    assert database_problem() is None


def test_the_metrics_thread_closes_the_connection_it_opened(settings):
    import threading
    seen = []

    def scrape():
        _scrape(settings.resolved_spool_dir)
        seen.append(db.is_closed())

    thread = threading.Thread(target=scrape)
    thread.start()
    thread.join()
    assert seen == [True]
    assert not db.is_closed()  # this thread's connection was left alone


def test_management_endpoint_takes_credentials_from_the_amqp_url_when_it_has_none(settings):
    s = settings.replace(amqp_url="amqp://app:s%40cret@rabbit:5672/mail%2Fferry",
                         management_url="https://rabbit:15671/")
    e = endpoint(s)
    assert (e.base, e.username, e.password, e.vhost) == ("https://rabbit:15671", "app", "s@cret", "mail/ferry")
    e = endpoint(s.replace(management_url="http://ops:pw@[::1]:15672"))
    assert (e.base, e.username, e.password) == ("http://[::1]:15672", "ops", "pw")


def _management_url(rabbitmq) -> str:
    base = rabbitmq.management_url.split("://", 1)[1]
    return f"http://{rabbitmq.username}:{rabbitmq.password}@{base}"


def test_status_shows_queue_depths_consumers_tasks_and_counts(broker_settings, rabbitmq):
    settings = broker_settings.replace(management_url=_management_url(rabbitmq))
    _seed(settings)
    broker.setup_topology(settings)
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        for _ in range(2):
            channel.basic_publish("", broker.DEAD, b"{}")
        channel.basic_publish("", broker.INBOUND, b"{}")
        consumer = connection.channel()
        consumer.basic_consume(broker.TASK_TIMEOUTS, lambda *a: None)

        def status():
            result = run_cli(settings, "status", "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        def depths_seen():
            report = status()
            queues = {q["name"]: q for q in report["queues"]}
            ok = (queues[broker.DEAD]["messages"] == 2 and queues[broker.INBOUND]["messages"] == 1
                  and queues[broker.TASK_TIMEOUTS]["consumers"] == 1)
            return ok and report
        report = wait_for(depths_seen, timeout=30, message="queue depths in the management API")
        text = run_cli(settings, "status")
    finally:
        connection.close()

    assert report["management_error"] is None
    assert {q["name"] for q in report["queues"]} >= {
        broker.INBOUND, broker.IMAP_FETCH, broker.IMAP_EXPIRED, broker.TASK_TIMEOUTS, broker.DEAD}
    assert report["dead_lettered"] == 2
    assert report["unrouted"] == 1 and report["quarantined"] == 1
    assert report["tasks"]["by_status"]["FAILED"] == 1
    assert report["tasks"]["by_source"]["IMAP_EMAIL_FETCH"]["COMPLETED"] == 1
    assert report["tasks"]["running_past_timeout"] == 1 and report["tasks"]["failed_last_hour"] == 1
    assert report["last_success"]["imap"].endswith("Z") and report["last_success"]["smtp"] is None
    assert report["scheduler"]["lease_holder"] == "host:1:abcd"

    assert text.returncode == 0 and text.stderr == ""
    lines = text.stdout.splitlines()
    dead_row = next(line for line in lines if line.startswith(broker.DEAD)).split()
    inbound_row = next(line for line in lines if line.startswith(broker.INBOUND + " ")).split()
    # QUEUE TYPE MESSAGES READY UNACKED CONSUMERS
    assert dead_row[2:] == ["2", "2", "0", "0"] and inbound_row[2:] == ["1", "1", "0", "0"]
    assert "dead-lettered:  2 in mailferry.dead" in text.stdout
    assert "unrouted:       1 in unrouted_message" in text.stdout
    assert "quarantined:    1 file(s)" in text.stdout
    assert "host:1:abcd holds the lease" in text.stdout


def test_status_still_shows_the_database_part_without_the_management_api(settings):
    _seed(settings)
    settings = settings.replace(management_url="http://guest:guest@127.0.0.1:1")
    result = run_cli(settings, "status")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mailferry status: RabbitMQ management API at http://127.0.0.1:1 unreachable: "
        "[Errno 111] Connection refused"]
    assert "guest" not in result.stderr  # never a credential in the output
    assert "unknown: the RabbitMQ management API did not answer" in result.stdout
    assert "FAILED" in result.stdout and "unrouted:       1" in result.stdout
    assert "dead-lettered:  unknown" in result.stdout

    as_json = json.loads(run_cli(settings, "status", "--json").stdout)
    assert as_json["queues"] is None and as_json["dead_lettered"] is None
    assert "unreachable" in as_json["management_error"]
    assert as_json["tasks"]["by_status"]["PENDING"] == 1


def test_overview_of_an_empty_installation(settings):
    overview = read_overview(settings.resolved_spool_dir)
    assert overview.tasks_by_status() == {s: 0 for s in ("PENDING", "RUNNING", "COMPLETED",
                                                          "FAILED", "CANCELLED", "SKIPPED")}
    assert overview.last_success == {"imap": None, "smtp": None}
    assert (overview.unrouted, overview.quarantined, overview.lease_holder) == (0, 0, None)
