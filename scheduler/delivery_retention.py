"""Retention of delivery records (``retention_event_days``, 30 by default; 0 keeps them for
ever): outbox events published longer ago than that, webhook attempts and inbound receipts
written longer ago, are deleted in batches, each with an AuditLog row. Each stored message
writes an event, an attempt or more per endpoint and, from SMTP, a receipt; without this
those tables grow for ever, even with a message retention set.

An event not yet published is never deleted, whatever its age: the outbox row is the promise
that it will be. Past the retention a webhook event replayed from the dead letters (``mailferry
replay``) finds no attempt that says an endpoint took it, and is POSTed again under its same
id (``webhook-id``), which the application dedups by.

A receipt is how the spool sweep knows a message is done: deleted while its message is still
on a spool, it would have the sweep publish that message again. A message stays on a spool
while its segment holds one not yet done, and for as long as its host is down. So each host's
sweep reports a floor (``SpoolFloor``): no message left on its spool has a receipt older. A
node's receipts go only when older than both the retention and its floor less a day (hosts'
clocks and the youngest files, which the sweep does not read). A node whose sweep never
reported — or stopped reporting — keeps its receipts; ``mailferry cleanup --retired-node``
says a host's spool is gone for good.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field

import peewee

from mailferry import metrics
from mailferry.config import Settings
from mailferry.contracts import iso_utc
from mailferry.db import translated
from mailferry.models import AuditLog, Event, InboundReceipt, SpoolFloor, WebhookAttempt, utcnow
from scheduler.retention import locked, write_transaction

log = logging.getLogger(__name__)

AUDIT_ACTION = "deliveries_deleted"
FLOOR_MARGIN = dt.timedelta(days=1)


@dataclass
class DeliveryRetentionSummary:
    events: int = 0  # published events deleted (or due, in a dry run)
    attempts: int = 0  # webhook attempts deleted (or due)
    receipts: int = 0  # inbound receipts deleted (or due)
    # node -> the floor that holds its receipts back (None: its sweep never reported one)
    held: dict[str, str | None] = field(default_factory=dict)
    dry_run: bool = False


@dataclass
class _Due:
    """One kind of record, and the rows of it that are due."""
    kind: str  # event | webhook_attempt | receipt
    model: type[peewee.Model]
    condition: peewee.Expression
    age: peewee.Field  # the indexed column the condition bounds: batches are read in its order
    before: dt.datetime
    node: str | None = None  # a receipt's spool

    def audit(self) -> dict:
        return {"kind": self.kind, "before": iso_utc(self.before),
                **({} if self.node is None else {"node": self.node})}


def cleanup_deliveries(settings: Settings, *, dry_run: bool = False,
                       now: dt.datetime | None = None) -> DeliveryRetentionSummary:
    summary = DeliveryRetentionSummary(dry_run=dry_run)
    if not settings.retention_event_days:
        return summary
    now = now or utcnow()
    cutoff = now - dt.timedelta(days=settings.retention_event_days)
    with translated("delivery retention"):
        counts = {"event": 0, "webhook_attempt": 0, "receipt": 0}
        for due in _due(cutoff, summary):
            counts[due.kind] += _apply(due, settings.retention_batch_size, dry_run, now)
    summary.events, summary.attempts, summary.receipts = counts.values()
    if not dry_run and (summary.events or summary.attempts or summary.receipts):
        log.info("retention: deleted %d published event(s), %d webhook attempt(s) and %d inbound "
                 "receipt(s) older than %d day(s)", summary.events, summary.attempts,
                 summary.receipts, settings.retention_event_days)
    for node, floor in summary.held.items():
        log.info("retention: receipts of node %r kept from before %s: %s", node or "(one host)",
                    floor or "ever", "its spool sweep has not reported" if floor is None else
                    "its spool holds messages stored then, or its sweep stopped reporting")
    return summary


def retire_node(node: str, now: dt.datetime | None = None) -> None:
    """Say that ``node``'s spool is gone for good (the host was retired, its spool drained or
    lost): none of its receipts is needed past the retention."""
    now = now or utcnow()
    with translated("retiring a node"):
        SpoolFloor.report(node, now, now)


def _due(cutoff: dt.datetime, summary: DeliveryRetentionSummary):
    # (NULL, an unpublished event, is never < cutoff.)
    yield _Due("event", Event, Event.published_at < cutoff, Event.published_at, cutoff)
    yield _Due("webhook_attempt", WebhookAttempt, WebhookAttempt.created_at < cutoff,
               WebhookAttempt.created_at, cutoff)
    floors = dict(SpoolFloor.select(SpoolFloor.node, SpoolFloor.floor).tuples())
    for node in _receipt_nodes():
        if node not in floors:
            summary.held[node] = None
            continue
        before = min(cutoff, floors[node] - FLOOR_MARGIN)
        if before < cutoff:
            summary.held[node] = iso_utc(floors[node])
        yield _Due("receipt", InboundReceipt,
                   (InboundReceipt.node == node) & (InboundReceipt.created_at < before),
                   InboundReceipt.created_at, before, node)


def _receipt_nodes() -> list[str]:
    """The nodes receipts name, one index probe each (a loose index scan on (node,
    created_at)): a DISTINCT would read every receipt, each tick."""
    table = InboundReceipt._meta.table_name
    cursor = InboundReceipt._meta.database.execute_sql(
        f'WITH RECURSIVE nodes(node) AS ('
        f' SELECT MIN("node") FROM "{table}"'
        f' UNION ALL SELECT (SELECT MIN("node") FROM "{table}" WHERE "node" > nodes.node)'
        f' FROM nodes WHERE nodes.node IS NOT NULL)'
        f' SELECT node FROM nodes WHERE node IS NOT NULL')
    return [row[0] for row in cursor.fetchall()]


def _apply(due: _Due, batch_size: int, dry_run: bool, now: dt.datetime) -> int:
    if dry_run:
        return due.model.select().where(due.condition).count()
    total = 0
    while deleted := _expire(due, batch_size, now):
        total += deleted
        metrics.retention_deliveries_deleted.labels(due.kind).inc(deleted)
        if deleted < batch_size:
            break
    return total


def _expire(due: _Due, batch_size: int, now: dt.datetime) -> int:
    """One batch, in one transaction, with its audit row: how many rows went."""
    model = due.model
    with write_transaction():
        ids = [row.id for row in locked(model.select(model.id).where(due.condition)
                                        .order_by(due.age).limit(batch_size))]
        if not ids:
            return 0
        deleted = model.delete().where(model.id.in_(ids) & due.condition).execute()
        AuditLog.create(action=AUDIT_ACTION, created_at=now, details={
            **due.audit(), "count": deleted, "first_id": min(ids), "last_id": max(ids)})
    return deleted
