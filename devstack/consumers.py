"""Running consumers and looking at queues, for the tests and the benchmarks: a consumer
process with a given configuration, waiting for a condition, the dead letters, a queue's
depth."""

from __future__ import annotations

import dataclasses
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
    """The environment that gives a child process ``settings``: every setting that is not
    its default (a hand-kept list of names drifted: a new setting reached no child)."""
    env = dict(os.environ)
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if value != f.default and str(value) not in ("", "."):
            env[env_name(f.name)] = str(value)
    env["PYTHONPATH"] = str(ROOT)
    return env


def wait_consuming(logs: list[Path]) -> None:
    """Until every consumer's log says it is consuming (its parser process is up by then)."""
    wait_for(lambda: all(log.exists() and "consuming" in log.read_text() for log in logs),
             timeout=60, interval=0.005)


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
