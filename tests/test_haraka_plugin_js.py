"""The Haraka queue plugin: its JavaScript suite (npm test), and real Haraka started by the harness.

Without haraka_plugin/node_modules these tests skip locally and fail in CI (CI is set).
The JS suite's real-broker tests get a fresh vhost of the harness's RabbitMQ.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import smtplib
import subprocess
import uuid
from pathlib import Path

import pytest

from mailferry.spool import split_envelope
from tests.harness.fixtures import require_service
from devstack.haraka import PLUGIN_DIR, HarakaServer, haraka_available
from devstack.ports import free_port

MESSAGE = (b"Subject: harness\r\nMessage-ID: <harness@example.org>\r\n\r\n"
           b"hello\r\n.a line that starts with a dot\r\n")
RCPTS = ["first@example.com", "second@example.net"]


@pytest.fixture
def haraka_installed() -> None:
    if shutil.which("node") is None:
        require_service("node", "not installed")
    if not (PLUGIN_DIR / "node_modules").is_dir() or not haraka_available():
        require_service("Haraka", "haraka_plugin/node_modules is missing (npm ci in haraka_plugin)")


def _send(server: HarakaServer) -> tuple[int, str]:
    """Send MESSAGE; return (250, "") or the 4xx/5xx reply to DATA."""
    with smtplib.SMTP(server.host, server.port, timeout=30) as smtp:
        smtp.ehlo("client.example.net")
        try:
            smtp.sendmail("sender@example.org", RCPTS, MESSAGE)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
    return 250, ""


def _spooled(spool: Path) -> list[str]:
    incoming = spool / "incoming"
    return sorted(p.name for p in incoming.iterdir()) if incoming.is_dir() else []


def test_js_suite_passes(haraka_installed, rabbitmq_vhost):
    env = dict(os.environ, MAILFERRY_TEST_AMQP_URL=rabbitmq_vhost)
    proc = subprocess.run(["npm", "test"], cwd=PLUGIN_DIR, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, f"npm test failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"


def test_haraka_without_broker_answers_4xx_and_keeps_no_spool_file(haraka_installed, tmp_path):
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"  # nothing listens there
    spool = tmp_path / "spool"
    with HarakaServer(tmp_path / "haraka", closed, spool) as server:
        code, reply = _send(server)
    assert 400 <= code < 500, reply
    assert "RabbitMQ" in reply
    assert _spooled(spool) == []


def test_haraka_with_discard_queue_accepts_mail(haraka_installed, tmp_path):
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    with HarakaServer(tmp_path / "haraka", closed, tmp_path / "spool", queue_plugin="queue/discard") as server:
        assert _send(server) == (250, "")
        assert "discarding message" in server.log_path.read_text()


def test_haraka_spools_and_publishes_to_a_real_broker(haraka_installed, rabbitmq_vhost, tmp_path):
    import pika
    url = rabbitmq_vhost
    exchange = f"mailferry.test.{uuid.uuid4()}"  # private: a real consumer never sees it
    conn = pika.BlockingConnection(pika.URLParameters(url))
    channel = conn.channel()
    channel.exchange_declare(exchange, "direct", durable=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange, "inbound")
    spool = tmp_path / "spool"
    try:
        with HarakaServer(tmp_path / "haraka", url, spool,
                          mailferry_ini={"amqp": {"exchange": exchange}}) as server:
            server.wait_connected()
            assert _send(server) == (250, "")
        _, props, body = channel.basic_get(queue, auto_ack=True)
    finally:
        channel.exchange_delete(exchange)
        conn.close()

    contract = json.loads(body)
    assert props.message_id == contract["queue_id"]
    assert props.delivery_mode == 2
    assert contract["rcpt_to"] == RCPTS
    assert contract["mail_from"] == "sender@example.org"
    # The segment holds the record where the job says: the job as published, then the message.
    spooled = (spool / contract["spool_path"]).read_bytes()[contract["spool_offset"]:]
    record, start = split_envelope(spooled)
    assert json.loads(record) == contract
    raw = spooled[start:start + contract["size"]]
    assert raw.startswith(b"Received: ")
    assert raw.endswith(b"\r\nhello\r\n.a line that starts with a dot\r\n")
    assert contract["size"] == len(raw) and contract["sha256"] == hashlib.sha256(raw).hexdigest()
    assert _spooled(spool) == [Path(contract["spool_path"]).name]
