"""Events are never lost and never invented: the consumer and the relay killed mid-stream,
RabbitMQ restarted mid-stream; the receiver on loopback counts what it got."""

from __future__ import annotations

import signal
from collections import defaultdict

from devstack import mailgen
from mailferry import webhooks
from mailferry.inject import Injector
from mailferry.models import EmailMessage
from mailferry.users import add_user
from tests.pipeline import consumer_process, wait_for

WEBHOOKS = "consumer.webhook_worker"  # the webhook worker's module
from devstack.webhook_receiver import Receiver


def _inject(settings, count: int) -> None:
    injector = Injector(settings)
    try:
        for n in range(count):
            injector.inject(mailgen.plain(n))
    finally:
        injector.close()


def _ids_by_message(receiver: Receiver) -> dict[int, set[str]]:
    """webhook-ids the receiver got, by the stored message each event tells of."""
    ids = defaultdict(set)
    for got in receiver.got():
        event = got.event
        assert event["type"] == "message.stored"
        ids[event["data"]["id"]].add(got.headers["webhook-id"])
    return ids


def _stop(process, log) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(40) == 0, log.read_text()[-2000:]


def test_consumer_and_relay_killed_mid_stream_give_each_message_one_event(broker_settings, tmp_path):
    count = 300
    add_user("bob@example.org")
    with Receiver([200]) as receiver:
        webhooks.add_endpoint(broker_settings, receiver.url)
        _inject(broker_settings, count)
        consumer = consumer_process(broker_settings, tmp_path / "consumer1.log")
        relay = consumer_process(broker_settings, tmp_path / "relay1.log", module="relay")
        hooks = consumer_process(broker_settings, tmp_path / "hooks.log", module=WEBHOOKS)
        try:
            wait_for(lambda: len(receiver.got()) >= 30, timeout=90, message="first webhooks")
            for process in (consumer, relay):  # between commits and publishes, somewhere
                process.send_signal(signal.SIGKILL)
                process.wait(10)
            assert EmailMessage.select().count() < count or len(receiver.got()) < count, \
                "the kill should land mid-stream"
        finally:
            consumer.kill()
            relay.kill()
        consumer = consumer_process(broker_settings, tmp_path / "consumer2.log")
        relay = consumer_process(broker_settings, tmp_path / "relay2.log", module="relay")
        try:
            wait_for(lambda: len(_ids_by_message(receiver)) >= count, timeout=180,
                     message="an event for every message")
        finally:
            _stop(consumer, tmp_path / "consumer2.log")
            _stop(relay, tmp_path / "relay2.log")
            _stop(hooks, tmp_path / "hooks.log")
        ids = _ids_by_message(receiver)
    assert EmailMessage.select().count() == count
    assert set(ids) == {m.id for m in EmailMessage.select(EmailMessage.id)}
    assert all(len(one) == 1 for one in ids.values()), "one message's event under two ids"


def test_rabbitmq_restarted_mid_stream_gives_500_distinct_events(settings, restartable_rabbitmq, tmp_path):
    count = 500
    broker_settings = settings.replace(amqp_url=restartable_rabbitmq.amqp_url)
    add_user("bob@example.org")
    with Receiver([200]) as receiver:
        webhooks.add_endpoint(broker_settings, receiver.url)
        _inject(broker_settings, count)
        consumer = consumer_process(broker_settings, tmp_path / "consumer.log")
        relay = consumer_process(broker_settings, tmp_path / "relay.log", module="relay")
        hooks = consumer_process(broker_settings, tmp_path / "hooks.log", module=WEBHOOKS)
        try:
            wait_for(lambda: len(receiver.got()) >= 20, timeout=90, message="first webhooks")
            restartable_rabbitmq.restart()
            assert len(receiver.got()) < count, "the restart should land mid-stream"
            wait_for(lambda: len(_ids_by_message(receiver)) >= count, timeout=240,
                     message="an event for every message")
            assert [p.poll() for p in (consumer, relay, hooks)] == [None] * 3, "all survive it"
        finally:
            _stop(consumer, tmp_path / "consumer.log")
            _stop(relay, tmp_path / "relay.log")
            _stop(hooks, tmp_path / "hooks.log")
        ids = _ids_by_message(receiver)
    distinct = set().union(*ids.values())
    assert len(distinct) == count
    assert all(len(one) == 1 for one in ids.values())
