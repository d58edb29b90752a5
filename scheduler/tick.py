"""One scheduler tick: stale-task cleanup, IMAP fetch jobs, spool sweep, retention (of tasks,
then of messages, then of delivery records).

The steps are independent: one that fails (broker down, database locked, or an error nobody
foresaw) is logged and counted, and the others still run; no error leaves the tick. The
lease is renewed before each step and the tick stops if it was lost, so two schedulers never
act at once for longer than one step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mailferry import metrics
from mailferry.config import Settings
from mailferry.errors import MailferryError
from scheduler.cleanup import cleanup_stale_tasks
from scheduler.delivery_retention import DeliveryRetentionSummary, cleanup_deliveries
from scheduler.fetch import FetchSummary, schedule_imap_fetch
from scheduler.message_retention import MessageRetentionSummary, cleanup_messages
from scheduler.retention import RetentionSummary, cleanup_tasks
from scheduler.sweep import SweepSummary, sweep_spool

log = logging.getLogger(__name__)


@dataclass
class TickResult:
    stale: dict | None = None
    fetch: FetchSummary | None = None
    sweep: SweepSummary | None = None
    retention: RetentionSummary | None = None
    messages: MessageRetentionSummary | None = None
    deliveries: DeliveryRetentionSummary | None = None
    failed_steps: list[str] = field(default_factory=list)
    lease_lost: bool = False
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        if self.lease_lost:
            return "lease_lost"
        return "partial" if self.failed_steps else "ok"


def run_tick(settings: Settings, publisher, *, lease=None, retention: bool = True) -> TickResult:
    started = time.perf_counter()
    result = TickResult()
    steps = [
        ("stale", lambda: cleanup_stale_tasks(settings)),
        ("fetch", lambda: schedule_imap_fetch(
            settings, publisher, still_ours=None if lease is None else lambda: _still_ours(lease))),
        ("sweep", lambda: sweep_spool(settings, publisher)),
    ]
    if retention:
        steps.append(("retention", lambda: cleanup_tasks(settings)))
        steps.append(("messages", lambda: cleanup_messages(settings)))
        steps.append(("deliveries", lambda: cleanup_deliveries(settings)))
    for name, step in steps:
        if lease is not None and not _still_ours(lease):
            result.lease_lost = True
            log.warning("tick stopped before %s: the lease is no longer ours", name)
            break
        try:
            setattr(result, name, step())
            if getattr(getattr(result, name), "errors", None):
                result.failed_steps.append(name)  # ran, but could not publish everything
        except MailferryError as exc:
            result.failed_steps.append(name)
            log.error("tick step %s failed: %s", name, exc)
        except Exception:  # noqa: BLE001 - one bad item (a hostile file) must not stop the loop
            result.failed_steps.append(name)
            metrics.scheduler_tick_failures.labels(name).inc()
            log.exception("tick step %s failed unexpectedly; the next tick runs as usual", name)
    result.seconds = time.perf_counter() - started
    metrics.scheduler_tick_seconds.observe(result.seconds)
    metrics.scheduler_ticks.labels(result.outcome).inc()
    if result.outcome == "ok":
        metrics.scheduler_last_tick.set_to_current_time()
    return result


def _still_ours(lease) -> bool:
    """Renew before each step: a long tick must not outlive the lease it started under."""
    try:
        return lease.acquire()
    except MailferryError:
        return False

