"""Ending tasks nobody will end: at scheduler start, and every tick (stale tasks).

The watchdog and the expiry queue end tasks in the normal case; these are the backstops for
a lost message, a consumer that was down, or a process that died between commit and publish.
"""

from __future__ import annotations

import datetime as dt
import logging

from mailferry.config import Settings
from mailferry.models import EmailTask, TaskStatus, utcnow
from mailferry.tasks import cancel_where

log = logging.getLogger(__name__)

# Extra seconds past a task's deadline before the tick steps in, so that the expiry and
# watchdog messages, which carry the precise reason, normally win.
STALE_GRACE = 30


def startup_cleanup(settings: Settings, now: dt.datetime | None = None) -> dict[str, int]:
    """Cancel PENDING tasks (their jobs predate this scheduler) and RUNNING ones past timeout."""
    now = now or utcnow()
    pending = cancel_where(
        (EmailTask.status == TaskStatus.PENDING) & (EmailTask.created_at <= now),
        "cancelled at scheduler start: still PENDING from before the start",
        metric_reason="startup", only_from=(TaskStatus.PENDING,))
    running = cancel_where(
        EmailTask.timeout_at < now,
        "timed out: RUNNING past its timeout at scheduler start",
        metric_reason="startup", only_from=(TaskStatus.RUNNING,))
    if pending or running:
        log.info("startup cleanup: cancelled %d pending and %d timed-out running task(s)",
                 len(pending), len(running))
    return {"pending": len(pending), "running": len(running)}


def cleanup_stale_tasks(settings: Settings, now: dt.datetime | None = None) -> dict[str, int]:
    """Cancel PENDING tasks older than the job TTL and RUNNING tasks past their timeout."""
    now = now or utcnow()
    pending_cutoff = now - dt.timedelta(seconds=settings.fetch_job_ttl + STALE_GRACE)
    running_cutoff = now - dt.timedelta(seconds=STALE_GRACE)
    pending = cancel_where(
        EmailTask.created_at < pending_cutoff,
        f"expired before start: PENDING over {settings.fetch_job_ttl} s (stale-task cleanup)",
        metric_reason="stale_pending", only_from=(TaskStatus.PENDING,))
    running = cancel_where(
        EmailTask.timeout_at < running_cutoff,
        "timed out: RUNNING past its timeout (stale-task cleanup)",
        metric_reason="stale_running", only_from=(TaskStatus.RUNNING,))
    return {"pending": len(pending), "running": len(running)}
