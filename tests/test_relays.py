"""Several relays over one outbox (issue 26: one relay per host): on PostgreSQL each takes
its batch FOR UPDATE SKIP LOCKED, so two relays side by side publish every event once, and a
relay whose publish fails leaves its batch to the other."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from mailferry import broker, outbox
from mailferry.errors import TransientError
from mailferry.models import Event
from relay.main import Relay
from tests.pipeline import wait_for

EVENTS = 2000


def _published(settings) -> Counter:
    """Message ids on mailferry.webhooks (bound to every event), read and acked."""
    connection = broker.connect(settings.amqp_url)
    try:
        channel = connection.channel()
        ids = Counter()
        while True:
            method, properties, _ = channel.basic_get(broker.WEBHOOKS, auto_ack=True)
            if method is None:
                return ids
            ids[properties.message_id] += 1
    finally:
        connection.close()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_relays_publish_every_event_once(broker_settings):
    settings = broker_settings
    broker.setup_topology(settings)
    outbox.write([outbox.NewEvent(outbox.TASK_FAILED, n, {"task_id": n}) for n in range(EVENTS)])
    relays = [Relay(settings), Relay(settings)]
    counts = [0, 0]

    def count(index, relay):
        real = relay.publish_pending

        def publish_pending():
            published = real()
            counts[index] += published
            return published
        relay.publish_pending = publish_pending

    threads = []
    for index, relay in enumerate(relays):
        count(index, relay)
        threads.append(threading.Thread(target=relay.run, daemon=True))
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: outbox.backlog() == 0, timeout=60, message="the outbox published")
    finally:
        for relay in relays:
            relay.stop()
        for thread in threads:
            thread.join(10)
    published = _published(settings)
    assert sum(published.values()) == EVENTS and set(published.values()) == {1}  # each once
    assert sum(counts) == EVENTS, counts


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_relay_whose_publish_fails_leaves_its_batch_to_the_next(broker_settings):
    settings = broker_settings
    broker.setup_topology(settings)
    outbox.write([outbox.NewEvent(outbox.TASK_FAILED, n, {"task_id": n}) for n in range(50)])

    class Refusing:
        def publish_many(self, messages, *, exchange):
            raise TransientError("the broker went away mid-batch")

    with pytest.raises(TransientError):
        Relay(settings, publisher=Refusing()).publish_pending()
    assert outbox.backlog() == 50  # nothing marked, nothing held
    healthy = Relay(settings)
    try:
        assert healthy.publish_pending() == 50
    finally:
        healthy.publisher.close()
    assert Event.select().where(Event.published_at.is_null()).count() == 0
    assert sum(_published(settings).values()) == 50
