"""Operating Mailferry: a real Prometheus scrapes a running consumer and scheduler (and
RabbitMQ's rabbitmq_prometheus) with deploy/prometheus.yml and evaluates deploy/alerts.yml;
/healthz and /readyz answer as an orchestrator expects."""

from __future__ import annotations

import collections
import datetime as dt
import json
import secrets
from urllib.parse import quote

import pytest

from mailferry import broker
from mailferry.inject import Injector
from mailferry.users import add_user
from mailferry.models import EmailMessage, EmailTask, InboundReceipt, TaskSource, UnroutedMessage, utcnow
from mailferry.spool import Spool
from mailferry.tasks import complete_task, create_task, fail_task, start_task
from devstack import mailgen
from tests.harness.fixtures import require_service, running
from devstack.ports import free_port
from devstack.rabbitmq import management_request, rabbitmq_available
from tests.ops_helpers import (
    PrometheusRabbitMQ, PrometheusServer, deploy_prometheus_config, http_get, need_binary,
    run_cli, start_process, stop_process,
)
from tests.pipeline import queue_depth, wait_for

QUARANTINE_LIMIT = 16 * 1024  # bytes: the consumer's MAILFERRY_MAX_MESSAGE_BYTES in these tests


@pytest.fixture(scope="module")
def metrics_rabbitmq(tmp_path_factory):
    """A RabbitMQ node of this module with rabbitmq_prometheus (the session one has not)."""
    need_binary("prometheus")
    if not rabbitmq_available():
        require_service("RabbitMQ", "rabbitmq-server is not installed")
    with running(PrometheusRabbitMQ(tmp_path_factory.mktemp("rabbitmq-prometheus"))) as server:
        yield server


@pytest.fixture
def vhost_settings(settings, metrics_rabbitmq):
    """``settings`` on a fresh vhost of ``metrics_rabbitmq``, with metrics ports and a low
    size limit (so one message is quarantined)."""
    vhost = f"ops-{secrets.token_hex(4)}"
    server = metrics_rabbitmq
    path = f"/api/vhosts/{quote(vhost, safe='')}"
    server.management_api("PUT", path, {})
    server.management_api("PUT", f"/api/permissions/{quote(vhost, safe='')}/guest",
                          {"configure": ".*", "write": ".*", "read": ".*"})
    try:
        yield settings.replace(
            amqp_url=server.amqp_url_for(vhost),
            management_url=f"http://guest:guest@127.0.0.1:{server.management_port}",
            consumer_metrics_port=free_port(), scheduler_metrics_port=free_port(),
            max_message_bytes=QUARANTINE_LIMIT), vhost
    finally:
        management_request(server.management_url, "DELETE", path, None, "guest", "guest")


def _add_tasks(users) -> None:
    """One task in each interesting state (the scheduler's startup cleanup has already run)."""
    ann, bob, carl, dora = users
    done = create_task(TaskSource.IMAP, ann.id)
    start_task(done.task_id)
    complete_task(done.task_id, fetched=2, saved=2)
    failed = create_task(TaskSource.IMAP, bob.id)
    start_task(failed.task_id)
    fail_task(failed.task_id, "IMAP server refused the login")
    create_task(TaskSource.IMAP, carl.id)  # PENDING
    stuck = create_task(TaskSource.HARAKA, None, timeout_seconds=1)
    start_task(stuck.task_id)
    (EmailTask.update(timeout_at=utcnow() - dt.timedelta(minutes=5))
     .where(EmailTask.task_id == stuck.task_id).execute())
    running = create_task(TaskSource.IMAP, dora.id)
    start_task(running.task_id)


def _inject_mail(settings) -> None:
    """3 stored, 1 duplicate, 1 unrouted, 1 quarantined (over the size limit)."""
    injector = Injector(settings)
    try:
        for n in range(3):
            injector.inject(mailgen.plain(n, to="bob@example.org"), ["bob@example.org"])
        injector.inject(mailgen.plain(0, to="bob@example.org"), ["bob@example.org"])
        injector.inject(mailgen.plain(7, to="nobody@example.org"), ["nobody@example.org"])
        injector.inject(mailgen.with_attachment(8, "big.bin", b"x" * (2 * QUARANTINE_LIMIT)),
                        ["bob@example.org"])
    finally:
        injector.close()


def _tasks_by_source_status(settings) -> dict[tuple[str, str], int]:
    result = run_cli(settings, "tasks", "--json", "--limit", "0")
    assert result.returncode == 0, result.stderr
    return dict(collections.Counter((t["source"], t["status"]) for t in json.loads(result.stdout)))


def test_prometheus_scrapes_the_consumer_and_scheduler_and_sees_what_was_stored(vhost_settings, metrics_rabbitmq, tmp_path):
    settings, vhost = vhost_settings
    users = [add_user(f"{name}@example.org") for name in ("ann", "bob", "carl", "dora")]
    consumer = start_process("consumer", settings, tmp_path / "consumer.log")
    scheduler = start_process("scheduler", settings, tmp_path / "scheduler.log",
                              MAILFERRY_SCHEDULE_INTERVAL="3600")
    prometheus = None
    try:
        consumer_url = f"http://127.0.0.1:{settings.consumer_metrics_port}"
        scheduler_url = f"http://127.0.0.1:{settings.scheduler_metrics_port}"
        for url, log in ((consumer_url, "consumer.log"), (scheduler_url, "scheduler.log")):
            wait_for(lambda: http_get(url + "/readyz")[0] == 200, timeout=60,
                     message=f"{url}/readyz: " + (tmp_path / log).read_text(errors="replace")[-2000:])
            assert http_get(url + "/healthz") == (200, "ok\n")
            assert http_get(url + "/readyz") == (200, "ready\n")

        prometheus = PrometheusServer(tmp_path / "prometheus", deploy_prometheus_config({
            "mailferry-consumer": f"127.0.0.1:{settings.consumer_metrics_port}",
            "mailferry-scheduler": f"127.0.0.1:{settings.scheduler_metrics_port}",
            "rabbitmq": f"127.0.0.1:{metrics_rabbitmq.prometheus_port}",
            "rabbitmq-queues": f"127.0.0.1:{metrics_rabbitmq.prometheus_port}",
        }, vhost=vhost)).start()
        p = prometheus
        # A first scrape before any mail: the counters' rise from 0 is what increase() sees.
        wait_for(lambda: p.query('mailferry_emails_total{job="mailferry-consumer",'
                                 'source="smtp",outcome="quarantined"} == 0')
                 and p.query('up{job="mailferry-scheduler"} == 1'), timeout=20,
                 message="a first scrape of both processes")

        _add_tasks(users)
        _inject_mail(settings)
        spool = Spool(settings.resolved_spool_dir)
        wait_for(lambda: InboundReceipt.select().count() == 5 and list(spool.failed.glob("*.eml")),
                 timeout=60, message="every injected message handled")
        assert EmailMessage.select().count() == 3 and UnroutedMessage.select().count() == 1

        # mailferry_emails_total shows what was stored, by outcome.
        expected = {"stored": 3, "duplicate": 1, "unrouted": 1, "quarantined": 1}
        emails = 'sum by (outcome) (mailferry_emails_total{job="mailferry-consumer",source="smtp"})'
        wait_for(lambda: {k: v for k, v in p.values(emails, "outcome").items() if v} == expected,
                 timeout=20, message=f"mailferry_emails_total in Prometheus: {p.query(emails)}")

        # The task gauges, from both processes, match `mailferry tasks --json`.
        by_cli = _tasks_by_source_status(settings)
        assert by_cli == {("IMAP_EMAIL_FETCH", "COMPLETED"): 1, ("IMAP_EMAIL_FETCH", "FAILED"): 1,
                          ("IMAP_EMAIL_FETCH", "PENDING"): 1, ("IMAP_EMAIL_FETCH", "RUNNING"): 1,
                          ("HARAKA_EMAIL_FETCH", "RUNNING"): 1}
        for job in ("mailferry-consumer", "mailferry-scheduler"):
            def gauges(job=job):
                rows = p.query(f'mailferry_tasks{{job="{job}"}} > 0')
                return {(r["metric"]["source"], r["metric"]["status"]): int(float(r["value"][1]))
                        for r in rows}
            wait_for(lambda: gauges() == by_cli, timeout=20,
                     message=f"mailferry_tasks of {job}: {gauges()} vs {by_cli}")
            figures = {name: p.values(f'{name}{{job="{job}"}}', "job").get(job) for name in (
                "mailferry_tasks_running_past_timeout", "mailferry_tasks_failed_last_hour",
                "mailferry_unrouted_messages", "mailferry_quarantined_files",
                "mailferry_database_up")}
            assert figures == {"mailferry_tasks_running_past_timeout": 1,
                               "mailferry_tasks_failed_last_hour": 1,
                               "mailferry_unrouted_messages": 1, "mailferry_quarantined_files": 1,
                               "mailferry_database_up": 1}, job
            last = p.values(f'mailferry_last_successful_fetch_timestamp_seconds{{job="{job}"}}', "source")
            now = utcnow().replace(tzinfo=dt.timezone.utc).timestamp()
            assert now - 120 < last["imap"] <= now + 5 and now - 120 < last["smtp"] <= now + 5
            holders = p.query(f'mailferry_scheduler_lease_info{{job="{job}"}}')
            assert len(holders) == 1 and holders[0]["metric"]["holder"]

        # Labels never carry a message id or an address.
        for series in p.api("series", **{"match[]": '{__name__=~"mailferry_.*"}'}):
            for name, value in series.items():
                assert "@" not in value and "<" not in value, (name, value)

        # Histograms and per-process counters arrive too.
        assert p.query('mailferry_parse_seconds_count{job="mailferry-consumer"} >= 5')
        assert p.query('mailferry_dead_lettered_total{job="mailferry-consumer",queue="mailferry.inbound"} == 1')
        assert p.query('mailferry_scheduler_ticks_total{job="mailferry-scheduler",outcome="ok"} >= 1')
        assert p.query('mailferry_scheduler_lease_held{job="mailferry-scheduler"} == 1')

        # The rules load and evaluate without error; the ones whose condition holds are pending.
        def rules():
            return [r for g in p.api("rules")["groups"] for r in g["rules"]]
        wait_for(lambda: all(not r.get("lastEvaluation", "0001").startswith("0001")
                             for r in rules()),
                 timeout=20, message="every rule evaluated")
        assert [(r["name"], r.get("lastError")) for r in rules() if r["health"] != "ok"] == []
        assert queue_depth(settings.amqp_url, broker.DEAD) == 1
        active = {"MailferryDeadLetters", "MailferryTasksStuckPastTimeout",
                  "MailferryMessagesQuarantined", "MailferryUnroutedMail"}
        try:
            wait_for(lambda: active <= {r["name"] for r in rules() if r["state"] != "inactive"},
                     timeout=20)
        except AssertionError:
            raise AssertionError(f"expected {active} active: {[(r['name'], r['state']) for r in rules()]}")
        quiet = {r["name"] for r in rules() if r.get("state") == "inactive"}
        assert {"MailferryConsumerDown", "MailferryQueueWithoutConsumer", "MailferryNoScheduler",
                "MailferryDatabaseUnreachable", "MailferryRabbitMQDown", "MailferryRabbitMQAlarm",
                "MailferryNoImapFetch"} <= quiet
        # The metric names the alerts rely on exist under these names in rabbitmq_prometheus.
        for name in ("rabbitmq_alarms_memory_used_watermark", "rabbitmq_alarms_free_disk_space_watermark",
                     f'rabbitmq_detailed_queue_consumers{{vhost="{vhost}",queue="mailferry.inbound"}}'):
            assert p.query(name), name
    finally:
        if prometheus is not None:
            prometheus.stop()
        codes = (stop_process(consumer), stop_process(scheduler))
    assert codes == (0, 0), (tmp_path / "consumer.log").read_text()[-2000:]


def test_consumer_without_a_broker_is_alive_but_not_ready(settings, tmp_path):
    """The broker URL of ``settings`` points at a closed port: /healthz 200, /readyz 503."""
    settings = settings.replace(consumer_metrics_port=free_port())
    consumer = start_process("consumer", settings, tmp_path / "consumer.log")
    try:
        url = f"http://127.0.0.1:{settings.consumer_metrics_port}"
        wait_for(lambda: http_get(url + "/healthz")[0] == 200, timeout=30,
                 message="/healthz: " + (tmp_path / "consumer.log").read_text(errors="replace")[-2000:])
        status, body = http_get(url + "/readyz")
        assert status == 503
        assert body == "broker: not consuming from RabbitMQ\n"  # the database is fine
        status, body = http_get(url + "/metrics")
        assert status == 200 and "mailferry_database_up 1.0" in body
        assert 'mailferry_tasks{source="IMAP_EMAIL_FETCH",status="PENDING"} 0.0' in body
    finally:
        assert stop_process(consumer) == 0


def test_the_acting_scheduler_is_not_ready_when_its_tick_could_not_publish(settings):
    """``settings`` points at a broker that does not exist: the fetch jobs stay unpublished."""
    from mailferry.broker import Publisher
    from scheduler.main import Scheduler
    from tests.task_fixtures import add_imap_user

    scheduler = Scheduler(settings, publisher=Publisher(settings, declare=True))
    assert scheduler.broker_readiness() is None  # nothing tried yet
    scheduler.lease.acquire()
    scheduler.tick_once()  # nobody to fetch for: nothing published, nothing failed
    assert scheduler.broker_readiness() is None
    add_imap_user("ann@example.org")
    scheduler.tick_once()
    reason = scheduler.broker_readiness()
    assert reason.startswith("the last tick could not publish 1 fetch job(s): ")
    assert "RabbitMQ" in reason
    scheduler.lease.release()
    assert scheduler.broker_readiness() is None  # a standby publishes nothing
