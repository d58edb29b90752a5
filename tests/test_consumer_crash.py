"""Nothing lost, nothing doubled: a consumer killed, RabbitMQ restarted, two consumers."""

from __future__ import annotations

import signal

from mailferry.inject import Injector
from mailferry.users import add_user
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.spool import Spool
from devstack import mailgen
from tests.pipeline import consumer_process, wait_for

COUNT = 500


def inject_many(settings, count: int = COUNT) -> list[str]:
    injector = Injector(settings)
    try:
        return [injector.inject(mailgen.plain(n)) for n in range(count)]
    finally:
        injector.close()


def stored() -> int:
    return EmailMessage.select().count()


def assert_exactly_once(settings, count: int = COUNT) -> None:
    assert stored() == count
    assert EmailMessage.select(EmailMessage.message_id).distinct().count() == count
    assert InboundReceipt.select().count() == count
    assert list(Spool(settings.resolved_spool_dir).incoming.glob("*.eml")) == []


def test_consumer_killed_mid_run_then_restarted_stores_each_message_once(broker_settings, tmp_path):
    add_user("bob@example.org")
    inject_many(broker_settings)
    first = consumer_process(broker_settings, tmp_path / "consumer1.log")
    try:
        wait_for(lambda: stored() >= 100, timeout=60, message="first messages stored")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert stored() < COUNT, "the kill should land mid-run"
    finally:
        first.kill()
    second = consumer_process(broker_settings, tmp_path / "consumer2.log")
    try:
        wait_for(lambda: InboundReceipt.select().count() >= COUNT, timeout=120, message="all handled")
    finally:
        second.send_signal(signal.SIGTERM)
        assert second.wait(40) == 0, (tmp_path / "consumer2.log").read_text()[-2000:]
    assert_exactly_once(broker_settings)


def test_rabbitmq_restarted_mid_run_loses_and_doubles_nothing(settings, restartable_rabbitmq, tmp_path):
    broker_settings = settings.replace(amqp_url=restartable_rabbitmq.amqp_url)
    add_user("bob@example.org")
    count = 2 * COUNT  # the broker takes seconds to stop: keep the consumer busy past that
    inject_many(broker_settings, count)
    consumer = consumer_process(broker_settings, tmp_path / "consumer.log")
    try:
        wait_for(lambda: stored() >= 50, timeout=60, message="first messages stored")
        before = stored()
        restartable_rabbitmq.restart()
        assert before < count, "the restart should land mid-run"
        wait_for(lambda: InboundReceipt.select().count() >= count, timeout=180, message="all handled")
        assert consumer.poll() is None, "the consumer survives the broker restart"
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.wait(40)
    assert_exactly_once(broker_settings, count)
    assert "reconnecting" in (tmp_path / "consumer.log").read_text()


def test_two_consumers_on_one_queue_store_each_message_once(broker_settings, tmp_path):
    add_user("bob@example.org")
    inject_many(broker_settings)
    consumers = [consumer_process(broker_settings.replace(prefetch=16), tmp_path / f"c{i}.log")
                 for i in range(2)]
    try:
        wait_for(lambda: InboundReceipt.select().count() >= COUNT, timeout=120, message="all handled")
    finally:
        for process in consumers:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(40) for process in consumers]
    assert codes == [0, 0]
    assert_exactly_once(broker_settings)
    logs = [(tmp_path / f"c{i}.log").read_text() for i in range(2)]
    assert all("consuming mailferry.inbound" in log for log in logs)
