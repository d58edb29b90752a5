"""RabbitMQ: the topology (declared by every process, idempotently), connections, and a
publisher that waits for the broker's confirm.

Every pika exception stops here and leaves as a TransientError or PermanentError.
"""

from __future__ import annotations

import logging
import time

import pika
import pika.exceptions as px

from mailferry.config import Settings, split_urls
from mailferry.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

EXCHANGE = "mailferry"
INBOUND = "mailferry.inbound"
IMAP_FETCH = "mailferry.imap_fetch"
IMAP_EXPIRED = "mailferry.imap_fetch.expired"
TASK_TIMEOUTS = "mailferry.task_timeouts"
DEAD = "mailferry.dead"
EVENTS = "mailferry.events"  # a topic exchange: routing key = event type
WEBHOOKS = "mailferry.webhooks"  # every event, for the webhook worker

# queue -> routing key on the "mailferry" exchange
ROUTING_KEYS = {
    INBOUND: "inbound",
    IMAP_FETCH: "imap_fetch",
    IMAP_EXPIRED: "imap_fetch.expired",
    TASK_TIMEOUTS: "task_timeout",
    DEAD: "dead",
}

# Headers a dead-lettered message carries, so an operator (and `mailferry replay`) knows why
# it is there and where it came from.
H_REASON = "x-mailferry-reason"
H_QUEUE = "x-mailferry-queue"
H_ROUTING_KEY = "x-mailferry-routing-key"
H_FAILED_AT = "x-mailferry-failed-at"
# Failed deliveries of a message on a classic queue, carried when it is requeued (a quorum
# queue counts them itself, in x-delivery-count): every consumer, and a restart, sees it.
H_ATTEMPTS = "x-mailferry-attempts"

CONNECTION_ERRORS = (px.AMQPConnectionError, px.ConnectionClosed, px.ChannelClosed,
                     px.StreamLostError, px.ChannelWrongStateError, ConnectionError, OSError)


def inbound_queue(settings: Settings) -> str:
    """The queue this host's inbound jobs wait in: its own when it is one node of several
    (a job names a file on this host's spool, which no other host can read)."""
    return f"{INBOUND}.{settings.node}" if settings.node else INBOUND


def inbound_key(settings: Settings) -> str:
    """The routing key of ``inbound_queue``: what this host's Haraka publishes with."""
    return f"{ROUTING_KEYS[INBOUND]}.{settings.node}" if settings.node else ROUTING_KEYS[INBOUND]


def watchdog_queue(seconds: int) -> tuple[str, str]:
    """(queue, routing key) of the delay tier for ``seconds``.

    RabbitMQ expires messages only at the head of a queue, so each timeout value gets its own
    queue with one queue-level TTL; mixing per-message TTLs in one queue would stall them.
    """
    return f"mailferry.watchdog.{seconds}s", f"watchdog.{seconds}s"


def connection_parameters(url: str) -> pika.URLParameters:
    params = pika.URLParameters(url)
    # The I/O thread services heartbeats while workers run (see runner.py), so a modest
    # heartbeat is safe and detects a dead broker quickly.
    params.heartbeat = 30
    params.blocked_connection_timeout = 120
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.client_properties = {"connection_name": "mailferry"}
    return params


def connect(url: str) -> pika.BlockingConnection:
    """A connection to the first node of ``url`` (one URL, or a cluster's, separated by
    commas) that answers: pika tries them in turn."""
    try:
        return pika.BlockingConnection([connection_parameters(node) for node in split_urls(url)])
    except px.ProbableAuthenticationError as exc:
        raise PermanentError(f"RabbitMQ refused the credentials in MAILFERRY_AMQP_URL: {exc}") from exc
    except CONNECTION_ERRORS as exc:
        raise TransientError(f"RabbitMQ unreachable: {exc!r}") from exc


def _queue_args(settings: Settings, **extra) -> dict:
    args = {"x-queue-type": settings.queue_type}
    args.update(extra)
    if settings.queue_type == "quorum" and "x-dead-letter-exchange" in args:
        # By default a quorum queue dead-letters at most once, without confirms: a webhook
        # retry or a task's watchdog leaving its delay queue during a failover could be lost.
        # at-least-once re-publishes until the target queue confirms (and needs
        # reject-publish, which takes effect only with a length limit: none is set here).
        args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    return args


def declare_topology(channel, settings: Settings) -> None:
    """Declare the exchange and every fixed queue; safe to call from every process."""
    channel.exchange_declare(EXCHANGE, exchange_type="direct", durable=True)
    dead_letter_to = {"x-dead-letter-exchange": EXCHANGE, "x-dead-letter-routing-key": "dead"}
    declarations = {
        INBOUND: _queue_args(settings, **dead_letter_to),
        IMAP_FETCH: _queue_args(
            settings,
            **{"x-message-ttl": settings.fetch_job_ttl * 1000,
               "x-dead-letter-exchange": EXCHANGE,
               "x-dead-letter-routing-key": ROUTING_KEYS[IMAP_EXPIRED]}),
        IMAP_EXPIRED: _queue_args(settings, **dead_letter_to),
        TASK_TIMEOUTS: _queue_args(settings, **dead_letter_to),
        DEAD: _queue_args(settings),
    }
    if settings.node:  # one host of several: its own inbound queue, not the shared one
        channel.queue_declare(inbound_queue(settings), durable=True, arguments=declarations.pop(INBOUND))
        channel.queue_bind(inbound_queue(settings), EXCHANGE, routing_key=inbound_key(settings))
    for queue, arguments in declarations.items():
        channel.queue_declare(queue, durable=True, arguments=arguments)
        channel.queue_bind(queue, EXCHANGE, routing_key=ROUTING_KEYS[queue])
    declare_watchdog(channel, settings, settings.task_timeout)
    channel.exchange_declare(EVENTS, exchange_type="topic", durable=True)
    channel.queue_declare(WEBHOOKS, durable=True, arguments=_queue_args(settings, **dead_letter_to))
    channel.queue_bind(WEBHOOKS, EVENTS, routing_key="#")
    for seconds in set(settings.webhook_delays):
        channel.queue_declare(webhook_wait_queue(seconds), durable=True, arguments=_queue_args(
            settings, **{"x-message-ttl": seconds * 1000, "x-dead-letter-exchange": "",
                         "x-dead-letter-routing-key": WEBHOOKS}))


def webhook_wait_queue(seconds: int) -> str:
    """The delay queue a webhook retry waits ``seconds`` in (one TTL per queue, as for the
    watchdog), published to through the default exchange; it dead-letters back to
    ``mailferry.webhooks``."""
    return f"mailferry.webhooks.wait.{seconds}s"


def declare_watchdog(channel, settings: Settings, seconds: int) -> str:
    queue, key = watchdog_queue(seconds)
    channel.queue_declare(queue, durable=True, arguments=_queue_args(
        settings, **{"x-message-ttl": seconds * 1000, "x-dead-letter-exchange": EXCHANGE,
                     "x-dead-letter-routing-key": ROUTING_KEYS[TASK_TIMEOUTS]}))
    channel.queue_bind(queue, EXCHANGE, routing_key=key)
    return key


def setup_topology(settings: Settings) -> None:
    """Connect once, declare everything, close: what each process does at start."""
    connection = connect(settings.amqp_url)
    try:
        declare_topology(connection.channel(), settings)
    except px.ChannelClosedByBroker as exc:
        raise PermanentError(
            f"RabbitMQ refused the topology ({exc.reply_text}); a queue exists with other "
            "arguments (queue type or TTL changed? quorum queues declared before 2026-12-07 lack "
            "x-dead-letter-strategy=at-least-once and x-overflow=reject-publish) — drain and delete it "
            "to have it declared again, or restore the setting") from exc
    finally:
        _close_quietly(connection)


class Publisher:
    """Publishes persistent, mandatory messages and returns only after the broker confirmed.

    One Publisher belongs to one thread. It connects lazily and again after a failure.
    """

    def __init__(self, settings: Settings, *, declare: bool = False, transactional: bool = False):
        self.settings = settings
        self.declare = declare
        # A transactional channel takes ``publish_many``: one commit, one write to the
        # broker's disk, for a batch; a confirm per message costs the broker one each.
        self.transactional = transactional
        self._connection = None
        self._channel = None

    def _ensure(self):
        if self._channel is None or not self._channel.is_open:
            self.close()
            self._connection = connect(self.settings.amqp_url)
            channel = self._connection.channel()
            if self.declare:
                declare_topology(channel, self.settings)
            if self.transactional:
                channel.tx_select()
            else:
                channel.confirm_delivery()
            self._channel = channel
        return self._channel

    def publish(self, routing_key: str, body: bytes, *, headers: dict | None = None,
                message_id: str | None = None, expiration: str | None = None,
                exchange: str = EXCHANGE, attempts: int = 3) -> None:
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json",
            headers=headers, message_id=message_id, expiration=expiration,
            timestamp=int(time.time()))
        for attempt in range(1, attempts + 1):
            try:
                self._ensure().basic_publish(exchange, routing_key, body, properties,
                                             mandatory=True)
                return
            except px.UnroutableError as exc:
                raise TransientError(f"no queue bound for routing key {routing_key!r}") from exc
            except px.NackError as exc:
                # A channel that nacked is not used again: on RabbitMQ 3.10, a channel opened
                # while a quorum queue elected its leader nacked every publish for minutes,
                # until it was reopened. The next attempt gets a fresh one.
                self.close()
                if attempt == attempts:
                    raise TransientError(f"RabbitMQ refused the message for {routing_key!r}") from exc
            except CONNECTION_ERRORS as exc:
                self.close()
                if attempt == attempts:
                    raise TransientError(f"publish to {routing_key!r} failed: {exc!r}") from exc
                time.sleep(min(0.2 * 2 ** attempt, 2))

    def publish_many(self, messages: list[tuple[str, bytes, str]], *, exchange: str) -> None:
        """Publish (routing key, body, message id) each, persistent, in one transaction:
        when this returns the broker has them all, safely; when it raises, none of them
        counts as published (some may be there: their ids say they are the same)."""
        if not self.transactional:
            raise RuntimeError("publish_many needs a transactional Publisher")
        now = int(time.time())
        try:
            channel = self._ensure()
            for routing_key, body, message_id in messages:
                channel.basic_publish(exchange, routing_key, body, pika.BasicProperties(
                    delivery_mode=pika.DeliveryMode.Persistent, content_type="application/json",
                    message_id=message_id, timestamp=now))
            channel.tx_commit()
        except CONNECTION_ERRORS as exc:
            self.close()
            raise TransientError(f"publish of {len(messages)} to {exchange!r} failed: {exc!r}") from exc

    def queue_depth(self, queue: str) -> int:
        """Messages ready in ``queue`` (not counting those a consumer holds unacked)."""
        try:
            return self._ensure().queue_declare(queue, passive=True).method.message_count
        except CONNECTION_ERRORS as exc:
            self.close()
            raise TransientError(f"cannot read the depth of {queue}: {exc!r}") from exc

    def declare_watchdog(self, seconds: int) -> str:
        try:
            return declare_watchdog(self._ensure(), self.settings, seconds)
        except CONNECTION_ERRORS as exc:
            self.close()
            raise TransientError(f"cannot declare watchdog queue: {exc!r}") from exc

    def close(self) -> None:
        if self._connection is not None:
            _close_quietly(self._connection)
        self._connection = None
        self._channel = None


def _close_quietly(connection) -> None:
    try:
        if connection.is_open:
            connection.close()
    except CONNECTION_ERRORS:
        pass
