"""What Mailferry made of each message, end to end: injected as Haraka would, read by the
consumer, then seen through the real read API (HTTP on loopback) and the webhooks: the reply
text, automatic mail, a bounce linked to the stored message it reports on, one thread."""

from __future__ import annotations

import dataclasses
import time

from mailferry import api_tokens, webhooks
from mailferry.inject import Injector
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.users import add_user
from devstack.webhook_receiver import Receiver, relay_thread
from tests.pipeline import consumer_thread, wait_for
from tests.test_api import client, serving
from tests.test_webhooks import mail_and_webhooks

ORIGINAL = (b"From: Bob <bob@example.org>\r\nTo: ann@example.net\r\nSubject: Your ticket 42\r\n"
            b"Message-ID: <ticket-42@example.org>\r\nDate: Mon, 3 Nov 2025 10:00:00 +0000\r\n"
            b"Content-Type: text/plain\r\n\r\nWe are on it.\r\n")
REPLY = (b"From: Ann <ann@example.net>\r\nTo: bob@example.org\r\nSubject: Re: Your ticket 42\r\n"
         b"Message-ID: <reply-1@example.net>\r\nIn-Reply-To: <ticket-42@example.org>\r\n"
         b"References: <ticket-42@example.org>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
         b"Thanks, it works again.\r\n\r\nBest regards,\r\nAnn\r\n\r\n"
         b"On Mon, 3 Nov 2025 at 10:00, Bob <bob@example.org> wrote:\r\n> We are on it.\r\n")
VACATION = (b"From: Ann <ann@example.net>\r\nTo: bob@example.org\r\nSubject: Automatic reply: Your ticket 42\r\n"
            b"Message-ID: <ooo-1@example.net>\r\nAuto-Submitted: auto-replied\r\n"
            b"Content-Type: text/plain\r\n\r\nI am away until Monday.\r\n")
BOUNCE = (b"From: Mail Delivery System <MAILER-DAEMON@mx.example.org>\r\nTo: bob@example.org\r\n"
          b"Subject: Undelivered Mail Returned to Sender\r\nMessage-ID: <bounce-1@mx.example.org>\r\n"
          b"Auto-Submitted: auto-replied\r\nMIME-Version: 1.0\r\n"
          b'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
          b"--B\r\nContent-Type: text/plain\r\n\r\nThis is the mail system at host mx.example.org.\r\n"
          b"--B\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.org\r\n\r\n"
          b"Final-Recipient: rfc822; gone@example.net\r\nAction: failed\r\nStatus: 5.1.1\r\n"
          b"Diagnostic-Code: smtp; 550 5.1.1 <gone@example.net>: Recipient address rejected\r\n"
          b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nFrom: Bob <bob@example.org>\r\n"
          b"To: gone@example.net\r\nMessage-ID: <ticket-42@example.org>\r\nSubject: Your ticket 42\r\n"
          b"--B--\r\n")


def _inject(settings, *raws: bytes) -> list[str]:
    injector = Injector(settings)
    try:
        return [injector.inject(raw, ["bob@example.org"], "ann@example.net") for raw in raws]
    finally:
        injector.close()


def _handled(ids: list[str]) -> bool:
    return InboundReceipt.select().where(InboundReceipt.queue_id.in_(ids)).count() == len(ids)


def test_the_api_shows_reply_text_automatic_mail_a_linked_bounce_and_one_thread(broker_settings):
    settings = broker_settings
    bob = add_user("bob@example.org")
    _, token = api_tokens.create("app", bob)
    with consumer_thread(settings):
        ids = _inject(settings, ORIGINAL)
        wait_for(lambda: _handled(ids))
        ids = _inject(settings, REPLY, VACATION, BOUNCE)
        wait_for(lambda: _handled(ids))
    row = {m.message_id: m.id for m in EmailMessage.select()}
    with serving(settings) as base, client(base, token) as http:
        got = {mid: http.get(f"/v1/messages/{id_}").json() for mid, id_ in row.items()}
    original, reply = got["<ticket-42@example.org>"], got["<reply-1@example.net>"]
    vacation, bounce = got["<ooo-1@example.net>"], got["<bounce-1@mx.example.org>"]
    assert reply["reply_text"] == "Thanks, it works again."
    assert (reply["auto_reply"], reply["bulk"], reply["loop"], reply["bounce"]) == (False, False, False, None)
    assert reply["thread_id"] == original["thread_id"]
    assert vacation["auto_reply"] is True and vacation["bounce"] is None
    assert bounce["auto_reply"] is False  # a bounce is its own kind
    assert bounce["bounce"] == {
        "kind": "bounce", "original_message_id": "<ticket-42@example.org>",
        "recipients": [{"address": "gone@example.net", "action": "failed", "status": "5.1.1",
                        "diagnostic": "smtp; 550 5.1.1 <gone@example.net>: Recipient address rejected"}]}


def test_automatic_mail_can_be_kept_out_of_webhooks_and_a_bounce_is_an_event_of_its_own(sqlite_broker_settings):
    settings = dataclasses.replace(sqlite_broker_settings, webhook_automatic="skip")
    with Receiver([200]) as receiver:
        add_user("bob@example.org")
        webhooks.add_endpoint(settings, receiver.url)
        with mail_and_webhooks(settings), relay_thread(settings):
            ids = _inject(settings, ORIGINAL)
            wait_for(lambda: len(receiver.got()) >= 1, timeout=20, message="the first webhook")
            ids = _inject(settings, VACATION, BOUNCE, REPLY)
            wait_for(lambda: _handled(ids))
            # Three more events are written (a bounce's stored, its bounced, the reply's stored);
            # two are sent: the reply's message.stored and message.bounced.
            wait_for(lambda: len(receiver.got()) >= 3, timeout=20, message="the reply and the bounce")
            time.sleep(1.0)  # time for a webhook that should not come
        got = [(g.event["type"], g.event["data"].get("subject") or g.event["data"].get("kind"))
               for g in receiver.got()]
        bounced = [g.event["data"] for g in receiver.got() if g.event["type"] == "message.bounced"]
    assert sorted(got) == sorted([("message.stored", "Your ticket 42"), ("message.bounced", "bounce"),
                                  ("message.stored", "Re: Your ticket 42")])
    original = EmailMessage.get(EmailMessage.message_id == "<ticket-42@example.org>")
    assert bounced[0]["original"] == original.id
    assert bounced[0]["recipients"][0]["address"] == "gone@example.net"
