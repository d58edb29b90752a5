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
