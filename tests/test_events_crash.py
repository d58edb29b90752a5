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


def _backlog(settings, receiver: Receiver, count: int) -> None:
    """bob, an endpoint at ``receiver``, and ``count`` messages for bob waiting."""
    add_user("bob@example.org")
    webhooks.add_endpoint(settings, receiver.url)
    _inject(settings, count)


def _start(settings, tmp_path, *modules: str, tag: str = "") -> dict:
    """The process of each of ``modules`` (consumer, relay, the webhook worker), by module."""
    return {m: consumer_process(settings, tmp_path / f"{m}{tag}.log", module=m) for m in modules}


def _stop(processes: dict, tmp_path, tag: str = "") -> None:
    """SIGTERM each; each must exit 0 (its log's end says why not)."""
    for module, process in processes.items():
        process.send_signal(signal.SIGTERM)
        assert process.wait(40) == 0, (tmp_path / f"{module}{tag}.log").read_text()[-2000:]


def test_consumer_and_relay_killed_mid_stream_give_each_message_one_event(broker_settings, tmp_path):
    count = 300
    with Receiver([200]) as receiver:
        _backlog(broker_settings, receiver, count)
        hooks = _start(broker_settings, tmp_path, WEBHOOKS)
        first = _start(broker_settings, tmp_path, "consumer", "relay", tag="1")
        try:
            wait_for(lambda: len(receiver.got()) >= 30, timeout=90, message="first webhooks")
            for process in first.values():  # between commits and publishes, somewhere
                process.send_signal(signal.SIGKILL)
                process.wait(10)
            assert EmailMessage.select().count() < count or len(receiver.got()) < count, \
                "the kill should land mid-stream"
        finally:
            for process in first.values():
                process.kill()
        second = _start(broker_settings, tmp_path, "consumer", "relay", tag="2")
        try:
            wait_for(lambda: len(_ids_by_message(receiver)) >= count, timeout=180,
                     message="an event for every message")
        finally:
            _stop(second, tmp_path, tag="2")
            _stop(hooks, tmp_path)
        ids = _ids_by_message(receiver)
    assert EmailMessage.select().count() == count
    assert set(ids) == {m.id for m in EmailMessage.select(EmailMessage.id)}
    assert all(len(one) == 1 for one in ids.values()), "one message's event under two ids"


def test_rabbitmq_restarted_mid_stream_gives_500_distinct_events(settings, restartable_rabbitmq, tmp_path):
    count = 500
    broker_settings = settings.replace(amqp_url=restartable_rabbitmq.amqp_url)
    with Receiver([200]) as receiver:
        _backlog(broker_settings, receiver, count)
        receiver.hold(after=20)  # the stream waits there, however fast this machine is today
        processes = _start(broker_settings, tmp_path, "consumer", "relay", WEBHOOKS)
        try:
            wait_for(lambda: len(receiver.got()) >= 20, timeout=90, message="first webhooks")
            restartable_rabbitmq.restart()
            assert len(receiver.got()) == 20, "the restart lands mid-stream, the rest held"
            receiver.release()  # the held deliveries answer on channels the restart closed
            wait_for(lambda: len(_ids_by_message(receiver)) >= count, timeout=240,
                     message="an event for every message")
            assert [p.poll() for p in processes.values()] == [None] * 3, "all survive it"
        finally:
            _stop(processes, tmp_path)
        ids = _ids_by_message(receiver)
    distinct = set().union(*ids.values())
    assert len(distinct) == count
    assert all(len(one) == 1 for one in ids.values())
