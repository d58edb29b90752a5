"""Events to webhooks, end to end: a message injected as Haraka would, the consumer, the
relay, the webhook worker, and a real HTTP receiver on loopback. Signatures are checked with
the ``standardwebhooks`` package, not with our signer."""

from __future__ import annotations

import json
import os
import time

from standardwebhooks.webhooks import Webhook

from mailferry import broker, webhooks
from mailferry.inject import Injector
from mailferry.models import Event, WebhookAttempt, WebhookEndpoint
from mailferry.replay import Replayer
from mailferry.users import add_user
from tests.imap_fixtures import nested_too_deep
from consumer.main import build_handlers
from consumer.webhooks import WebhookHandler
from tests.pipeline import consumer_thread, queue_depth, wait_for
from devstack.webhook_receiver import Receiver, relay_thread

MESSAGE = (b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: Hello\r\n"
           b"Message-ID: <hook-1@example.net>\r\nContent-Type: text/plain\r\n\r\nHi Bob.\r\n")


def mail_and_webhooks(settings):
    """The consumer's lanes and the webhook worker's, in one runner in a thread."""
    return consumer_thread(settings, [*build_handlers(settings), WebhookHandler(settings)])


def _setup(settings, receiver, **endpoint):
    add_user("bob@example.org")
    endpoint_row, secret = webhooks.add_endpoint(settings, receiver.url, **endpoint)
    return endpoint_row, secret


def _inject(settings, raw=MESSAGE):
    injector = Injector(settings)
    try:
        return injector.inject(raw, ["bob@example.org"], "alice@example.net")
    finally:
        injector.close()


def test_a_stored_message_is_posted_signed_with_its_payload(sqlite_broker_settings):
    settings = sqlite_broker_settings
    with Receiver([200]) as receiver:
        _, secret = _setup(settings, receiver)
        with mail_and_webhooks(settings), relay_thread(settings):
            _inject(settings)
            wait_for(lambda: receiver.got(), timeout=20, message="the webhook")
        [got] = receiver.got()
    payload = Webhook(secret).verify(got.body, got.headers)  # raises on a bad signature
    assert payload["type"] == "message.stored"
    assert got.headers["webhook-id"] == payload["id"] == Event.get().event_id
    data = payload["data"]
    assert (data["subject"], data["from"], data["text"].strip()) == ("Hello", "alice@example.net", "Hi Bob.")
    assert data["envelope"] == {"mail_from": "alice@example.net", "rcpt_to": ["bob@example.org"]}
    assert ["Subject", "Hello"] in data["headers"]
    assert data["raw_url"].endswith(f"/v1/messages/{data['id']}/raw")
    assert WebhookAttempt.get().outcome == "delivered"


def test_two_failures_then_success_deliver_once_with_one_id_at_the_configured_spacing(sqlite_broker_settings):
    settings = sqlite_broker_settings.replace(webhook_schedule="1,2,30")
    with Receiver([500, 500, 200]) as receiver:
        _, secret = _setup(settings, receiver)
        with mail_and_webhooks(settings), relay_thread(settings):
            _inject(settings)
            wait_for(lambda: len(receiver.got()) >= 3, timeout=30, message="three attempts")
            time.sleep(1.5)  # nothing more may come
        got = receiver.got()
    assert [g.status for g in got] == [500, 500, 200]
    assert len({g.headers["webhook-id"] for g in got}) == 1
    for g in got:
        Webhook(secret).verify(g.body, g.headers)
    gaps = [b.at - a.at for a, b in zip(got, got[1:])]
    assert 0.9 <= gaps[0] < 2.5 and 1.9 <= gaps[1] < 3.5, gaps
    assert [a.outcome for a in WebhookAttempt.select().order_by(WebhookAttempt.id)] == \
        ["retry", "retry", "delivered"]
    assert WebhookEndpoint.get().failing_since is None


def test_410_gone_disables_the_endpoint(sqlite_broker_settings):
    settings = sqlite_broker_settings.replace(webhook_schedule="1")
    with Receiver([410]) as receiver:
        _setup(settings, receiver)
        with mail_and_webhooks(settings), relay_thread(settings):
            _inject(settings)
            wait_for(lambda: not WebhookEndpoint.get().enabled, timeout=20, message="disabled")
            time.sleep(1.5)  # no retry
        assert len(receiver.got()) == 1
    endpoint = WebhookEndpoint.get()
    assert "410" in endpoint.disabled_reason
    assert WebhookAttempt.get().outcome == "gone"


def test_a_receiver_down_past_the_last_attempt_is_dead_lettered_and_replay_delivers(sqlite_broker_settings):
    settings = sqlite_broker_settings.replace(webhook_schedule="1,1")
    with Receiver([503]) as receiver:
        _, secret = _setup(settings, receiver)
        with mail_and_webhooks(settings), relay_thread(settings):
            _inject(settings)
            wait_for(lambda: queue_depth(settings.amqp_url, broker.DEAD) == 1, timeout=30,
                     message="the delivery in mailferry.dead")
            assert len(receiver.got()) == 3
            assert [a.outcome for a in WebhookAttempt.select().order_by(WebhookAttempt.id)] == \
                ["retry", "retry", "dead"]
            receiver.statuses = [200]  # the receiver is back
            Replayer(settings).run()
            wait_for(lambda: len(receiver.got()) == 4, timeout=20, message="the replayed delivery")
        got = receiver.got()
    assert got[-1].status == 200
    assert len({g.headers["webhook-id"] for g in got}) == 1
    Webhook(secret).verify(got[-1].body, got[-1].headers)
    assert queue_depth(settings.amqp_url, broker.DEAD) == 0


def test_an_endpoint_for_one_user_gets_only_that_users_events(sqlite_broker_settings):
    settings = sqlite_broker_settings
    with Receiver([200]) as mine, Receiver([200]) as theirs:
        bob = add_user("bob@example.org")
        carol = add_user("carol@example.org")
        webhooks.add_endpoint(settings, mine.url, user=bob)
        webhooks.add_endpoint(settings, theirs.url, user=carol, events=["message.stored"])
        with mail_and_webhooks(settings), relay_thread(settings):
            _inject(settings)
            wait_for(lambda: mine.got(), timeout=20, message="bob's webhook")
            time.sleep(1.0)
        assert len(mine.got()) == 1 and theirs.got() == []


def test_unrouted_and_quarantined_mail_are_events_too(sqlite_broker_settings):
    settings = sqlite_broker_settings
    with Receiver([200]) as receiver:
        webhooks.add_endpoint(settings, receiver.url)
        add_user("bob@example.org")
        with mail_and_webhooks(settings), relay_thread(settings):
            injector = Injector(settings)
            injector.inject(MESSAGE, ["nobody@example.org"], "alice@example.net")
            injector.inject(nested_too_deep(1), ["bob@example.org"], "alice@example.net")
            injector.close()
            wait_for(lambda: len(receiver.got()) >= 2, timeout=20, message="two events")
        types = sorted(g.event["type"] for g in receiver.got())
    assert types == ["message.quarantined", "message.unrouted"]


def test_the_webhooks_commands_add_list_test_and_show_deliveries(sqlite_settings, capsys):
    from mailferry.cli import main

    with Receiver([204]) as receiver:
        os.environ["MAILFERRY_VAR_DIR"] = str(sqlite_settings.var_dir)
        try:
            assert main(["webhooks", "add", receiver.url, "--events", "message.stored"]) == 0
            out = capsys.readouterr().out
            secret = out.split("signing secret")[1].split(": ", 1)[1].strip()
            assert secret.startswith("whsec_")
            assert main(["webhooks", "list", "--json"]) == 0
            listed = json.loads(capsys.readouterr().out)
            assert [(e["url"], e["events"]) for e in listed] == [(receiver.url, ["message.stored"])]
            assert main(["webhooks", "test", str(listed[0]["id"])]) == 0
            assert capsys.readouterr().out.startswith("delivered: status 204")
            [got] = receiver.got()
            assert Webhook(secret).verify(got.body, got.headers)["type"] == "webhook.test"
            assert main(["webhooks", "add", receiver.url, "--events", "nonsense"]) == 1
            assert main(["webhooks", "remove", str(listed[0]["id"])]) == 0
            assert WebhookEndpoint.select().count() == 0
        finally:
            del os.environ["MAILFERRY_VAR_DIR"]
