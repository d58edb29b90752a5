"""The broker loop: one connection, one channel and one worker thread per queue (the
worker's stages are ``consumer.pipeline``).

pika's BlockingConnection services heartbeats only while its own thread is inside pika, so
that thread does nothing but I/O: it hands deliveries to worker threads and carries out the
acks they ask for (``add_callback_threadsafe``). A slow message therefore never costs the
connection. Rules kept here for every queue:

- ack only after the handler returned, i.e. after its database commit;
- a message that can never succeed is published to ``mailferry.dead`` with the reason in a
  header (confirmed) and only then acked; nothing is requeued forever;
- a lost connection is re-established with capped backoff; deliveries of the old channel are
  forgotten (the broker redelivers them, and saves are idempotent);
- SIGTERM/SIGINT set a flag; the loop stops consuming, lets workers finish their batch,
  settles it, and closes.
"""

from __future__ import annotations

import functools
import logging
import queue as queue_mod
import threading
import time
from typing import Callable

import pika

from consumer.handler import Delivery, Handler, Outcome
from consumer.pipeline import Lane, attempts_before
from mailferry import broker, metrics, starting
from mailferry.config import Settings
from mailferry.contracts import now_iso
from mailferry.errors import TransientError

log = logging.getLogger(__name__)

RECONNECT_BACKOFF_MAX = 30.0  # seconds
DRAIN_TIMEOUT = 30.0  # seconds a worker may take to finish its batch at shutdown


class Runner:
    def __init__(self, settings: Settings, handlers: list[Handler],
                 connect: Callable[[str], pika.BlockingConnection] = broker.connect):
        self.settings = settings
        self.lanes = [Lane(h) for h in handlers]
        for lane in self.lanes:
            lane.settle = functools.partial(self._settle_threadsafe, lane)
        self._connect = connect
        self._connection: pika.BlockingConnection | None = None
        self._publish_channel = None
        self._generation = 0
        self._stop = threading.Event()
        self._quorum = settings.queue_type == "quorum"
        self.ready = threading.Event()  # set while consuming: for tests and /readyz
        # Set when a worker thread died of something no handler caught: the process stops
        # and exits non-zero so its supervisor restarts it, and /readyz says why meanwhile.
        self.crashed: str | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def stop(self, *_args) -> None:
        """Signal-safe: only sets a flag; the loop drains and closes."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        starting.hand_over(self.stop)

    def run(self) -> None:
        for lane in self.lanes:
            lane.thread = threading.Thread(target=self._work, args=(lane,), daemon=True,
                                           name=f"worker-{lane.handler.queue}")
            lane.thread.start()
        backoff = 1.0
        while not self._stop.is_set():
            try:
                self._open()
                backoff = 1.0
                self._pump()
            except broker.CONNECTION_ERRORS + (TransientError,) as exc:
                self.ready.clear()
                self._forget_connection()
                if self._stop.is_set():
                    break
                log.warning("broker connection lost (%r); reconnecting in %.0f s", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)
        self._shutdown()

    def _open(self) -> None:
        self._connection = self._connect(self.settings.amqp_url)
        self._generation += 1
        setup = self._connection.channel()
        broker.declare_topology(setup, self.settings)
        self._publish_channel = setup
        self._publish_channel.confirm_delivery()
        for lane in self.lanes:
            # Queues declared first (publishers can route), then whatever a handler needs to
            # be ready for its first batch (the inbound parser process), then consume.
            lane.handler.warm_up()
        for lane in self.lanes:
            channel = self._connection.channel()
            channel.basic_qos(prefetch_count=lane.handler.prefetch)
            lane.channel = channel
            lane.consumer_tag = channel.basic_consume(
                lane.handler.queue, self._on_message(lane, self._generation))
        self.ready.set()
        log.info("consuming %s", ", ".join(lane.handler.queue for lane in self.lanes))

    def _pump(self) -> None:
        while not self._stop.is_set():
            self._connection.process_data_events(time_limit=0.2)

    def _on_message(self, lane: Lane, generation: int):
        def deliver(channel, method, properties, body):
            lane.inbox.put(Delivery(method.delivery_tag, body, properties, method.redelivered,
                                    method.routing_key, generation))
        return deliver

    def _shutdown(self) -> None:
        log.info("stopping: finishing in-flight work")
        self.ready.clear()
        connection = self._connection
        if connection is not None and connection.is_open:
            try:
                for lane in self.lanes:
                    if lane.consumer_tag:
                        lane.channel.basic_cancel(lane.consumer_tag)
                deadline = time.monotonic() + DRAIN_TIMEOUT
                while time.monotonic() < deadline and any(l.in_flight for l in self.lanes):
                    connection.process_data_events(time_limit=0.1)
                connection.process_data_events(time_limit=0)  # settle the last acks
                connection.close()  # unacked deliveries go back to their queues
            except broker.CONNECTION_ERRORS:
                pass
        for lane in self.lanes:
            lane.inbox.put(None)  # type: ignore[arg-type]
        for lane in self.lanes:
            if lane.thread:
                lane.thread.join(timeout=5)
            lane.handler.close()
        log.info("stopped")

    def _forget_connection(self) -> None:
        self._generation += 1  # workers' results for the old channel are dropped
        for lane in self.lanes:
            _drain(lane.inbox)
            lane.channel = None
            lane.consumer_tag = None
        if self._connection is not None:
            try:
                self._connection.close()
            except Exception:  # already broken; nothing to save
                pass
        self._connection = None

    # -- worker side -----------------------------------------------------------------------

    def _work(self, lane: Lane) -> None:
        """A lane's one worker thread; if it dies, the whole process stops (see ``crashed``)."""
        try:
            lane.run()
        except BaseException as exc:  # noqa: BLE001 - a silent dead thread consumes nothing
            self.crashed = f"worker for {lane.handler.queue} died: {exc!r}"
            log.critical("%s; stopping the process so that it is restarted", self.crashed,
                         exc_info=True)
            self.ready.clear()
            self._stop.set()

    def _settle_threadsafe(self, lane: Lane, batch: list[Delivery], outcomes: list[Outcome]) -> None:
        connection = self._connection
        if connection is None:
            lane.track(-1)
            return
        try:
            connection.add_callback_threadsafe(lambda: self._settle(lane, batch, outcomes))
        except Exception:  # the connection died meanwhile: the broker will redeliver
            lane.track(-1)

    def _settle(self, lane: Lane, batch: list[Delivery], outcomes: list[Outcome]) -> None:
        """Runs on the I/O thread: dead-letter, requeue, then ack — in that order."""
        try:
            channel = lane.channel
            fresh = [(d, o) for d, o in zip(batch, outcomes) if d.generation == self._generation]
            if channel is None or not channel.is_open or not fresh:
                return
            for delivery, outcome in fresh:
                if outcome.action == "dead":
                    self._dead_letter(lane, delivery, outcome.reason)
                elif outcome.action == "requeue":
                    self._requeue(lane, channel, delivery)
                    metrics.requeued.labels(queue=lane.handler.queue).inc()
            acks = [d.tag for d, o in fresh if o.action in ("ack", "dead")
                    or (o.action == "requeue" and not self._quorum)]
            if acks and len(acks) == len(fresh) and acks == sorted(acks):
                channel.basic_ack(acks[-1], multiple=True)  # one frame for the whole batch
            else:
                for tag in acks:
                    channel.basic_ack(tag)
        finally:
            lane.track(-1)

    def _requeue(self, lane: Lane, channel, delivery: Delivery) -> None:
        """Back to its queue for another attempt, counted where every consumer sees it. A
        quorum queue counts a returned delivery itself (``x-delivery-count``); on a classic
        queue the message is published again with its attempts in a header, and the original
        acked by the caller."""
        if self._quorum:
            channel.basic_nack(delivery.tag, requeue=True)
            return
        self._publish_again(delivery, delivery.routing_key,
                            {broker.H_ATTEMPTS: attempts_before(delivery) + 1}, keep_expiration=True)

    def _dead_letter(self, lane: Lane, delivery: Delivery, reason: str) -> None:
        queue = lane.handler.queue
        log.error("%s: dead-lettering message %s: %s", queue,
                  delivery.properties.message_id or "-", reason)
        self._publish_again(delivery, broker.ROUTING_KEYS[broker.DEAD], {
            broker.H_REASON: reason[:1000], broker.H_QUEUE: queue,
            broker.H_ROUTING_KEY: delivery.routing_key, broker.H_FAILED_AT: now_iso()},
            keep_expiration=False)  # a dead letter waits for a person, it does not expire
        metrics.dead_lettered.labels(queue=queue).inc()

    def _publish_again(self, delivery: Delivery, routing_key: str, headers: dict, *,
                       keep_expiration: bool) -> None:
        """``delivery`` published again (persistent, confirmed) with ``headers`` added. The
        caller acks the original only after this returned: a crash in between doubles the
        message, never loses it."""
        properties = pika.BasicProperties(
            delivery_mode=pika.DeliveryMode.Persistent,
            content_type=delivery.properties.content_type, headers={**delivery.headers, **headers},
            message_id=delivery.properties.message_id,
            expiration=delivery.properties.expiration if keep_expiration else None)
        self._publish_channel.basic_publish(broker.EXCHANGE, routing_key, delivery.body,
                                            properties, mandatory=True)


def _drain(inbox: queue_mod.Queue) -> None:
    while True:
        try:
            inbox.get_nowait()
        except queue_mod.Empty:
            return


def serve(settings: Settings, handlers: list, port: int, role: str, companions: tuple = ()) -> int:
    """Run ``handlers`` on one broker loop until SIGTERM, with /metrics and the readiness
    checks on ``port``: the consumer process, and the webhook worker's. ``companions`` run
    beside the loop (``name``, ``start()``, ``stop()``, ``problem()``: the IDLE lane). Returns the exit
    code: 1 when a worker thread died of something no handler caught."""
    from mailferry import health, metrics
    from mailferry.overview import database_problem
    runner = Runner(settings, handlers)
    metrics.register_database_collector(settings.resolved_spool_dir)
    health.add_readiness_check("database", database_problem)
    health.add_readiness_check(
        "broker", lambda: None if runner.ready.is_set() else "not consuming from RabbitMQ")
    health.add_readiness_check("workers", lambda: runner.crashed)
    for companion in companions:
        health.add_readiness_check(companion.name, companion.problem)
    health.serve(settings, port, role=role)
    runner.install_signal_handlers()
    for companion in companions:
        companion.start()
    try:
        runner.run()
    finally:
        for companion in companions:
            companion.stop()
    if runner.crashed:
        log.critical("%s exits: %s", role, runner.crashed)
        return 1
    return 0
