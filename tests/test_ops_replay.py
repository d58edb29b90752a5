"""`mailferry replay` against a real RabbitMQ: dead letters go back to the queue they came from,
quarantined inbound files go back to spool/incoming, and nothing is stored twice."""

from __future__ import annotations

import json

import pika

from mailferry import broker
from mailferry.inject import Injector
from mailferry.users import add_user
from mailferry.contracts import TaskRef
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.replay import H_REPLAYS, Replayer
from mailferry.spool import Spool
from devstack import mailgen
from tests.ops_helpers import run_cli
from tests.pipeline import consumer_thread, dead_letters, queue_depth, wait_for

LIMIT = 4096  # bytes: the message below is over it until the limit is raised


def _channel(settings):
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    return connection, channel


def _duplicate_dead_letter(settings) -> None:
    """The runner's documented crash window (dead letter confirmed, ack lost): two copies."""
    connection, channel = _channel(settings)
    try:
        method, properties, body = channel.basic_get(broker.DEAD, auto_ack=False)
        assert method is not None
        for _ in range(2):
            channel.basic_publish("", broker.DEAD, body, properties, mandatory=True)
        channel.basic_ack(method.delivery_tag)
    finally:
        connection.close()


def test_a_quarantined_message_replayed_after_the_limit_is_raised_is_stored_once(broker_settings):
    settings = broker_settings
    add_user("bob@example.org")
    spool = Spool(settings.resolved_spool_dir)
    injector = Injector(settings)
    queue_id = injector.inject(mailgen.with_attachment(1, "big.bin", b"x" * (3 * LIMIT)),
                               ["bob@example.org"])
    injector.close()
    quarantined = spool.failed / f"{queue_id}.eml"

    with consumer_thread(settings.replace(max_message_bytes=LIMIT)):
        wait_for(lambda: queue_depth(settings.amqp_url, broker.DEAD) == 1, timeout=30,
                 message="the oversized message dead-lettered")
    assert quarantined.exists() and not (spool.incoming / quarantined.name).exists()
    assert "over" in quarantined.with_name(quarantined.name + ".reason").read_text()
    _duplicate_dead_letter(settings)

    # A dry run changes nothing and says what would happen.
    planned = Replayer(settings).run(dry_run=True)
    assert [(i.origin, i.action) for i in planned] == [(broker.INBOUND, "would replay")] * 2
    assert planned[0].detail == f"would restore failed/{queue_id}.eml"
    assert "quarantined" in planned[0].reason
    assert queue_depth(settings.amqp_url, broker.DEAD) == 2 and quarantined.exists()

    # The limit is raised (the default consumer settings), then the replay.
    with consumer_thread(settings):
        done = Replayer(settings).run()
        assert [i.action for i in done] == ["replayed", "replayed"]
        assert done[0].detail == f"restored failed/{queue_id}.eml to incoming/{queue_id}.eml"
        wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id == queue_id).exists()
                 and queue_depth(settings.amqp_url, broker.INBOUND) == 0, timeout=30,
                 message="the replayed message stored")
        wait_for(lambda: not list(spool.incoming.glob("*.eml")), timeout=10,
                 message="the spool file removed after the commit")

    assert EmailMessage.select().count() == 1
    assert EmailMessage.get().queue_id == queue_id
    assert list(spool.failed.iterdir()) == []  # the file and its .reason are gone
    assert dead_letters(settings.amqp_url) == []  # the second copy was a duplicate, not dead


def test_replay_finds_the_origin_in_rabbitmqs_x_death_when_ours_is_missing(broker_settings):
    settings = broker_settings
    add_user("bob@example.org")
    injector = Injector(settings)
    queue_id = injector.inject(mailgen.plain(1), ["bob@example.org"])
    injector.close()
    connection, channel = _channel(settings)
    try:
        # A reject without requeue: the work queue's own dead-lettering (the backstop).
        method, _, _ = channel.basic_get(broker.INBOUND, auto_ack=False)
        channel.basic_reject(method.delivery_tag, requeue=False)
    finally:
        connection.close()
    wait_for(lambda: queue_depth(settings.amqp_url, broker.DEAD) == 1, timeout=10)

    items = Replayer(settings).run()
    assert [(i.origin, i.action) for i in items] == [(broker.INBOUND, "replayed")]
    assert items[0].reason == f"RabbitMQ: rejected in {broker.INBOUND}"
    connection, channel = _channel(settings)
    try:
        method, properties, body = channel.basic_get(broker.INBOUND, auto_ack=False)
        headers = properties.headers or {}
        assert "x-death" not in headers and headers[H_REPLAYS] == 1
        assert properties.delivery_mode == 2 and properties.message_id == queue_id
        channel.basic_nack(method.delivery_tag, requeue=True)
    finally:
        connection.close()

    with consumer_thread(settings):
        wait_for(lambda: EmailMessage.select().count() == 1, timeout=30)
    assert dead_letters(settings.amqp_url) == []


def test_replay_keeps_what_it_cannot_place_and_respects_the_limit(broker_settings):
    settings = broker_settings
    broker.setup_topology(settings)
    connection, channel = _channel(settings)
    try:
        def dead(message_id, headers):
            channel.basic_publish("", broker.DEAD, TaskRef(f"task-{message_id}").to_body(),
                                  pika.BasicProperties(message_id=message_id, headers=headers,
                                                       delivery_mode=2), mandatory=True)
        dead("orphan", None)
        back = {broker.H_QUEUE: broker.TASK_TIMEOUTS, broker.H_REASON: "boom"}
        dead("first", back)
        dead("second", back)
        dead("gone", {broker.H_QUEUE: "mailferry.no_such_queue", broker.H_REASON: "old"})
    finally:
        connection.close()

    items = Replayer(settings).run(limit=2)
    assert [(i.message_id, i.action) for i in items] == [("orphan", "kept"), ("first", "replayed")]
    assert items[0].detail == "no origin queue in its headers"
    assert queue_depth(settings.amqp_url, broker.TASK_TIMEOUTS) == 1
    assert queue_depth(settings.amqp_url, broker.DEAD) == 3

    # The CLI: what is left, as JSON; a message that cannot go back makes the exit status 1.
    result = run_cli(settings, "replay", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert not report["dry_run"]
    assert sorted((m["message_id"], m["action"], m["detail"]) for m in report["messages"]) == [
        ("gone", "kept", "queue mailferry.no_such_queue does not exist"),
        ("orphan", "kept", "no origin queue in its headers"),
        ("second", "replayed", ""),
    ]
    assert queue_depth(settings.amqp_url, broker.TASK_TIMEOUTS) == 2
    assert sorted(json.loads(body)["task_id"] for _, body in dead_letters(settings.amqp_url)) == [
        "task-gone", "task-orphan"]


def test_replay_says_so_in_one_line_when_rabbitmq_is_unreachable(settings):
    result = run_cli(settings, "replay")  # ``settings`` points at a closed port
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("mailferry replay: RabbitMQ unreachable")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
