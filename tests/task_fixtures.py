"""Helpers and fixtures for the task, scheduler and timeout tests."""

from __future__ import annotations

import json

import pika
import pytest

from consumer.expiry import build_handlers as expiry_handlers
from mailferry.models import Settings as SettingsRow
from mailferry.models import User
from tests.pipeline import consumer_thread

VALID_IMAP = {"host": "imap.example.org", "port": 993, "username": "u", "password": "p",
              "security": "ssl", "folder": "INBOX"}


def add_imap_user(email: str, *, imap: dict | None = None, active: bool = True,
                  config_active: bool = True) -> User:
    user = User.create(email=email, is_active=active)
    SettingsRow.create(user=user, key="email_config", is_active=config_active,
                       value={"imap_config": dict(VALID_IMAP if imap is None else imap),
                              "filter_config": {}})
    return user


def drain(amqp_url: str, queue: str) -> list[tuple[pika.BasicProperties, dict]]:
    """Take every message off ``queue``: (properties, JSON body)."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, json.loads(body)))
    finally:
        connection.close()


def expiry_consumer(settings):
    """The consumer with only the expiry and watchdog handlers (no IMAP worker: jobs idle)."""
    return consumer_thread(settings, handlers=expiry_handlers(settings))


@pytest.fixture
def short_settings(broker_settings):
    """Broker settings with 1-second TTLs; the vhost is fresh, so its queues get these TTLs."""
    return broker_settings.replace(task_timeout=1, fetch_job_ttl=1, lease_seconds=2,
                                   schedule_interval=1, spool_sweep_age=10)
