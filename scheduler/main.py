"""The scheduler process: wait for the lease, clean up once, then tick every interval.

Between ticks it keeps renewing the lease (lease_seconds is shorter than the interval) and a
standby keeps trying to take it. SIGTERM/SIGINT only set a flag: the current tick finishes,
the lease is released so a standby takes over at once, and the process exits.
"""

from __future__ import annotations

import logging
import threading
import time

from mailferry import health, metrics, starting
from mailferry.app import bootstrap
from mailferry.broker import Publisher
from mailferry.config import Settings
from mailferry.errors import MailferryError
from mailferry.overview import database_problem
from scheduler.cleanup import startup_cleanup
from scheduler.lease import Lease
from scheduler.sweep import sweep_spool
from scheduler.tick import TickResult, run_tick

log = logging.getLogger(__name__)

READY_SLACK = 30  # seconds past two intervals before /readyz calls the scheduler stuck


class Scheduler:
    def __init__(self, settings: Settings, *, publisher=None, lease: Lease | None = None):
        self.settings = settings
        self.publisher = publisher or Publisher(settings, declare=True)
        self.lease = lease or Lease(settings.lease_seconds)
        self.stopping = threading.Event()
        self.cleaned_up = False
        self.ticks = 0
        self.last_tick: TickResult | None = None
        self.last_tick_at: float | None = None  # monotonic
        self.last_lease_check: float | None = None  # monotonic

    def stop(self, *_args) -> None:
        """Signal-safe: only sets a flag."""
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        starting.hand_over(self.stop)

    @property
    def renew_every(self) -> float:
        return max(0.5, self.settings.lease_seconds / 3)

    def run(self, max_ticks: int | None = None) -> None:
        next_tick = time.monotonic()
        try:
            while not self.stopping.is_set():
                # Asked to stop while taking the lease (another scheduler released it on its
                # own way out): no new tick.
                if (self._hold_lease() and time.monotonic() >= next_tick
                        and not self.stopping.is_set()):
                    next_tick = time.monotonic() + self.settings.schedule_interval
                    self.tick_once()
                    if max_ticks is not None and self.ticks >= max_ticks:
                        break
                    continue
                if (self.settings.node and time.monotonic() >= next_tick
                        and not self.stopping.is_set() and not self.lease.held()):
                    # One of several hosts: its spool is its own disk, which the acting
                    # scheduler (on another host) cannot read. A standby sweeps it.
                    next_tick = time.monotonic() + self.settings.schedule_interval
                    self.sweep_own_spool()
                wait = self.renew_every
                if self.lease.held():
                    wait = min(wait, max(0.0, next_tick - time.monotonic()))
                self.stopping.wait(wait)
        finally:
            self.lease.release()
            self.publisher.close()

    def _hold_lease(self) -> bool:
        try:
            held = self.lease.acquire()
        except MailferryError as exc:
            log.warning("cannot check the lease: %s", exc)
            return False
        self.last_lease_check = time.monotonic()
        return held

    def tick_once(self) -> TickResult:
        if not self.cleaned_up:
            try:
                startup_cleanup(self.settings)
                self.cleaned_up = True
            except MailferryError as exc:
                log.error("startup cleanup failed (will retry next tick): %s", exc)
        try:
            result = run_tick(self.settings, self.publisher, lease=self.lease)
        except Exception:  # noqa: BLE001 - run_tick contains its steps; this is the last guard
            metrics.scheduler_tick_failures.labels("tick").inc()
            log.exception("tick failed; the next one runs as usual")
            result = TickResult(failed_steps=["tick"])
        finally:
            # An idle BlockingConnection cannot answer heartbeats between ticks; a fresh
            # connection per tick costs one handshake a minute.
            self.publisher.close()
        self.ticks += 1
        self.last_tick, self.last_tick_at = result, time.monotonic()
        log.info("tick %d: %s in %.2f s", self.ticks, result.outcome, result.seconds)
        return result

    def sweep_own_spool(self) -> None:
        """The spool sweep alone, as a standby on one host of several runs it."""
        try:
            summary = sweep_spool(self.settings, self.publisher)
            log.info("standby sweep of this host's spool: %d found, %d republished", summary.found,
                     summary.republished)
        except Exception:  # noqa: BLE001 - the next interval tries again
            metrics.scheduler_tick_failures.labels("sweep").inc()
            log.exception("standby sweep of this host's spool failed")
        finally:
            self.publisher.close()

    def broker_readiness(self) -> str | None:
        """None unless the acting scheduler's last tick could not publish its fetch jobs.

        The publisher connects only when a tick has something to publish, so this is the
        broker as the scheduler last needed it, without an extra connection per probe.
        """
        fetch = self.last_tick.fetch if self.last_tick is not None else None
        if fetch is None or not fetch.unpublished or not self.lease.held():
            return None
        return f"the last tick could not publish {fetch.unpublished} fetch job(s): " + (
            fetch.errors[-1] if fetch.errors else "RabbitMQ unavailable")

    def readiness(self) -> str | None:
        """None when healthy: acting and ticking on time, or standing by and checking the lease."""
        now = time.monotonic()
        limit = 2 * self.settings.schedule_interval + READY_SLACK
        if self.lease.held():
            if self.last_tick_at is None or now - self.last_tick_at > limit:
                return "holds the lease but has not finished a tick recently"
            return None
        if self.last_lease_check is None or now - self.last_lease_check > 3 * self.renew_every + READY_SLACK:
            return "cannot reach the database to check the lease"
        return None


def main(settings: Settings | None = None) -> int:
    # The publisher declares the topology on each connection, so a broker that is down at
    # start only costs the ticks until it is back.
    settings = bootstrap(settings)
    scheduler = Scheduler(settings)
    metrics.register_database_collector(settings.resolved_spool_dir)
    health.add_readiness_check("database", database_problem)
    health.add_readiness_check("broker", scheduler.broker_readiness)
    health.add_readiness_check("scheduler", scheduler.readiness)
    health.serve(settings, settings.scheduler_metrics_port, role="scheduler")
    scheduler.install_signal_handlers()
    log.info("scheduler %s: ticking every %d s once it holds the lease",
             scheduler.lease.holder, settings.schedule_interval)
    scheduler.run()
    return 0
