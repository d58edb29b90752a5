"""The relay process: publishes the outbox (``mailferry.outbox``) to ``mailferry.events``.

Each batch of events goes out persistent in one AMQP transaction (its commit returns once
the broker holds them all: the guarantee of a publisher confirm, at one disk write per batch
instead of one per event), each under its own id (the AMQP ``message_id``), routed by its
type; only then are their rows marked published. A crash between
the confirm and the mark publishes it again under the same id, which receivers (and our
webhook worker, by its attempt records) take as the same event: nothing is lost, and
nothing is invented under a second id.

Several relays may run, one per host: on PostgreSQL each takes its batch ``FOR UPDATE SKIP
LOCKED`` (``outbox.claimed``), so no event is published by two of them. On SQLite (one host)
run one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time

from mailferry import broker, health, metrics, outbox, starting
from mailferry.app import bootstrap
from mailferry.config import Settings
from mailferry.db import translated
from mailferry.errors import MailferryError

log = logging.getLogger(__name__)

BATCH = 200  # events read per query
BACKOFF_MAX = 10.0  # seconds between tries while the broker or the database is down


class Relay:
    def __init__(self, settings: Settings, publisher: broker.Publisher | None = None):
        self.settings = settings
        self.publisher = publisher or broker.Publisher(settings, declare=True, transactional=True)
        self.stopping = threading.Event()
        self.last_error: str | None = None

    def publish_pending(self) -> int:
        """Publish what the outbox holds, oldest first, in one broker transaction; the
        number published."""
        with translated("publishing the outbox"), outbox.claimed(BATCH) as events:
            if not events:
                return 0
            self.publisher.publish_many(
                [(event.type, json.dumps(outbox.envelope_of(event), ensure_ascii=False).encode(),
                  event.event_id) for event in events], exchange=broker.EVENTS)
        for event in events:
            metrics.events_published.labels(event.type).inc()
        return len(events)

    def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                published = self.publish_pending()
                self.last_error = None
                backoff = 0.5
            except MailferryError as exc:
                self.last_error = str(exc)
                log.warning("relay: %s (trying again in %.1f s)", exc, backoff)
                self.publisher.close()
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            if published < BATCH:
                self.stopping.wait(self.settings.relay_poll_ms / 1000)
        self.publisher.close()

    def stop(self, *_args) -> None:
        self.stopping.set()


def main(settings: Settings | None = None) -> int:
    settings = bootstrap(settings, topology=True)
    if settings.webhook_nice:  # as the webhook worker: storing mail comes first
        os.nice(settings.webhook_nice)
    relay = Relay(settings)
    health.add_readiness_check("relay", lambda: relay.last_error)
    metrics.register_outbox_backlog(outbox.backlog)
    health.serve(settings, settings.relay_metrics_port, role="relay")
    starting.hand_over(relay.stop)
    log.info("relay: publishing the outbox to %s every %d ms", broker.EVENTS,
             settings.relay_poll_ms)
    started = time.monotonic()
    relay.run()
    log.info("relay stopped after %.0f s", time.monotonic() - started)
    return 0
