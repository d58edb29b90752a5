"""Every Prometheus metric Mailferry exports, in one place.

Units are seconds; labels have few values (source, status, outcome, queue) and never carry a
message id or an address.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

emails = Counter(
    "mailferry_emails", "Messages handled, by source (smtp, imap) and outcome "
    "(stored, duplicate, unrouted, failed, quarantined)", ["source", "outcome"])
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
dead_lettered = Counter(
    "mailferry_dead_lettered", "Messages published to mailferry.dead, by the queue they left",
    ["queue"])
requeued = Counter(
    "mailferry_requeued", "Messages requeued after a transient failure", ["queue"])
scheduler_ticks = Counter(
    "mailferry_scheduler_ticks", "Scheduler ticks run, by outcome", ["outcome"])
scheduler_lease_held = Gauge(
    "mailferry_scheduler_lease_held", "1 while this scheduler holds the lease")
fetch_jobs_published = Counter(
    "mailferry_fetch_jobs_published", "IMAP fetch jobs published by the scheduler")

# Tasks and the scheduler (mailferry/tasks.py, scheduler/).
task_transitions = Counter(
    "mailferry_task_transitions", "Task state changes, by source and the status reached "
    "(SKIPPED counts lock collisions)", ["source", "status"])
tasks_by_status = Gauge(
    "mailferry_tasks", "Tasks in the database by status, as of the last scheduler tick",
    ["status"])
tasks_past_timeout = Gauge(
    "mailferry_tasks_running_past_timeout", "RUNNING tasks past their timeout_at, last tick")
task_timeouts = Counter(
    "mailferry_task_timeouts", "Tasks cancelled by the watchdog, expiry or stale cleanup, "
    "by reason (watchdog, expired, stale_pending, stale_running, startup, unpublished)",
    ["reason"])
scheduler_tick_seconds = Histogram(
    "mailferry_scheduler_tick_seconds", "Time of one scheduler tick",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
scheduler_last_tick = Gauge(
    "mailferry_scheduler_last_tick_timestamp_seconds", "When the scheduler last finished a tick")
spool_republished = Counter(
    "mailferry_spool_republished", "Orphaned spool files republished by the sweep")
retention_deleted = Counter(
    "mailferry_retention_deleted", "Tasks deleted by retention cleanup, by status", ["status"])
