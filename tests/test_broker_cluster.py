"""Several RabbitMQ nodes: a real three-node cluster on loopback (devstack RabbitMQCluster)
with quorum queues. A publisher fails over when its node stops, and every message it was
told is confirmed is in the queue afterwards; the consumer keeps consuming through a node's
stop; dead-lettering out of quorum queues is at-least-once; a channel that nacks is reopened."""

from __future__ import annotations

import json
import threading
import time

import pika
import pytest

from devstack.rabbitmq import RabbitMQCluster, rabbitmq_available
from mailferry import broker
from mailferry.broker import Publisher
from mailferry.config import Settings
from mailferry.errors import TransientError
from mailferry.inject import Injector
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.users import add_user
from devstack import mailgen
from tests.harness.fixtures import require_service
from tests.pipeline import consumer_thread, wait_for
from tests.test_smtp_pipeline import Smtp, haraka_installed, queue_id  # noqa: F401
from devstack.haraka import HarakaServer


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if not rabbitmq_available():
        require_service("RabbitMQ", "rabbitmq-server is not installed (scripts/install-system.sh)")
    with RabbitMQCluster(tmp_path_factory.mktemp("rabbitmq-cluster")) as running:
        yield running


ON_POSTGRESQL = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def cluster_settings(cluster, settings) -> Settings:
    """Every node listed, quorum queues, a vhost of the test's own on the cluster, and
    PostgreSQL: more than one broker node means more than one host, where SQLite is refused."""
    vhost = f"t-{time.monotonic_ns()}"
    first = cluster.nodes[0] if cluster.nodes[0].running else cluster.nodes[1]
    first.rabbitmqctl("add_vhost", vhost)
    first.rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    urls = ",".join(node.amqp_url_for(vhost) for node in cluster.nodes)
    return settings.replace(amqp_url=urls, queue_type="quorum")


def _queued_ids(settings: Settings, queue: str) -> list[str]:
    """Every message id in ``queue``, read through whichever node answers (then requeued)."""
    connection = broker.connect(settings.amqp_url)
    try:
        channel = connection.channel()
        ids, tags = [], []
        while True:
            method, properties, _ = channel.basic_get(queue)
            if method is None:
                break
            ids.append(properties.message_id)
            tags.append(method.delivery_tag)
        for tag in tags:
            channel.basic_nack(tag, requeue=True)
        return ids
    finally:
        connection.close()


def _publish_with_retries(publisher: Publisher, ids: list[str], stop_at: int, stop) -> tuple[set, int]:
    """Publish each id as a sender would: a TransientError is a 4xx, tried again later.
    ``stop`` runs before the ``stop_at``-th publish. (confirmed ids, refusals)."""
    confirmed, refusals = set(), 0
    for n, message_id in enumerate(ids):
        if n == stop_at:
            stop()
        deadline = time.monotonic() + 60
        while True:
            try:
                publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], b"{}", message_id=message_id)
                confirmed.add(message_id)
                break
            except TransientError:
                refusals += 1
                assert time.monotonic() < deadline, f"{message_id} not accepted within a minute"
                time.sleep(0.2)
    return confirmed, refusals


@ON_POSTGRESQL
def test_a_publisher_fails_over_when_its_node_stops_and_every_confirmed_message_is_kept(
        cluster, cluster_settings):
    settings = cluster_settings
    broker.setup_topology(settings)
    publisher = Publisher(settings)
    ids = [f"m-{n}" for n in range(300)]

    def stop_its_node():
        assert publisher._connection._impl.params.port == cluster.nodes[0].amqp_port
        cluster.nodes[0].stop()
        assert len(cluster.running_nodes(cluster.nodes[1])) == 2

    try:
        confirmed, refusals = _publish_with_retries(publisher, ids, 100, stop_its_node)
        assert publisher._connection._impl.params.port != cluster.nodes[0].amqp_port  # failed over
    finally:
        publisher.close()
        cluster.nodes[0].start()  # back, and back in the cluster
    assert confirmed == set(ids)
    queued = _queued_ids(settings, broker.INBOUND)
    assert set(queued) == set(ids)  # nothing confirmed was lost (a retried one may be twice)
    assert len(cluster.running_nodes(cluster.nodes[0])) == 3


@ON_POSTGRESQL
def test_quorum_queues_dead_letter_at_least_once(cluster, cluster_settings):
    broker.setup_topology(cluster_settings)
    vhost = pika.URLParameters(cluster_settings.amqp_urls[0]).virtual_host
    queues = {q["name"]: q for q in cluster.nodes[1].management_api(
        "GET", f"/api/queues/{vhost}?columns=name,type,arguments")}
    for name in (broker.INBOUND, broker.IMAP_FETCH, broker.WEBHOOKS,
                 broker.watchdog_queue(cluster_settings.task_timeout)[0]):
        assert queues[name]["type"] == "quorum"
        assert queues[name]["arguments"]["x-dead-letter-strategy"] == "at-least-once", name
        assert queues[name]["arguments"]["x-overflow"] == "reject-publish", name
    assert "x-dead-letter-strategy" not in queues[broker.DEAD]["arguments"]  # it dead-letters nowhere


@ON_POSTGRESQL
def test_the_consumer_keeps_storing_through_a_node_stop(cluster, cluster_settings):
    settings = cluster_settings
    add_user("bob@example.org")
    injector = Injector(settings)
    first = [injector.inject(mailgen.plain(n), ["bob@example.org"]) for n in range(50)]
    injector.close()
    with consumer_thread(settings):
        wait_for(lambda: InboundReceipt.select().count() == 50, timeout=60, message="the first 50")
        # The consumer's node is the first listed: stop it under the consumer.
        stopper = threading.Thread(target=cluster.nodes[0].stop)
        stopper.start()
        stopper.join(60)
        assert len(cluster.running_nodes(cluster.nodes[1])) == 2
        try:
            injector = Injector(settings)
            later = []
            for n in range(50, 100):
                deadline = time.monotonic() + 60
                while True:
                    try:
                        later.append(injector.inject(mailgen.plain(n), ["bob@example.org"]))
                        break
                    except TransientError:
                        assert time.monotonic() < deadline
                        time.sleep(0.2)
            injector.close()
            wait_for(lambda: InboundReceipt.select().count() == 100, timeout=120,
                     message="the 50 injected after the node stopped")
        finally:
            cluster.nodes[0].start()
    assert {r.queue_id for r in InboundReceipt.select()} == set(first + later)


def test_a_channel_that_nacks_is_not_used_again(rabbitmq_vhost, sqlite_settings):
    settings = sqlite_settings.replace(amqp_url=rabbitmq_vhost)
    broker.setup_topology(settings)
    connection = broker.connect(settings.amqp_url)
    try:  # a queue that refuses everything: RabbitMQ nacks each publish routed to it
        channel = connection.channel()
        channel.queue_declare("refuses", durable=True, arguments={
            "x-max-length": 0, "x-overflow": "reject-publish"})
        channel.queue_bind("refuses", broker.EXCHANGE, routing_key="refuses")
    finally:
        connection.close()
    publisher = Publisher(settings)
    try:
        publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], json.dumps({}).encode())
        channels = []
        real_ensure = publisher._ensure

        def ensure():
            channel = real_ensure()
            channels.append(channel)
            return channel

        publisher._ensure = ensure
        with pytest.raises(TransientError, match="refused"):
            publisher.publish("refuses", b"{}", attempts=2)
        assert len(channels) == 2 and channels[0] is not channels[1]  # a fresh one per attempt
        assert not channels[0].is_open
        publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], b"{}")
        assert channels[-1] is not channels[1] and channels[-1].is_open
    finally:
        publisher.close()


@ON_POSTGRESQL
def test_no_250_while_no_broker_node_can_confirm(cluster, cluster_settings, haraka_installed, tmp_path):
    """Two of the three nodes down: the quorum queues have no majority, so no publish can be
    confirmed, and Haraka must answer 4xx, not 250, though its own node still answers. Once
    the nodes are back, the same messages are accepted and stored once."""
    settings = cluster_settings
    add_user("bob@example.org")
    broker.setup_topology(settings)
    raws = [mailgen.plain(n, to="bob@example.org") for n in range(3)]
    with HarakaServer(tmp_path / "haraka", settings.amqp_url, settings.resolved_spool_dir) as mx:
        mx.wait_connected()
        for node in cluster.nodes[1:]:
            node.stop()
        try:
            assert len(cluster.running_nodes(cluster.nodes[0])) == 1
            refused = _send_all(mx, raws)
        finally:
            for node in cluster.nodes[1:]:
                node.start()
        assert all(400 <= code < 500 for code, _ in refused), refused
        wait_for(lambda: len(cluster.running_nodes(cluster.nodes[0])) == 3, timeout=60)
        accepted = []
        deadline = time.monotonic() + 90
        while len(accepted) < len(raws):  # quorum back: the leaders are elected again
            answers = _send_all(mx, raws[len(accepted):])
            accepted += [queue_id(reply) for code, reply in answers if code == 250]
            assert time.monotonic() < deadline, answers
    with consumer_thread(settings):
        wait_for(lambda: InboundReceipt.select().count() >= 3, timeout=60)
    stored = {m.message_id for m in EmailMessage.select()}
    assert stored == {f"<test-{n}@example.net>" for n in range(3)} and EmailMessage.select().count() == 3


def _send_all(mx: HarakaServer, raws: list[bytes]) -> list[tuple[int, bytes]]:
    """Each message in its own session, side by side (a refusal takes the publish timeout)."""
    answers: list = [None] * len(raws)

    def send(index: int) -> None:
        with Smtp(mx) as smtp:
            answers[index] = smtp.send(raws[index], ["bob@example.org"])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(raws))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return answers
