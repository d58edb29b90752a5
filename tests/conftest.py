"""Test fixtures: the services (tests/harness) and the application on top of them.

Every test that touches the database runs twice, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import pytest

from mailferry.config import Settings
from mailferry.db import close_database, open_database
from tests.harness.fixtures import *  # noqa: F401,F403  (rabbitmq, postgres, dovecot, …)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'mailferry.db'}"
    return request.getfixturevalue("pg_database")


@pytest.fixture
def settings(tmp_path, database_url) -> Settings:
    """Settings on a fresh database and fresh folders; the database is open."""
    settings = Settings(
        var_dir=tmp_path / "var", database_url=database_url,
        amqp_url="amqp://guest:guest@127.0.0.1:1/%2F",  # no broker unless broker_settings
        secret_key="", prefetch=32, consumer_metrics_port=0, scheduler_metrics_port=0,
        relay_metrics_port=0, webhook_metrics_port=0)
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    open_database(settings.resolved_database_url)
    yield settings
    close_database()


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:
    """Like ``settings`` but on SQLite only: for tests where the backend does not matter."""
    settings = Settings(var_dir=tmp_path / "var", consumer_metrics_port=0,
                        scheduler_metrics_port=0, relay_metrics_port=0, webhook_metrics_port=0,
                        amqp_url="amqp://guest:guest@127.0.0.1:1/%2F")
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    open_database(settings.resolved_database_url)
    yield settings
    close_database()


@pytest.fixture
def broker_settings(settings, rabbitmq_vhost) -> Settings:
    """``settings`` on a fresh RabbitMQ vhost."""
    return settings.replace(amqp_url=rabbitmq_vhost)


@pytest.fixture
def sqlite_broker_settings(sqlite_settings, rabbitmq_vhost) -> Settings:
    """A fresh vhost and SQLite only: for broker tests where the database does not matter."""
    return sqlite_settings.replace(amqp_url=rabbitmq_vhost)
