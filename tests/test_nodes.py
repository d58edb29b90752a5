"""Several MX hosts, each with its own spool (issue 26, the per-node spool): two Harakas with
the plugin, two spools, two consumers, one database and one broker. A host's jobs wait in its
own queue for its own consumers, which alone can read its spool: while host b's consumer is
down its mail waits, and host a's consumer never takes it."""

from __future__ import annotations

import threading

import pytest

from devstack import mailgen
from mailferry import broker
from mailferry.broker import Publisher
from mailferry.errors import ConfigError
from mailferry.config import load_settings
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.spool import Spool
from mailferry.users import add_user
from scheduler.main import Scheduler
from tests.pipeline import consumer_thread, wait_for, waiting_in_spool
from tests.test_scheduler_sweep import spool_file
from tests.test_smtp_pipeline import Smtp, haraka_installed, queue_id  # noqa: F401
from devstack.haraka import HarakaServer


def _node(settings, tmp_path, name: str):
    return settings.replace(node=name, spool_dir=tmp_path / name / "spool")


def _haraka(settings, tmp_path, name: str) -> HarakaServer:
    return HarakaServer(tmp_path / name / "haraka", settings.amqp_url, settings.resolved_spool_dir,
                        mailferry_ini={"amqp": {"routing_key": broker.inbound_key(settings)}})


def _send(haraka: HarakaServer, first: int, count: int) -> list[str]:
    sent = []
    with Smtp(haraka) as smtp:
        for n in range(first, first + count):
            code, reply = smtp.send(mailgen.plain(n, to="bob@example.org"), ["bob@example.org"])
            assert code == 250, reply
            sent.append(queue_id(reply))
    return sent


def _stored(queue_ids: list[str]) -> int:
    return InboundReceipt.select().where(InboundReceipt.queue_id.in_(queue_ids)).count()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_each_host_stores_its_own_mail_and_a_dead_hosts_mail_waits_for_it(
        broker_settings, haraka_installed, tmp_path):
    add_user("bob@example.org")
    a, b = _node(broker_settings, tmp_path, "a"), _node(broker_settings, tmp_path, "b")
    broker.setup_topology(a)
    broker.setup_topology(b)
    with _haraka(a, tmp_path, "a") as mx_a, _haraka(b, tmp_path, "b") as mx_b:
        mx_a.wait_connected()
        mx_b.wait_connected()
        with consumer_thread(a):  # host b's consumer is down
            for_a, for_b = _send(mx_a, 0, 15), _send(mx_b, 100, 15)
            wait_for(lambda: _stored(for_a) == 15, timeout=60, message="host a's mail stored")
            publisher = Publisher(b)
            try:
                wait_for(lambda: publisher.queue_depth(broker.inbound_queue(b)) == 15, timeout=10,
                         message="host b's jobs waiting in its own queue")
            finally:
                publisher.close()
            assert _stored(for_b) == 0  # never taken by host a, which cannot read b's spool
        with consumer_thread(b):
            wait_for(lambda: _stored(for_b) == 15, timeout=60, message="host b's mail, once it is back")
    ids = [m.message_id for m in EmailMessage.select()]
    assert len(ids) == len(set(ids)) == 30  # each stored once
    assert waiting_in_spool(a) == [] and waiting_in_spool(b) == []


def test_a_standby_scheduler_sweeps_its_own_hosts_spool(sqlite_broker_settings, tmp_path):
    settings = _node(sqlite_broker_settings, tmp_path, "b").replace(spool_sweep_age=60)
    broker.setup_topology(settings)
    spool = Spool(settings.resolved_spool_dir).ensure()
    spool_file(spool, mailgen.plain(1, to="bob@example.org"), "ORPHAN1", age=300)

    class Elsewhere:  # another host's scheduler holds the lease
        def acquire(self):
            return False

        def held(self):
            return False

        def release(self):
            pass

    scheduler = Scheduler(settings, lease=Elsewhere())
    runner = threading.Thread(target=scheduler.run)
    runner.start()
    publisher = Publisher(settings)
    try:
        wait_for(lambda: publisher.queue_depth(broker.inbound_queue(settings)) == 1, timeout=20,
                 message="the orphan republished to this host's queue")
    finally:
        scheduler.stop()
        runner.join(20)
        publisher.close()
    assert scheduler.ticks == 0  # no full tick without the lease: only the sweep ran


def test_a_node_name_must_be_fit_for_a_queue_name():
    assert load_settings({"MAILFERRY_NODE": "mx-2", "MAILFERRY_DATABASE_URL": "postgresql://u@db/m"}).node == "mx-2"
    with pytest.raises(ConfigError, match="MAILFERRY_NODE"):
        load_settings({"MAILFERRY_NODE": "MX 2/../x", "MAILFERRY_DATABASE_URL": "postgresql://u@db/m"})
