"""Ends tasks that RabbitMQ timed out: fetch jobs that expired unstarted, and watchdogs.

Both queues receive dead-lettered ``{"v":1,"task_id":…}`` messages. The cancellation is the
state machine's conditional UPDATE, so if the worker finished a moment earlier (or later, and
lost) there is still exactly one outcome; a message for a task that already ended is acked.
"""

from __future__ import annotations

import logging
import time

from mailferry import broker, metrics, tasks
from mailferry.config import Settings
from mailferry.contracts import TaskRef
from mailferry.errors import ContractError
from mailferry.models import TaskStatus
from consumer.handler import Delivery, Handler, Outcome

log = logging.getLogger(__name__)

PREFETCH = 100  # these messages are tiny and each is one UPDATE


def _death_reason(delivery: Delivery) -> str:
    """RabbitMQ's reason for the first dead-lettering: 'expired', 'rejected', 'maxlen'…"""
    deaths = (delivery.properties.headers or {}).get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        reason = deaths[0].get("reason")
        return reason.decode() if isinstance(reason, bytes) else str(reason or "")
    return ""


class _TaskRefHandler(Handler):
    queue = ""
    only_from: tuple[str, ...] = ()
    metric_reason = ""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.prefetch = PREFETCH

    def handle(self, deliveries: list[Delivery]) -> list[Outcome]:
        started = time.perf_counter()
        outcomes = [self._one(d) for d in deliveries]
        metrics.batch_seconds.labels(self.queue).observe(time.perf_counter() - started)
        return outcomes

    def _one(self, delivery: Delivery) -> Outcome:
        try:
            ref = TaskRef.from_body(delivery.body)
        except ContractError as exc:
            return Outcome.dead(f"malformed task reference: {exc}")
        reason = self.reason(delivery)
        # TransientError (database locked) propagates: the runner requeues the batch.
        if tasks.cancel_task(ref.task_id, reason, only_from=self.only_from):
            metrics.task_timeouts.labels(self.metric_reason).inc()
            log.warning("task=%s cancelled: %s", ref.task_id, reason)
        else:
            log.debug("task=%s: %s message ignored, task no longer %s", ref.task_id,
                      self.metric_reason, "/".join(self.only_from))
        return Outcome.ack()

    def reason(self, delivery: Delivery) -> str:
        raise NotImplementedError


class ExpiredJobHandler(_TaskRefHandler):
    """``mailferry.imap_fetch.expired``: a job nobody started within fetch_job_ttl."""

    queue = broker.IMAP_EXPIRED
    only_from = (TaskStatus.PENDING,)
    metric_reason = "expired"

    def reason(self, delivery: Delivery) -> str:
        death = _death_reason(delivery)
        if death and death != "expired":
            return f"fetch job dead-lettered before start ({death})"
        return f"expired before start (job waited over {self.settings.fetch_job_ttl} s in the queue)"


class WatchdogHandler(_TaskRefHandler):
    """``mailferry.task_timeouts``: a RUNNING task's watchdog came back from its delay tier."""

    queue = broker.TASK_TIMEOUTS
    only_from = (TaskStatus.RUNNING,)
    metric_reason = "watchdog"

    def reason(self, delivery: Delivery) -> str:
        seconds = _tier_seconds(delivery)
        return f"timed out after {seconds} s" if seconds else "timed out"


def _tier_seconds(delivery: Delivery) -> int | None:
    """The delay tier the watchdog sat in ("mailferry.watchdog.600s" → 600)."""
    deaths = (delivery.properties.headers or {}).get("x-death") or []
    for death in deaths:
        queue = death.get("queue") if isinstance(death, dict) else None
        queue = queue.decode() if isinstance(queue, bytes) else str(queue or "")
        if queue.startswith("mailferry.watchdog.") and queue.endswith("s"):
            try:
                return int(queue[len("mailferry.watchdog."):-1])
            except ValueError:
                return None
    return None


def build_handlers(settings: Settings) -> list:
    return [ExpiredJobHandler(settings), WatchdogHandler(settings)]
