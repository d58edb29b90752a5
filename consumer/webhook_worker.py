"""The webhook worker process (``python -m consumer.webhook_worker``, `mailferry
webhooks worker`): the broker loop with one lane, ``consumer.webhooks.WebhookHandler``.

It is a process of its own, not a lane of the mail consumer, for two reasons. Telling the
application is worth less than storing the mail: under a backlog that fills the machine, the
consumer must keep its CPU, and this process runs at a lower priority
(``MAILFERRY_WEBHOOK_NICE``), catching up once the backlog is stored. And it scales on its
own: an application slow to answer needs more POSTs in flight, not more parsers.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports: a stop while starting is a clean stop
    from mailferry.starting import stop_while_starting
    stop_while_starting()

import os  # noqa: E402

from consumer.runner import serve  # noqa: E402
from consumer.webhooks import WebhookHandler  # noqa: E402
from mailferry.app import bootstrap  # noqa: E402
from mailferry.config import Settings  # noqa: E402


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings, topology=True)
    if settings.webhook_nice:
        os.nice(settings.webhook_nice)
    return serve(settings, [WebhookHandler(settings)], settings.webhook_metrics_port, "webhooks")


if __name__ == "__main__":
    raise SystemExit(main())
