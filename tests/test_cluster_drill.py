"""The fault drill of issue 26 (devstack/cluster_drill.py), whole: 5,000 messages over SMTP to
two MX hosts on a three-node RabbitMQ cluster, PostgreSQL and SeaweedFS, while a consumer is
SIGKILLed, a RabbitMQ node is stopped and started, and a whole host (Haraka, consumer,
relay, webhook worker, scheduler, API) is killed and brought back. Every message that got a
250 is stored once, its raw source and body objects hash to their names, it is posted as
``message.stored`` under one event id, both hosts' APIs serve its raw source as stored (a
sample); nothing is dead-lettered."""

from __future__ import annotations

from devstack import cluster_drill
from devstack.haraka import haraka_available
from devstack.postgres import postgres_available
from devstack.rabbitmq import rabbitmq_available
from devstack.seaweedfs import seaweedfs_available
from tests.harness.fixtures import require_service

COUNT = 5000
RATE = 100.0  # msg/s: the faults are placed by share of the mail, their pauses by the clock


def test_nothing_is_lost_or_doubled_while_a_consumer_a_broker_node_and_a_host_die(tmp_path):
    for name, available in (("RabbitMQ", rabbitmq_available), ("PostgreSQL", postgres_available),
                            ("SeaweedFS", seaweedfs_available), ("Haraka", haraka_available)):
        if not available():
            require_service(name, "not installed (make install)")
    drill = cluster_drill.run(tmp_path, COUNT, RATE)
    assert len(drill.events) == 6, drill.events  # each fault happened, and each was undone
    assert drill.retries > 0  # the host's death was seen by the senders: the faults did bite
    assert drill.problems() == []
    assert drill.stored == COUNT and drill.posts >= COUNT
