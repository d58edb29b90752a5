"""Tests of the test harness itself: each service starts, answers, and behaves as the
fixtures promise (isolated vhosts, durable messages across a restart, fresh databases,
fresh IMAP users, old internal dates, UIDVALIDITY on re-creation)."""
from __future__ import annotations

import datetime as dt
import secrets
import socket
import ssl
import time
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import psycopg2
import pytest
from imapclient import IMAPClient
from imapclient.exceptions import LoginError

from devstack.containers import docker_available
from tests.harness.fixtures import ExternalPostgres, ExternalRabbitMQ, require_service
from devstack.ports import free_port, port_open, wait_until
from devstack.rabbitmq import management_request

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: harness check\r\n"
    b"Message-ID: <harness-1@example.org>\r\n"
    b"Date: Sat, 03 Feb 2001 04:05:06 +0000\r\n"
    b"\r\n"
    b"old mail\r\n"
)


# -- helpers and pure units ------------------------------------------------------------------


def test_free_port_is_free_loopback_and_not_repeated():
    ports = {free_port() for _ in range(20)}
    assert len(ports) == 20
    for port in list(ports)[:5]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))  # really free
        assert not port_open(port)


def test_require_service_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="frobnicator unavailable: not installed"):
        require_service("frobnicator", "not installed")


def test_require_service_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="frobnicator unavailable"):
        require_service("frobnicator", "not installed")


def test_docker_available_is_false_without_a_docker_client(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert docker_available.__wrapped__() is False


def test_external_rabbitmq_urls():
    broker = ExternalRabbitMQ(
        "amqp://u%40x:p%2Fw@mq.example:5673/%2F", "http://admin:secret@mq.example:15673"
    )
    assert (broker.host, broker.amqp_port) == ("mq.example", 5673)
    # Credentials of the management URL win for the HTTP API and are taken out of the URL.
    assert (broker.username, broker.password) == ("admin", "secret")
    assert broker.management_url == "http://mq.example:15673"
    assert broker.amqp_url_for("test/1") == "amqp://u%40x:p%2Fw@mq.example:5673/test%2F1"
    with pytest.raises(RuntimeError, match="cannot be stopped or restarted"):
        broker.restart()


def test_external_postgres_url_for():
    pg = ExternalPostgres("postgresql+psycopg2://me:pw@db.example:5433/main?sslmode=disable")
    assert pg.url == "postgresql://me:pw@db.example:5433/main?sslmode=disable"
    assert pg.url_for("t_1") == "postgresql://me:pw@db.example:5433/t_1?sslmode=disable"
    with pytest.raises(ValueError):
        pg.create_database('x"; DROP DATABASE main; --')


# -- RabbitMQ ------------------------------------------------------------------------------


def _vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:])


def test_rabbitmq_vhost_publish_with_confirms(rabbitmq, rabbitmq_vhost):
    assert _vhost_of(rabbitmq_vhost).startswith("test-")
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_vhost))
    try:
        ch = conn.channel()
        ch.confirm_delivery()
        ch.queue_declare("harness.q", durable=True)
        # With confirms on, a publish that the broker did not take raises; mandatory makes
        # an unroutable one raise too.
        ch.basic_publish(
            "", "harness.q", b"payload",
            pika.BasicProperties(delivery_mode=2, content_type="text/plain"),
            mandatory=True,
        )
        with pytest.raises(pika.exceptions.UnroutableError):
            ch.basic_publish("", "no.such.queue", b"x", mandatory=True)
        method, props, body = ch.basic_get("harness.q", auto_ack=False)
        assert body == b"payload" and props.delivery_mode == 2
        ch.basic_ack(method.delivery_tag)
    finally:
        conn.close()


def test_rabbitmq_vhosts_are_isolated(rabbitmq, rabbitmq_vhost):
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_vhost))
    try:
        conn.channel().queue_declare("only.in.this.vhost")
    finally:
        conn.close()
    # The queue exists in the test's vhost (management API) …
    vhost = _vhost_of(rabbitmq_vhost)
    from urllib.parse import quote

    queue = management_request(
        rabbitmq.management_url, "GET",
        f"/api/queues/{quote(vhost, safe='')}/only.in.this.vhost",
        username=rabbitmq.username, password=rabbitmq.password,
    )
    assert queue["name"] == "only.in.this.vhost" and queue["vhost"] == vhost
    # … and not in the default vhost.
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq.amqp_url))
    try:
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
            conn.channel().queue_declare("only.in.this.vhost", passive=True)
        assert info.value.reply_code == 404
    finally:
        conn.close()


def test_the_harness_rabbitmq_creates_classic_queues_v2(rabbitmq, rabbitmq_vhost):
    # A broker the harness starts (native for make run, tests and benchmarks, or the
    # container) must store classic queues as RabbitMQ 4 in docker-compose.yml does: v2, the
    # only version there (Debian's 3.x and the 3.10 image default to v1).
    if isinstance(rabbitmq, ExternalRabbitMQ):
        require_service("a RabbitMQ started by the harness",
                        "MAILFERRY_TEST_AMQP_URL names an external broker, whose queue storage "
                        "version is its own configuration")
    conn = pika.BlockingConnection(pika.URLParameters(rabbitmq_vhost))
    try:
        conn.channel().queue_declare("versioned", durable=True)
    finally:
        conn.close()
    from urllib.parse import quote

    def storage() -> dict:  # filled in with the first statistics emission (every 0.5 s)
        return management_request(
            rabbitmq.management_url, "GET",
            f"/api/queues/{quote(_vhost_of(rabbitmq_vhost), safe='')}/versioned",
            username=rabbitmq.username, password=rabbitmq.password,
        ).get("backing_queue_status", {})

    wait_until(lambda: "version" in storage(), timeout=10)
    assert storage()["version"] == 2


def test_restartable_rabbitmq_keeps_durable_messages_and_can_go_away(restartable_rabbitmq):
    broker = restartable_rabbitmq
    params = pika.URLParameters(broker.amqp_url)
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    ch.queue_declare("durable.q", durable=True)
    ch.basic_publish("", "durable.q", b"survives", pika.BasicProperties(delivery_mode=2))
    conn.close()

    # stop_app: the broker goes away while the node stays up; clients cannot connect.
    broker.stop_app()
    assert not port_open(broker.amqp_port)
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(pika.URLParameters(broker.amqp_url + "?connection_attempts=1"))
    broker.start_app()

    amqp_port, http_port, node = broker.amqp_port, broker.management_port, broker.node
    broker.restart()
    assert (broker.amqp_port, broker.management_port, broker.node) == (amqp_port, http_port, node)
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        method, _props, body = ch.basic_get("durable.q", auto_ack=True)
        assert body == b"survives"
    finally:
        conn.close()


# -- PostgreSQL ------------------------------------------------------------------------------


def test_pg_database_is_fresh_and_usable(pg_database):
    conn = psycopg2.connect(pg_database)
    try:
        with conn, conn.cursor() as cur:
            cur.execute("SELECT current_database()")
            assert cur.fetchone()[0] == urlsplit(pg_database).path[1:]
            cur.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert cur.fetchone()[0] == 0
            cur.execute("CREATE TABLE t (id serial PRIMARY KEY, v text)")
            cur.execute("INSERT INTO t (v) VALUES ('x'), ('y') RETURNING id")
            assert [r[0] for r in cur.fetchall()] == [1, 2]
    finally:
        conn.close()


def test_postgres_create_and_drop_database(postgres):
    name = f"t_check_{secrets.token_hex(4)}"
    url = postgres.create_database(name)
    assert url.startswith("postgresql://") and url.endswith("/" + name)
    conn = psycopg2.connect(url)  # left open: the drop must not hang on it
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        postgres.drop_database(name)
        conn.close()
    admin = psycopg2.connect(postgres.url)
    try:
        with admin.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
            assert cur.fetchone()[0] == 0
    finally:
        admin.close()


# -- Dovecot ---------------------------------------------------------------------------------


def _imap(account) -> IMAPClient:
    client = IMAPClient(account.host, account.port, ssl=False, timeout=10)
    client.login(account.username, account.password)
    return client


def test_imap_append_old_internal_date_select_fetch(imap_account):
    client = _imap(imap_account)
    try:
        old = dt.datetime(2001, 2, 3, 4, 5, 6, tzinfo=dt.timezone.utc)
        client.append("INBOX", MESSAGE, flags=(), msg_time=old)
        info = client.select_folder("INBOX")
        assert info[b"EXISTS"] == 1 and info[b"UIDVALIDITY"] > 0
        uids = client.search("ALL")
        data = client.fetch(uids, ["BODY.PEEK[]", "INTERNALDATE", "FLAGS"])
        (msg,) = data.values()
        assert msg[b"BODY[]"] == MESSAGE
        internal = msg[b"INTERNALDATE"]
        if internal.tzinfo is None:  # imapclient gives local time without tzinfo
            internal = internal.astimezone(dt.timezone.utc)
        assert internal == old
        assert b"\\Seen" not in msg[b"FLAGS"]  # PEEK did not mark it read
        assert {b"IDLE", b"CONDSTORE", b"QRESYNC", b"UIDPLUS", b"MOVE"} <= set(
            client.capabilities()
        )
    finally:
        client.logout()


def test_imap_uidvalidity_changes_when_folder_is_recreated(imap_account):
    client = _imap(imap_account)
    try:
        client.create_folder("Archive")
        client.append("Archive", MESSAGE)
        first = client.select_folder("Archive")[b"UIDVALIDITY"]
        client.unselect_folder()
        client.delete_folder("Archive")
        client.create_folder("Archive")
        info = client.select_folder("Archive")
        assert info[b"EXISTS"] == 0
        assert info[b"UIDVALIDITY"] != first
    finally:
        client.logout()


def test_imap_accounts_are_separate_and_removed_users_cannot_log_in(dovecot, imap_account):
    client = _imap(imap_account)
    client.append("INBOX", MESSAGE)
    client.logout()

    dovecot.add_user("harness-other", "s3cret pass")  # spaces are fine in a password
    try:
        other = IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10)
        other.login("harness-other", "s3cret pass")
        assert other.select_folder("INBOX")[b"EXISTS"] == 0
        other.logout()
    finally:
        dovecot.remove_user("harness-other")

    def refused() -> bool:
        try:
            c = IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=10)
            c.login("harness-other", "s3cret pass")
            c.logout()
            return False
        except LoginError:
            return True

    # dovecot re-reads a passwd-file at most once a second: refused within ~1 s.
    assert wait_until(refused, 5, interval=0.2)
    assert not dovecot.home_of("harness-other").exists()


def test_imaps_and_starttls_with_the_self_signed_certificate(dovecot, imap_account):
    if dovecot.ssl_port is None:
        require_service("openssl", "the test dovecot has no TLS (scripts/install-system.sh installs it)")
    ctx = ssl.create_default_context(cafile=str(dovecot.cert_path))
    client = IMAPClient("localhost", dovecot.ssl_port, ssl=True, ssl_context=ctx, timeout=10)
    client.login(imap_account.username, imap_account.password)
    client.logout()
    plain = IMAPClient("localhost", dovecot.port, ssl=False, timeout=10)
    plain.starttls(ssl.create_default_context(cafile=str(dovecot.cert_path)))
    plain.login(imap_account.username, imap_account.password)
    plain.logout()


def test_dovecot_restart_keeps_mail(dovecot, imap_account):
    client = _imap(imap_account)
    client.append("INBOX", MESSAGE)
    client.logout()
    started = time.monotonic()
    dovecot.restart()
    assert time.monotonic() - started < 15
    client = _imap(imap_account)
    try:
        assert client.select_folder("INBOX")[b"EXISTS"] == 1
    finally:
        client.logout()
