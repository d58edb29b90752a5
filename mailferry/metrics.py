"""Every Prometheus metric Mailferry exports, in one place.

Units are seconds; labels have few values (source, status, outcome, queue) and never carry a
message id or an address. Most objects are updated where the work happens; the figures kept in
the database (tasks by status, unrouted mail, the scheduler lease, …) are read when Prometheus
scrapes, by ``DatabaseCollector``.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

KINDS = ("person", "auto_reply", "bulk", "bounce", "complaint", "unknown")
emails = Counter(
    "mailferry_emails", "Messages handled, by source (smtp, imap), outcome "
    "(stored, duplicate, unrouted, failed, quarantined) and kind (person, auto_reply, bulk, "
    "bounce, complaint; unknown when not read)", ["source", "outcome", "kind"])
parse_seconds = Histogram(
    "mailferry_parse_seconds", "Time to parse one message",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5))
batch_seconds = Histogram(
    "mailferry_batch_seconds", "Time to handle one batch of queue messages", ["queue"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
imap_fetch_seconds = Histogram(
    "mailferry_imap_fetch_seconds", "Time of one IMAP fetch from connect to logout",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
task_duration_seconds = Histogram(
    "mailferry_task_duration_seconds", "Time from RUNNING to a terminal state", ["source", "status"],
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
last_success = Gauge(
    "mailferry_last_success_timestamp_seconds", "When a message was last stored, by source",
    ["source"])


def record(source: str, outcome: str, count: int = 1, kind: str = "unknown") -> None:
    """What happened to ``count`` messages from ``source``: the one place a message's outcome
    is counted (``mailferry_emails``), and a stored one moves ``last_success``."""
    if count <= 0:
        return
    emails.labels(source, outcome, kind).inc(count)
    if outcome == "stored":
        last_success.labels(source).set_to_current_time()
events_published = Counter(
    "mailferry_events_published", "Events the relay published to mailferry.events, by type",
    ["type"])
webhook_deliveries = Counter(
    "mailferry_webhook_deliveries", "Webhook POSTs by outcome (delivered, retry, dead, gone)",
    ["outcome"])
webhook_seconds = Histogram(
    "mailferry_webhook_seconds", "Time of one webhook POST, answered or not",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
webhook_failing_since = Gauge(
    "mailferry_webhook_failing_since_timestamp_seconds",
    "When an endpoint's current run of failed attempts began (0: its last attempt succeeded)",
    ["endpoint"])


def register_outbox_backlog(count) -> None:
    """``mailferry_outbox_backlog``: events written and not yet published, read at scrape."""
    Gauge("mailferry_outbox_backlog", "Events in the outbox not yet published").set_function(
        lambda: _quiet(count))


def _quiet(count) -> float:
    try:
        return float(count())
    except Exception:  # noqa: BLE001 - a scrape must not fail on a database hiccup
        return float("nan")


storage_integrity_failures = Counter(
    "mailferry_storage_integrity_failures",
    "Stored objects that did not hash to their sha256 when read (damaged or changed in storage)")
dead_lettered = Counter(
    "mailferry_dead_lettered", "Messages published to mailferry.dead, by the queue they left",
    ["queue"])
worker_wait_seconds = Counter(
    "mailferry_worker_wait_seconds", "Time a queue's worker thread spent waiting, by what it "
    "waited for: broker (no message delivered yet), parse (the parser process still parsing the "
    "batch to commit)", ["queue", "waiting_for"])
requeued = Counter(
    "mailferry_requeued", "Messages requeued after a transient failure", ["queue"])
scheduler_ticks = Counter(
    "mailferry_scheduler_ticks", "Scheduler ticks run, by outcome", ["outcome"])
scheduler_tick_failures = Counter(
    "mailferry_scheduler_tick_failures",
    "Scheduler tick steps that raised an error nobody foresaw (the next tick still runs)",
    ["step"])
scheduler_lease_held = Gauge(
    "mailferry_scheduler_lease_held", "1 while this scheduler holds the lease")
fetch_jobs_published = Counter(
    "mailferry_fetch_jobs_published", "IMAP fetch jobs published by the scheduler")

# Tasks and the scheduler (mailferry/tasks.py, scheduler/).
task_transitions = Counter(
    "mailferry_task_transitions", "Task state changes, by source and the status reached "
    "(SKIPPED counts lock collisions)", ["source", "status"])
task_timeouts = Counter(
    "mailferry_task_timeouts", "Tasks cancelled by the watchdog, expiry or stale cleanup, "
    "by reason (watchdog, expired, stale_pending, stale_running, startup, unpublished)",
    ["reason"])
scheduler_tick_seconds = Histogram(
    "mailferry_scheduler_tick_seconds", "Time of one scheduler tick",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
scheduler_last_tick = Gauge(
    "mailferry_scheduler_last_tick_timestamp_seconds", "When the scheduler last finished a tick")
imap_idle_mailboxes = Gauge(
    "mailferry_imap_idle_mailboxes", "Mailboxes this consumer holds in IMAP IDLE, by state "
    "(idle, connecting, waiting: to reconnect; unsupported: the server has no IDLE)", ["state"])
imap_idle_wakeups = Counter(
    "mailferry_imap_idle_wakeups", "IDLE notifications of new mail (EXISTS) that started a sync")
imap_idle_lost = Counter(
    "mailferry_imap_idle_lost", "IDLE connections that failed or were dropped, by kind "
    "(connect, auth, read, renew)", ["kind"])
spool_republished = Counter(
    "mailferry_spool_republished", "Orphaned spool files republished by the sweep")
retention_deleted = Counter(
    "mailferry_retention_deleted", "Tasks deleted by retention cleanup, by status", ["status"])
retention_messages_deleted = Counter(
    "mailferry_retention_messages_deleted", "Stored messages (kind message) and unrouted mail "
    "(kind unrouted) deleted by retention_message_days", ["kind"])
retention_deliveries_deleted = Counter(
    "mailferry_retention_deliveries_deleted", "Published events (kind event), webhook attempts "
    "(webhook_attempt) and inbound receipts (receipt) deleted by retention_event_days", ["kind"])
retention_objects_deleted = Counter(
    "mailferry_retention_objects_deleted", "Objects deleted from storage by message retention")


# Every expected label set starts at 0: increase() and rate() cannot see a first event in a
# series that is born already at 1, and an alert on it would never fire.
def _initialise_series() -> None:
    from mailferry.models import TaskSource, TaskStatus
    for source in ("smtp", "imap"):
        for outcome in ("stored", "duplicate", "unrouted", "failed", "quarantined"):
            for kind in KINDS:
                emails.labels(source, outcome, kind)
    for source in TaskSource.ALL:
        for status in TaskStatus.ALL:
            if status != TaskStatus.PENDING:
                task_transitions.labels(source, status)
    for reason in ("watchdog", "expired", "stale_pending", "stale_running", "startup", "unpublished"):
        task_timeouts.labels(reason)
    for outcome in ("ok", "partial", "lease_lost"):
        scheduler_ticks.labels(outcome)
    for kind in ("message", "unrouted"):
        retention_messages_deleted.labels(kind)
    for kind in ("event", "webhook_attempt", "receipt"):
        retention_deliveries_deleted.labels(kind)
    for step in ("stale", "fetch", "sweep", "retention", "messages", "deliveries", "tick"):
        scheduler_tick_failures.labels(step)


_initialise_series()

# -- read from the database at scrape time -------------------------------------------------------

log = logging.getLogger(__name__)


class DatabaseCollector:
    """Figures kept in the database and the spool, read on each scrape (mailferry/overview.py).

    Every process that serves /metrics exports the same values: aggregate them with ``max``.
    A database that cannot be read gives ``mailferry_database_up 0`` and nothing else, never
    a failed scrape.
    """

    def __init__(self, spool_dir):
        self.spool_dir = spool_dir

    def describe(self):
        # Names only, so registering does not query the database.
        return self._families()

    def collect(self):
        from mailferry.errors import MailferryError
        from mailferry.overview import read_overview
        try:
            overview = read_overview(self.spool_dir)
        except MailferryError as exc:
            log.warning("metrics: cannot read the database: %s", exc)
            up = GaugeMetricFamily("mailferry_database_up", _DATABASE_UP_HELP)
            up.add_metric([], 0)
            return [up]
        return list(self._families(overview))

    @staticmethod
    def _families(o=None):
        from mailferry.overview import epoch
        up = GaugeMetricFamily("mailferry_database_up", _DATABASE_UP_HELP)
        tasks = GaugeMetricFamily(
            "mailferry_tasks", "Tasks in the database, by source and status", labels=["source", "status"])
        past = GaugeMetricFamily(
            "mailferry_tasks_running_past_timeout", "RUNNING tasks past their timeout_at")
        failed = GaugeMetricFamily(
            "mailferry_tasks_failed_last_hour", "Tasks that ended FAILED in the last hour")
        pending = GaugeMetricFamily(
            "mailferry_tasks_oldest_pending_seconds", "Age of the oldest PENDING task (0: none)")
        last = GaugeMetricFamily(
            "mailferry_last_successful_fetch_timestamp_seconds",
            "Newest success in the database, by source: imap = the last COMPLETED IMAP fetch "
            "task, smtp = the last inbound message handled (0: never)", labels=["source"])
        mailboxes = GaugeMetricFamily(
            "mailferry_imap_mailboxes", "Active users with an active IMAP configuration")
        unrouted = GaugeMetricFamily(
            "mailferry_unrouted_messages", "Messages kept in unrouted_message (no user matched)")
        quarantined = GaugeMetricFamily(
            "mailferry_quarantined_files", "Message files quarantined in spool/failed")
        expires = GaugeMetricFamily(
            "mailferry_scheduler_lease_expires_timestamp_seconds",
            "When the scheduler lease runs out unless renewed (in the past: no scheduler acts)")
        holder = InfoMetricFamily(
            "mailferry_scheduler_lease", "The scheduler holding an unexpired lease", labels=["holder"])
        if o is not None:
            up.add_metric([], 1)
            for source, counts in sorted(o.tasks.items()):
                for status, n in counts.items():
                    tasks.add_metric([source, status], n)
            past.add_metric([], o.running_past_timeout)
            failed.add_metric([], o.failed_last_hour)
            pending.add_metric([], o.oldest_pending_seconds or 0)
            for source, when in sorted(o.last_success.items()):
                last.add_metric([source], epoch(when))
            mailboxes.add_metric([], o.imap_mailboxes)
            unrouted.add_metric([], o.unrouted)
            quarantined.add_metric([], o.quarantined)
            expires.add_metric([], epoch(o.lease_expires_at))
            if o.lease_holder:
                holder.add_metric([], {"holder": o.lease_holder})
        return [up, tasks, past, failed, pending, last, mailboxes, unrouted, quarantined,
                expires, holder]


_DATABASE_UP_HELP = "1 if the last scrape could read the database"
_collector: DatabaseCollector | None = None
_collector_lock = threading.Lock()


def register_database_collector(spool_dir) -> DatabaseCollector:
    """Export the database figures from this process (once; later calls update the spool)."""
    global _collector
    with _collector_lock:
        if _collector is None:
            _collector = DatabaseCollector(spool_dir)
            REGISTRY.register(_collector)
        else:
            _collector.spool_dir = spool_dir
        return _collector
