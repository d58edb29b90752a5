"""Retention of delivery records (scheduler/event_retention.py), on SQLite and PostgreSQL:
published events and webhook attempts older than ``retention_event_days`` go in batches,
each with an audit row; an event not yet published stays whatever its age."""

from __future__ import annotations

import datetime as dt
import json

from mailferry import metrics, outbox
from mailferry.models import AuditLog, Event, WebhookAttempt, WebhookEndpoint, utcnow
from mailferry.webhooks import delivered_to
from scheduler.event_retention import AUDIT_ACTION, cleanup_events
from tests.ops_helpers import run_cli

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
    return metrics.retention_events_deleted.labels(kind)._value.get()


def test_published_events_and_attempts_past_the_retention_go_unpublished_events_stay(settings):
    settings = settings.replace(retention_event_days=KEEP_DAYS)
    endpoint = _endpoint()
    old = _event("old", days_ago=40, published=True)
    recent = _event("recent", days_ago=10, published=True)
    waiting = _event("waiting", days_ago=40, published=False)  # the relay has not got to it
    _attempt(endpoint, old, days_ago=40)
    kept_attempt = _attempt(endpoint, recent, days_ago=10)
    events_before, attempts_before = _deleted("event"), _deleted("webhook_attempt")

    summary = cleanup_events(settings)

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
    assert cleanup_events(settings).events == 5
    audits = [a.details for a in AuditLog.select().where(AuditLog.action == AUDIT_ACTION)
              .order_by(AuditLog.id)]
    assert [a["count"] for a in audits] == [2, 2, 1]
    assert all(a["kind"] == "event" and a["first_id"] <= a["last_id"] for a in audits)
    assert not Event.select().exists()


def test_a_retention_of_zero_keeps_them_for_ever_and_a_dry_run_only_counts(settings):
    endpoint = _endpoint()
    _attempt(endpoint, _event("ancient", days_ago=4000, published=True), days_ago=4000)
    assert cleanup_events(settings.replace(retention_event_days=0)).events == 0
    preview = cleanup_events(settings.replace(retention_event_days=KEEP_DAYS), dry_run=True)
    assert (preview.events, preview.attempts, preview.dry_run) == (1, 1, True)
    assert Event.select().count() == 1 and WebhookAttempt.select().count() == 1
    assert not AuditLog.select().where(AuditLog.action == AUDIT_ACTION).exists()


def test_the_tick_and_mailferry_cleanup_apply_it(settings):
    from scheduler.tick import run_tick
    from tests.test_scheduler import ListPublisher
    settings = settings.replace(retention_event_days=KEEP_DAYS)
    _event("by-the-tick", days_ago=40, published=True)
    result = run_tick(settings, ListPublisher())
    assert "events" not in result.failed_steps and result.events.events == 1
    _event("by-the-cli", days_ago=40, published=True)
    preview = run_cli(settings, "cleanup", "--dry-run", "--json")
    assert preview.returncode == 0, preview.stderr
    assert json.loads(preview.stdout)["events"] == {
        "retention_days": KEEP_DAYS, "events": 1, "webhook_attempts": 0}
    done = run_cli(settings, "cleanup")
    assert done.returncode == 0, done.stderr
    assert "deleted 1 published event(s) and 0 webhook attempt(s) older than 30 day(s)" in done.stdout
    assert not Event.select().exists()
