"""The consumer process: every queue handler on one connection, until SIGTERM."""

from __future__ import annotations

import logging

from consumer.expiry import build_handlers as expiry_handlers
from consumer.imap_worker import build_handlers as imap_handlers
from consumer.inbound import InboundHandler
from mailferry.app import bootstrap
from mailferry.config import Settings
from consumer.runner import Runner

log = logging.getLogger(__name__)


def build_handlers(settings: Settings) -> list:
    """Every queue this process consumes: inbound mail, IMAP fetch jobs, task timeouts (the
    webhooks have a process of their own: consumer/webhook_worker.py)."""
    return [InboundHandler(settings), *imap_handlers(settings), *expiry_handlers(settings)]


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings)
    from mailferry import health, metrics
    from mailferry.overview import database_problem
    runner = Runner(settings, build_handlers(settings))
    metrics.register_database_collector(settings.resolved_spool_dir)
    health.add_readiness_check("database", database_problem)
    health.add_readiness_check(
        "broker", lambda: None if runner.ready.is_set() else "not consuming from RabbitMQ")
    health.add_readiness_check("workers", lambda: runner.crashed)
    health.serve(settings, settings.consumer_metrics_port, role="consumer")
    runner.install_signal_handlers()
    runner.run()
    if runner.crashed:
        log.critical("consumer exits: %s", runner.crashed)
        return 1
    return 0
