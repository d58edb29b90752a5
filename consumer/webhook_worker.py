"""The webhook worker process (``python -m consumer.webhook_worker``, `mailferry
webhooks worker`): the broker loop with one lane, ``consumer.webhooks.WebhookHandler``.

It is a process of its own, not a lane of the mail consumer, for two reasons. Telling the
application is worth less than storing the mail: under a backlog that fills the machine, the
consumer must keep its CPU, and this process runs at a lower priority
(``MAILFERRY_WEBHOOK_NICE``), catching up once the backlog is stored. And it scales on its
own: an application slow to answer needs more POSTs in flight, not more parsers.
"""

from __future__ import annotations

import logging
import os

from consumer.runner import Runner
from consumer.webhooks import WebhookHandler
from mailferry.app import bootstrap
from mailferry.config import Settings

log = logging.getLogger(__name__)


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings, topology=True)
    from mailferry import health, metrics
    from mailferry.overview import database_problem
    if settings.webhook_nice:
        os.nice(settings.webhook_nice)
    runner = Runner(settings, [WebhookHandler(settings)])
    metrics.register_database_collector(settings.resolved_spool_dir)
    health.add_readiness_check("database", database_problem)
    health.add_readiness_check(
        "broker", lambda: None if runner.ready.is_set() else "not consuming from RabbitMQ")
    health.add_readiness_check("workers", lambda: runner.crashed)
    health.serve(settings, settings.webhook_metrics_port, role="webhooks")
    runner.install_signal_handlers()
    runner.run()
    return 1 if runner.crashed else 0


if __name__ == "__main__":
    raise SystemExit(main())
