"""Retention of delivery records (scheduler/delivery_retention.py), on SQLite and PostgreSQL:
published events, webhook attempts and inbound receipts older than ``retention_event_days``
go in batches, each with an audit row; an event not yet published stays whatever its age,
and a receipt stays while a spool may still hold its message (its sweep's floor)."""

from __future__ import annotations

import datetime as dt
import json

from mailferry import metrics, outbox
from devstack import mailgen
from mailferry.models import (
    AuditLog, Event, InboundReceipt, SpoolFloor, WebhookAttempt, WebhookEndpoint, utcnow,
)
from mailferry.spool import Spool
from mailferry.webhooks import delivered_to
from scheduler.delivery_retention import AUDIT_ACTION, cleanup_deliveries
from scheduler.sweep import sweep_spool
from tests.ops_helpers import run_cli
from tests.test_scheduler import ListPublisher
from tests.test_spool_segments import Segment

KEEP_DAYS = 30


def _event(key: str, *, days_ago: int, published: bool) -> str:
    """An outbox event written ``days_ago`` days ago and, if ``published``, published then."""
    outbox.add([outbox.NewEvent(outbox.STORED, key, {"key": key})])
    event_id = outbox.event_id(outbox.STORED, key)
    when = utcnow() - dt.timedelta(days=days_ago)
    Event.update(created_at=when, published_at=when if published else None) \
        .where(Event.event_id == event_id).execute()
    return event_id


def _attempt(endpoint: WebhookEndpoint, event_id: str, *, days_ago: int) -> WebhookAttempt:
    return WebhookAttempt.create(endpoint=endpoint, event_id=event_id, event_type=outbox.STORED,
                                 attempt=1, outcome="delivered", status=200,
                                 created_at=utcnow() - dt.timedelta(days=days_ago))


def _endpoint() -> WebhookEndpoint:
    return WebhookEndpoint.create(url="http://127.0.0.1:1/hook", secret="x")


def _deleted(kind: str) -> float:
    return metrics.retention_deliveries_deleted.labels(kind)._value.get()


def test_published_events_and_attempts_past_the_retention_go_unpublished_events_stay(settings):
    settings = settings.replace(retention_event_days=KEEP_DAYS)
    endpoint = _endpoint()
    old = _event("old", days_ago=40, published=True)
    recent = _event("recent", days_ago=10, published=True)
    waiting = _event("waiting", days_ago=40, published=False)  # the relay has not got to it
    _attempt(endpoint, old, days_ago=40)
    kept_attempt = _attempt(endpoint, recent, days_ago=10)
    events_before, attempts_before = _deleted("event"), _deleted("webhook_attempt")

    summary = cleanup_deliveries(settings)

    assert (summary.events, summary.attempts) == (1, 1)
    assert {e.event_id for e in Event.select()} == {recent, waiting}
    assert [a.id for a in WebhookAttempt.select()] == [kept_attempt.id]
    audits = sorted((a.details["kind"], a.details["count"])
                    for a in AuditLog.select().where(AuditLog.action == AUDIT_ACTION))
    assert audits == [("event", 1), ("webhook_attempt", 1)]
    assert _deleted("event") - events_before == 1
    assert _deleted("webhook_attempt") - attempts_before == 1
    # What the retention gives up: a replayed old event no longer knows who took it.
    assert delivered_to([old, recent]) == {(recent, endpoint.id)}


def test_events_go_in_batches_of_the_batch_size_each_audited(settings):
    settings = settings.replace(retention_event_days=KEEP_DAYS, retention_batch_size=2)
    for n in range(5):
        _event(f"e{n}", days_ago=31 + n, published=True)
    assert cleanup_deliveries(settings).events == 5
    audits = [a.details for a in AuditLog.select().where(AuditLog.action == AUDIT_ACTION)
              .order_by(AuditLog.id)]
    assert [a["count"] for a in audits] == [2, 2, 1]
    assert all(a["kind"] == "event" and a["first_id"] <= a["last_id"] for a in audits)
    assert not Event.select().exists()


def test_a_retention_of_zero_keeps_them_for_ever_and_a_dry_run_only_counts(settings):
    endpoint = _endpoint()
    _attempt(endpoint, _event("ancient", days_ago=4000, published=True), days_ago=4000)
    assert cleanup_deliveries(settings.replace(retention_event_days=0)).events == 0
    preview = cleanup_deliveries(settings.replace(retention_event_days=KEEP_DAYS), dry_run=True)
    assert (preview.events, preview.attempts, preview.dry_run) == (1, 1, True)
    assert Event.select().count() == 1 and WebhookAttempt.select().count() == 1
    assert not AuditLog.select().where(AuditLog.action == AUDIT_ACTION).exists()


def test_the_tick_and_mailferry_cleanup_apply_it(settings):
    from scheduler.tick import run_tick
    settings = settings.replace(retention_event_days=KEEP_DAYS)
    _event("by-the-tick", days_ago=40, published=True)
    result = run_tick(settings, ListPublisher())
    assert "deliveries" not in result.failed_steps and result.deliveries.events == 1
    _event("by-the-cli", days_ago=40, published=True)
    preview = run_cli(settings, "cleanup", "--dry-run", "--json")
    assert preview.returncode == 0, preview.stderr
    assert json.loads(preview.stdout)["deliveries"] == {
        "retention_days": KEEP_DAYS, "events": 1, "webhook_attempts": 0, "receipts": 0,
        "receipts_held_by": {}}
    done = run_cli(settings, "cleanup")
    assert done.returncode == 0, done.stderr
    assert ("deleted 1 published event(s), 0 webhook attempt(s) and 0 inbound receipt(s) older "
            "than 30 day(s)") in done.stdout
    assert not Event.select().exists()


def _receipt(queue_id: str, *, days_ago: float, node: str = "") -> InboundReceipt:
    return InboundReceipt.create(queue_id=queue_id, outcome="stored", stored_count=1, node=node,
                                 created_at=utcnow() - dt.timedelta(days=days_ago))


def _floor(node: str, *, days_ago: float) -> None:
    SpoolFloor.create(node=node, floor=utcnow() - dt.timedelta(days=days_ago))


def _receipts() -> set[str]:
    return {r.queue_id for r in InboundReceipt.select()}


def test_a_node_s_receipts_go_past_the_retention_and_its_spool_s_floor(settings):
    settings = settings.replace(retention_event_days=KEEP_DAYS)
    _floor("mx1", days_ago=0)  # its spool holds nothing older
    _floor("mx2", days_ago=35)  # its spool still holds a message stored 35 days ago
    for node in ("mx1", "mx2", "mx3"):  # mx3's sweep never reported
        _receipt(f"{node}-old", days_ago=40, node=node)
        _receipt(f"{node}-35", days_ago=35.5, node=node)
        _receipt(f"{node}-new", days_ago=10, node=node)

    summary = cleanup_deliveries(settings)

    assert _receipts() == {"mx1-new", "mx2-35", "mx2-new", "mx3-old", "mx3-35", "mx3-new"}
    assert summary.receipts == 3 and set(summary.held) == {"mx2", "mx3"}
    assert summary.held["mx3"] is None
    audits = [a.details for a in AuditLog.select().where(AuditLog.action == AUDIT_ACTION)]
    assert sorted((a["node"], a["count"]) for a in audits if a["kind"] == "receipt") == [
        ("mx1", 2), ("mx2", 1)]


def test_the_sweep_s_floor_keeps_the_receipts_of_a_segment_that_stays(settings):
    """End to end on a real spool: a segment with one message stored 40 days ago and one not
    yet done stays, and so does the stored one's receipt; once the other is done the sweep
    removes the segment and the receipt may go."""
    settings = settings.replace(retention_event_days=KEEP_DAYS, spool_segment_idle=2,
                                spool_sweep_age=3600)
    segment = Segment(Spool(settings.resolved_spool_dir).ensure())
    segment.add(mailgen.plain(1), "Q-STORED")
    segment.add(mailgen.plain(2), "Q-WAITING")
    segment.age(60)  # written a minute ago: the sweep reads it, and republishes nothing yet
    _receipt("Q-STORED", days_ago=40)
    _receipt("OTHER", days_ago=50)  # a message whose segment is long gone

    sweep_spool(settings, ListPublisher())
    assert cleanup_deliveries(settings).receipts == 1
    assert _receipts() == {"Q-STORED"} and segment.path.exists()

    _receipt("Q-WAITING", days_ago=0)
    sweep_spool(settings, ListPublisher())
    assert not segment.path.exists()
    assert cleanup_deliveries(settings).receipts == 1
    assert _receipts() == {"Q-WAITING"}


def test_mailferry_cleanup_retires_a_node_whose_spool_is_gone(settings):
    settings = settings.replace(retention_event_days=KEEP_DAYS)
    _receipt("gone-host", days_ago=40, node="mx9")
    preview = run_cli(settings, "cleanup", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert "receipts of node 'mx9' kept for ever" in preview.stdout and "--retired-node" in preview.stdout
    done = run_cli(settings, "cleanup", "--retired-node", "mx9")
    assert done.returncode == 0, done.stderr
    assert "1 inbound receipt(s)" in done.stdout and not _receipts()
