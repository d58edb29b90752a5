"""consumer.runner against a real RabbitMQ: acks, poison, transient failures, heartbeats."""

from __future__ import annotations

import threading
import time

import pika
import pytest

from mailferry import broker
from mailferry.errors import TransientError
from consumer.handler import Handler, Outcome
from tests.pipeline import consumer_thread, dead_letters, queue_depth, wait_for


class Recorder(Handler):
    """A handler for mailferry.inbound whose behaviour per body the test decides."""

    queue = broker.INBOUND

    def __init__(self, prefetch: int = 8, behaviour=None):
        self.prefetch = prefetch
        self.behaviour = behaviour or (lambda body: None)
        self.seen: list[bytes] = []
        self.lock = threading.Lock()

    def handle(self, deliveries):
        outcomes = []
        for delivery in deliveries:
            with self.lock:
                self.seen.append(delivery.body)
            self.behaviour(delivery.body)
            outcomes.append(Outcome.ack())
        return outcomes


def publish(settings, bodies):
    publisher = broker.Publisher(settings, declare=True)
    for body in bodies:
        publisher.publish("inbound", body)
    publisher.close()


def test_a_poison_message_is_dead_lettered_and_its_batch_mates_are_acked(sqlite_broker_settings):
    def behaviour(body):
        if body == b"poison":
            raise ValueError("cannot digest this")

    handler = Recorder(behaviour=behaviour)
    publish(sqlite_broker_settings, [b"a", b"poison", b"b", b"c"])
    with consumer_thread(sqlite_broker_settings, [handler]):
        letters = wait_for(lambda: dead_letters(sqlite_broker_settings.amqp_url), timeout=30)
        wait_for(lambda: queue_depth(sqlite_broker_settings.amqp_url, broker.INBOUND) == 0)
    assert [body for _, body in letters] == [b"poison"]
    reason = letters[0][0][broker.H_REASON]
    assert "failed 2 times" in reason and "cannot digest this" in reason
    # The batch that held the poison was retried message by message (handlers are idempotent),
    # so its mates were handled, acked and are gone from the queue.
    assert {b"a", b"b", b"c"} <= set(handler.seen)


def test_transient_failures_are_retried_then_dead_lettered(sqlite_broker_settings):
    attempts = {"flaky": 0, "down": 0}

    def behaviour(body):
        if body in (b"flaky", b"down"):
            attempts[body.decode()] += 1
            if body == b"down" or attempts["flaky"] < 3:
                raise TransientError("database is locked")

    handler = Recorder(prefetch=1, behaviour=behaviour)
    publish(sqlite_broker_settings, [b"flaky", b"down"])
    with consumer_thread(sqlite_broker_settings, [handler]):
        letters = wait_for(lambda: dead_letters(sqlite_broker_settings.amqp_url), timeout=60)
    assert attempts["flaky"] == 3  # failed twice, then stored
    assert attempts["down"] == 5
    assert [body for _, body in letters] == [b"down"]
    assert "failed 5 times, last: database is locked" in letters[0][0][broker.H_REASON]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_the_count_of_failed_attempts_survives_a_restart(sqlite_broker_settings, queue_type):
    """The broker carries the count (a header on a classic queue, x-delivery-count on a
    quorum queue): a consumer restarted after two failed attempts dead-letters the message
    after three more, not five."""
    settings = sqlite_broker_settings.replace(queue_type=queue_type)
    attempts = []

    def behaviour(body):
        attempts.append(body)
        raise TransientError("database is locked")

    publish(settings, [b"down"])
    with consumer_thread(settings, [Recorder(prefetch=1, behaviour=behaviour)]):
        wait_for(lambda: len(attempts) >= 2, timeout=30, message="two attempts")
    first_run = len(attempts)
    assert first_run < 5
    with consumer_thread(settings, [Recorder(prefetch=1, behaviour=behaviour)]):
        letters = wait_for(lambda: dead_letters(settings.amqp_url), timeout=60)
    assert len(attempts) == 5, f"{first_run} attempts before the restart, {len(attempts)} in all"
    assert [body for _, body in letters] == [b"down"]
    headers = letters[0][0]
    assert "failed 5 times, last: database is locked" in headers[broker.H_REASON]
    assert queue_depth(settings.amqp_url, broker.INBOUND) == 0


def test_a_message_its_consumers_keep_dying_on_is_dead_lettered_unread(sqlite_broker_settings):
    """On a quorum queue a delivery returned without an outcome (its consumer died) is
    counted by the broker too; past the limit the message is dead-lettered, never handled."""
    settings = sqlite_broker_settings.replace(queue_type="quorum")
    publish(settings, [b"deadly"])
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    for _ in range(5):  # five consumers that died holding it
        method = wait_for(lambda: channel.basic_get(broker.INBOUND)[0], timeout=10)
        channel.basic_nack(method.delivery_tag, requeue=True)
    connection.close()
    handler = Recorder(prefetch=1)
    with consumer_thread(settings, [handler]):
        letters = wait_for(lambda: dead_letters(settings.amqp_url), timeout=30)
    assert handler.seen == []
    assert [body for _, body in letters] == [b"deadly"]
    assert "delivered 5 times without an outcome" in letters[0][0][broker.H_REASON]


def test_a_message_slower_than_the_heartbeat_keeps_its_connection(sqlite_broker_settings):
    def short_heartbeat(url):
        params = broker.connection_parameters(url)
        params.heartbeat = 1
        return pika.BlockingConnection(params)

    handler = Recorder(prefetch=1, behaviour=lambda body: time.sleep(4))
    publish(sqlite_broker_settings, [b"slow"])
    from consumer.runner import Runner
    runner = Runner(sqlite_broker_settings, [handler], connect=short_heartbeat)
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        assert runner.ready.wait(30)
        wait_for(lambda: handler.seen, timeout=30)
        wait_for(lambda: queue_depth(sqlite_broker_settings.amqp_url, broker.INBOUND) == 0
                 and _unacked(sqlite_broker_settings) == 0, timeout=30)
        generation = runner._generation
    finally:
        runner.stop()
        thread.join(30)
    assert handler.seen == [b"slow"]  # acked once; never redelivered
    assert generation == 1  # never reconnected


def _unacked(settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        ok = connection.channel().queue_declare(broker.INBOUND, passive=True)
        return ok.method.message_count
    finally:
        connection.close()


class Pipelined(Handler):
    """A prepare/commit handler that logs the order of its calls."""

    queue = broker.INBOUND
    pipelined = True

    def __init__(self, prefetch: int):
        self.prefetch = prefetch
        self.calls: list[tuple[str, list[bytes]]] = []

    def prepare(self, deliveries):
        self.calls.append(("prepare", [d.body for d in deliveries]))
        return deliveries

    def commit(self, deliveries):
        self.calls.append(("commit", [d.body for d in deliveries]))
        return [Outcome.ack() for _ in deliveries]


def test_a_pipelined_worker_prepares_two_batches_ahead_and_commits_in_order(tmp_path):
    from mailferry.config import Settings
    from consumer.handler import Delivery
    from consumer.runner import Runner

    handler = Pipelined(prefetch=8)  # batches of 2
    runner = Runner(Settings(var_dir=tmp_path), [handler])
    lane = runner.lanes[0]
    bodies = [f"m{n}".encode() for n in range(10)]
    for n, body in enumerate(bodies):
        lane.inbox.put(Delivery(n + 1, body, pika.BasicProperties(), False, "inbound", 0))
    lane.inbox.put(None)  # shutdown: what is prepared is still committed
    worker = threading.Thread(target=runner._work, args=(lane,), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    batches = [bodies[i:i + 2] for i in range(0, 10, 2)]
    assert handler.calls == [
        ("prepare", batches[0]), ("prepare", batches[1]), ("prepare", batches[2]),
        ("commit", batches[0]), ("prepare", batches[3]),
        ("commit", batches[1]), ("prepare", batches[4]),
        ("commit", batches[2]), ("commit", batches[3]), ("commit", batches[4]),
    ]
    assert lane.in_flight == 0  # every batch taken was settled (here: no connection to ack on)


def _stage_loop(batches, *, fail_take_at=None, fail_commit_at=None, depth=2):
    """Run consumer.pipeline.run_ahead over ``batches``; (calls, the error it raised)."""
    from consumer.pipeline import STOP, run_ahead

    calls, source = [], iter(batches)

    def take(_wait):
        batch = next(source, STOP)
        if batch == fail_take_at:
            raise TransientError(f"cannot take {batch}")
        return batch

    def prepare(batch):
        calls.append(("prepare", batch))
        return batch

    def commit(batch):
        if batch == fail_commit_at:
            raise TransientError(f"cannot commit {batch}")
        calls.append(("commit", batch))

    try:
        run_ahead(take, prepare, commit, depth=depth)
    except TransientError as exc:
        return calls, str(exc)
    return calls, None


def test_the_stage_loop_commits_in_order_what_it_prepared_before_a_failure_to_take():
    calls, error = _stage_loop([1, 2, 3, 4], fail_take_at=4)
    assert error == "cannot take 4"
    assert calls == [("prepare", 1), ("prepare", 2), ("prepare", 3),
                     ("commit", 1), ("commit", 2), ("commit", 3)]


def test_the_stage_loop_commits_nothing_after_a_batch_that_failed_to_commit():
    # An IMAP checkpoint moved past batch 2 by committing batch 3 would skip batch 2's mail.
    calls, error = _stage_loop([1, 2, 3, 4, 5], fail_commit_at=2)
    assert error == "cannot commit 2"
    assert ("commit", 3) not in calls and ("commit", 1) in calls


def test_the_stage_loop_without_depth_commits_each_batch_before_taking_the_next():
    calls, error = _stage_loop([1, 2], depth=0)
    assert (calls, error) == ([("prepare", 1), ("commit", 1), ("prepare", 2), ("commit", 2)], None)


class Weighing(Pipelined):
    """A pipelined handler whose deliveries weigh what their body says (b"12" weighs 12)."""

    batch_bytes = 10

    def weigh(self, delivery):
        return int(delivery.body)


def test_a_batch_closes_once_the_mail_it_stands_for_reaches_the_handlers_byte_budget(tmp_path):
    from mailferry.config import Settings
    from consumer.handler import Delivery
    from consumer.runner import Runner

    handler = Weighing(prefetch=40)  # batches of up to 10 by count
    runner = Runner(Settings(var_dir=tmp_path), [handler])
    lane = runner.lanes[0]
    weights = [3, 3, 3, 3, 12, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    for n, weight in enumerate(weights):
        lane.inbox.put(Delivery(n + 1, str(weight).encode(), pika.BasicProperties(), False,
                                "inbound", 0))
    lane.inbox.put(None)
    worker = threading.Thread(target=runner._work, args=(lane,), daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    committed = [[int(b) for b in bodies] for call, bodies in handler.calls if call == "commit"]
    # 3+3+3 is under the budget of 10, the fourth 3 reaches it; a message over the budget is
    # a batch of its own; light messages still stop at the count (a quarter of the prefetch).
    assert committed == [[3, 3, 3, 3], [12], [1] * 10, [1] * 2]
