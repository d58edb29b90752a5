"""SMTP end to end: smtplib → real Haraka with the mailferry plugin → real RabbitMQ → consumer → database.

Every test runs on SQLite and on PostgreSQL (the ``settings`` fixture).
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest

from mailferry import broker
from mailferry.users import add_user
from mailferry.models import EmailAttachment, EmailMessage, InboundReceipt
from mailferry.storage import BlobStore
from devstack import mailgen
from tests.harness.fixtures import require_service
from devstack.haraka import HarakaServer, haraka_available
from tests.pipeline import consumer_process, consumer_thread, dead_letters, wait_for, waiting_in_spool

QUEUED_AS = re.compile(rb"queued as (\S+)")


@pytest.fixture
def haraka_installed() -> None:
    if not haraka_available():
        require_service("Haraka", "haraka_plugin/node_modules or node is missing (npm ci in haraka_plugin)")


class Smtp:
    """One SMTP session; ``send`` returns the reply to DATA, never raises on 4xx/5xx."""

    def __init__(self, server: HarakaServer, timeout: float = 30):
        self.smtp = smtplib.SMTP(server.host, server.port, timeout=timeout)
        self.smtp.ehlo("client.example.net")

    def send(self, raw: bytes, rcpts: list[str], mail_from: str = "sender@example.net") -> tuple[int, bytes]:
        code, reply = self.smtp.mail(mail_from)
        assert code == 250, reply
        for rcpt in rcpts:
            code, reply = self.smtp.rcpt(rcpt)
            assert code == 250, reply
        # smtplib sends bytes as given; mail on the wire has CRLF (Haraka refuses bare LF).
        code, reply = self.smtp.data(crlf(raw))
        if code != 250:
            self.smtp.rset()
        return code, reply

    def close(self) -> None:
        try:
            self.smtp.quit()
        except smtplib.SMTPException:
            self.smtp.close()

    def __enter__(self) -> "Smtp":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def crlf(raw: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", raw)


def queue_id(reply: bytes) -> str:
    found = QUEUED_AS.search(reply)
    assert found, f"no queue id in {reply!r}"
    return found.group(1).decode()


def receipts(queue_ids) -> int:
    return InboundReceipt.select().where(InboundReceipt.queue_id.in_(list(queue_ids))).count()


def haraka_for(settings, tmp_path: Path, **kwargs) -> HarakaServer:
    return HarakaServer(tmp_path / "haraka", settings.amqp_url, settings.resolved_spool_dir, **kwargs)


def test_attachment_sent_over_smtp_is_stored_with_its_bytes(broker_settings, haraka_installed, tmp_path):
    settings = broker_settings
    bob = add_user("bob@example.org")
    payload = bytes(range(256)) * 300  # binary, base64 on the wire, 76,800 bytes
    raw = mailgen.with_attachment(1, "report.bin", payload)

    with consumer_thread(settings), haraka_for(settings, tmp_path) as haraka:
        haraka.wait_connected()
        with Smtp(haraka) as smtp:
            code, reply = smtp.send(raw, ["bob@example.org"])
        assert code == 250, reply
        qid = queue_id(reply)
        wait_for(lambda: receipts([qid]) == 1, message="the message stored")

    message = EmailMessage.get(EmailMessage.user == bob)
    assert message.message_id == "<att-1@example.net>"
    assert message.source == "smtp"
    assert message.envelope["queue_id"] == qid
    attachment = EmailAttachment.get(EmailAttachment.email_message == message)
    assert attachment.filename == "report.bin"
    assert attachment.file_size == len(payload)
    store = BlobStore.of(settings)
    assert store.read(attachment.file_path) == payload
    # The raw file as stored is the message the client sent, after the Received: header Haraka
    # adds: an RFC 5322 message for any tool, without the spool's envelope record.
    stored_raw = store.read(message.raw_path)
    assert stored_raw.startswith(b"Received: ")
    assert stored_raw.endswith(crlf(raw))
    assert waiting_in_spool(settings) == []


def test_bcc_only_recipient_gets_the_message(broker_settings, haraka_installed, tmp_path):
    settings = broker_settings
    alice = add_user("alice@example.org")
    bob = add_user("bob@example.org")
    raw = mailgen.plain(1, to="alice@example.org")  # bob appears in no header: Bcc
    assert b"bob@" not in raw

    with consumer_thread(settings), haraka_for(settings, tmp_path) as haraka:
        haraka.wait_connected()
        with Smtp(haraka) as smtp:
            code, reply = smtp.send(raw, ["alice@example.org", "bob@example.org"])
        assert code == 250, reply
        qid = queue_id(reply)
        wait_for(lambda: receipts([qid]) == 1, message="the message stored")

    rows = {m.user_id: m for m in EmailMessage.select()}
    assert set(rows) == {alice.id, bob.id}
    assert rows[bob.id].message_id == "<test-1@example.net>"
    assert rows[bob.id].envelope["rcpt_to"] == ["alice@example.org", "bob@example.org"]
    assert "bob@" not in (rows[bob.id].recipients or "")
    # The one raw file both rows share is the message alone: the RCPT list (bob, the Bcc)
    # stays in the spool's record and each row's envelope, never in what alice can download.
    assert rows[alice.id].raw_path == rows[bob.id].raw_path
    shared = BlobStore.of(settings).read(rows[alice.id].raw_path)
    assert shared.endswith(crlf(raw)) and b"MAILFERRY-ENVELOPE" not in shared
    assert b"bob@" not in shared
    assert InboundReceipt.get(InboundReceipt.queue_id == qid).stored_count == 2


def test_broker_down_gives_4xx_without_spool_file_and_mail_flows_again_when_it_returns(
        settings, restartable_rabbitmq, haraka_installed, tmp_path):
    rabbit = restartable_rabbitmq
    settings = settings.replace(amqp_url=rabbit.amqp_url)
    add_user("bob@example.org")

    # The consumer declares mailferry.inbound (durable: it survives stop_app/start_app); it is
    # started only around the deliveries, so its own reconnect backoff plays no part here.
    with consumer_thread(settings):
        pass
    # A short backoff cap keeps the test quick; the behaviour is the same at the default 30 s.
    with haraka_for(settings, tmp_path, mailferry_ini={"amqp": {"reconnect_max": 1}}) as haraka:
        haraka.wait_connected()
        with Smtp(haraka) as smtp:
            code, reply = smtp.send(mailgen.plain(1), ["bob@example.org"])
            assert code == 250, reply
            before = queue_id(reply)

            rabbit.stop_app()
            # The same SMTP session and a new one both get 4xx at DATA, never 250.
            code, reply = smtp.send(mailgen.plain(2), ["bob@example.org"])
            assert 400 <= code < 500, (code, reply)
        with Smtp(haraka) as smtp:
            code, reply = smtp.send(mailgen.plain(3), ["bob@example.org"])
        assert 400 <= code < 500, (code, reply)
        assert b"RabbitMQ" in reply
        assert waiting_in_spool(settings) == [before]  # only the confirmed message

        rabbit.start_app()
        wait_for(lambda: haraka.log_path.read_text(errors="replace").count(
            "[mailferry] connected to RabbitMQ") >= 2, timeout=30, message="Haraka reconnected")
        with Smtp(haraka) as smtp:
            code, reply = smtp.send(mailgen.plain(4), ["bob@example.org"])
        assert code == 250, reply
        after = queue_id(reply)
        assert haraka.running()  # never restarted

        with consumer_thread(settings):
            wait_for(lambda: receipts([before, after]) == 2, message="both accepted messages stored")

    stored = sorted(m.message_id for m in EmailMessage.select())
    assert stored == ["<test-1@example.net>", "<test-4@example.net>"]
    assert waiting_in_spool(settings) == []
    assert dead_letters(settings.amqp_url) == []


MESSAGES = 1_000
CONNECTIONS = 8


def test_a_thousand_messages_over_eight_connections_are_stored_exactly_once(
        broker_settings, haraka_installed, tmp_path):
    settings = broker_settings
    add_user("bob@example.org")
    # The queues exist, as they do once any Mailferry process has started (make run declares
    # them first): otherwise mail sent before the consumer is up gets a 4xx, rightly.
    broker.setup_topology(settings)
    replies: list[tuple[int, int, bytes]] = []
    lock = threading.Lock()

    def sender(worker: int, haraka: HarakaServer) -> None:
        with Smtp(haraka, timeout=60) as smtp:
            for n in range(worker, MESSAGES, CONNECTIONS):
                code, reply = smtp.send(mailgen.plain(n), ["bob@example.org"])
                with lock:
                    replies.append((n, code, reply))

    consumer = consumer_process(settings, tmp_path / "consumer.log")
    try:
        with haraka_for(settings, tmp_path) as haraka:
            haraka.wait_connected()
            threads = [threading.Thread(target=sender, args=(w, haraka)) for w in range(CONNECTIONS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not any(t.is_alive() for t in threads), "senders did not finish"
            refused = [(n, code, reply) for n, code, reply in replies if code != 250]
            assert len(replies) == MESSAGES and refused == []
            ids = [queue_id(reply) for _, _, reply in replies]
            assert len(set(ids)) == MESSAGES
            wait_for(lambda: InboundReceipt.select().count() >= MESSAGES, timeout=60,
                     interval=0.2, message=f"{MESSAGES} messages handled")
    finally:
        consumer.terminate()
        try:
            consumer.wait(40)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()

    assert receipts(ids) == MESSAGES
    assert Counter(r.outcome for r in InboundReceipt.select()) == {"stored": MESSAGES}
    message_ids = [m.message_id for m in EmailMessage.select()]
    assert len(message_ids) == MESSAGES
    assert set(message_ids) == {f"<test-{n}@example.net>" for n in range(MESSAGES)}
    assert waiting_in_spool(settings) == []
    assert dead_letters(settings.amqp_url) == []
