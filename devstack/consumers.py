"""Running consumers and looking at queues, for the tests and the benchmarks: a consumer
process with a given configuration, waiting for a condition, the dead letters, a queue's
depth."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pika

from mailferry import broker
from mailferry.config import Settings, env_name

ROOT = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def settings_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("var_dir", "amqp_url", "database_url", "spool_dir", "storage_dir", "prefetch",
                 "queue_type", "consumer_metrics_port", "task_timeout", "fetch_job_ttl", "parse_process",
                 "relay_metrics_port", "webhook_schedule", "webhook_metrics_port", "imap_idle",
                 "imap_idle_connect_rate", "imap_idle_connects", "imap_idle_renew",
                 "storage_url", "s3_endpoint", "s3_access_key_id", "s3_secret_access_key",
                 "imap_idle_lease", "imap_idle_max", "node"):
        value = getattr(settings, name)
        if str(value) not in ("", "."):
            env[env_name(name)] = str(value)
    env["PYTHONPATH"] = str(ROOT)
    return env


def consumer_process(settings: Settings, log_path: Path, module: str = "consumer") -> subprocess.Popen:
    """``python -m consumer`` (or another process package: ``relay``) on ``settings``."""
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, "-m", module], env=settings_env(settings),
                            stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def dead_letters(amqp_url: str) -> list[tuple[dict, bytes]]:
    """Drain mailferry.dead: (headers, body) of each message."""
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(broker.DEAD, auto_ack=True)
            if method is None:
                return found
            found.append((dict(properties.headers or {}), body))
    finally:
        connection.close()


def queue_depth(amqp_url: str, queue: str) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()
