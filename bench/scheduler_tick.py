"""Benchmark: one scheduler tick for 10,000 users with IMAP configurations, against the ceiling.

The ceiling is the irreducible part of a tick: publishing 10,000 bare persistent messages
through pika with publisher confirms (one BlockingConnection, confirm per message, the same
way the scheduler's Publisher works), measured in the same run on the same broker. The tick
does everything else as well: read the configurations, read the live locks, insert 10,000
PENDING tasks, publish 10,000 fetch jobs, stale cleanup, spool sweep, retention, gauges.
Goal: tick ≤ 2 × ceiling. Rounds alternate ceiling and tick; medians are reported. A second
tick right after (every mailbox in flight: 10,000 SKIPPED rows, nothing published) is shown too.

    .venv/bin/python bench/scheduler_tick.py [--users 10000] [--rounds 3] [--postgres]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pika  # noqa: E402
from peewee import chunked  # noqa: E402

from mailferry import broker  # noqa: E402
from mailferry.broker import Publisher  # noqa: E402
from mailferry.config import Settings  # noqa: E402
from mailferry.db import close_database, open_database  # noqa: E402
from mailferry.models import EmailTask, TaskLog, User, db  # noqa: E402
from mailferry.models import Settings as SettingsRow  # noqa: E402
from scheduler.tick import run_tick  # noqa: E402
from devstack.rabbitmq import RabbitMQServer  # noqa: E402

CEILING_QUEUE = "bench.ceiling"
IMAP = {"host": "imap.example.org", "port": 993, "username": "u", "password": "p",
        "security": "ssl", "folder": "INBOX"}


def add_users(count: int) -> None:
    with db.atomic():
        for chunk in chunked(range(count), 1000):
            User.insert_many([{"email": f"user{n}@example.org"} for n in chunk]).execute()
        ids = [u.id for u in User.select(User.id)]
        for chunk in chunked(ids, 1000):
            SettingsRow.insert_many([{"user": uid, "key": "email_config",
                                      "value": {"imap_config": IMAP, "filter_config": {}}}
                                     for uid in chunk]).execute()


def ceiling(amqp_url: str, count: int, body: bytes) -> float:
    """Seconds to connect and publish ``count`` confirmed persistent messages."""
    started = time.perf_counter()
    connection = pika.BlockingConnection(broker.connection_parameters(amqp_url))
    channel = connection.channel()
    channel.confirm_delivery()
    properties = pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent,
                                      content_type="application/json")
    for _ in range(count):
        channel.basic_publish("", CEILING_QUEUE, body, properties, mandatory=True)
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def purge(amqp_url: str) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    channel.queue_declare(CEILING_QUEUE, durable=True)
    channel.queue_purge(CEILING_QUEUE)
    channel.queue_purge(broker.IMAP_FETCH)
    connection.close()


def reset_tasks() -> None:
    TaskLog.delete().execute()
    EmailTask.delete().execute()


def tick(settings: Settings) -> tuple[float, object]:
    publisher = Publisher(settings)  # the scheduler's own: connects on first publish
    started = time.perf_counter()
    result = run_tick(settings, publisher)
    elapsed = time.perf_counter() - started
    publisher.close()
    if result.outcome != "ok":
        raise SystemExit(f"tick was {result.outcome}: {result.failed_steps}")
    return elapsed, result


def run(database_url: str, amqp_url: str, var: Path, users: int, rounds: int) -> dict:
    settings = Settings(var_dir=var, database_url=database_url, amqp_url=amqp_url,
                        scheduler_metrics_port=0, consumer_metrics_port=0)
    var.mkdir(parents=True, exist_ok=True)
    open_database(settings.resolved_database_url)
    broker.setup_topology(settings)
    add_users(users)
    body = b'{"task_id":"00000000-0000-0000-0000-000000000000","user_id":1,"folder":"INBOX","v":1}'
    ceilings, ticks, skipped_ticks = [], [], []
    try:
        for _ in range(rounds):
            purge(amqp_url)
            reset_tasks()
            ceilings.append(ceiling(amqp_url, users, body))
            seconds, result = tick(settings)
            assert result.fetch.scheduled == users, result.fetch
            ticks.append(seconds)
            seconds, result = tick(settings)
            assert result.fetch.skipped == users, result.fetch
            skipped_ticks.append(seconds)
    finally:
        purge(amqp_url)
        close_database()
    return {"ceiling": statistics.median(ceilings), "tick": statistics.median(ticks),
            "skipped_tick": statistics.median(skipped_ticks)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--postgres", action="store_true", help="also on a throwaway PostgreSQL")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="mf-bench-tick-") as tmp:
        tmp = Path(tmp)
        rabbit = RabbitMQServer(tmp / "rabbitmq").start()
        try:
            results["SQLite"] = run("", rabbit.amqp_url_for("/"), tmp / "sqlite",
                                    args.users, args.rounds)
            if args.postgres:
                from devstack.postgres import PostgresServer
                pg = PostgresServer(tmp / "postgres").start()
                try:
                    results["PostgreSQL"] = run(pg.create_database("bench"), rabbit.amqp_url,
                                                tmp / "pg", args.users, args.rounds)
                finally:
                    pg.close()
        finally:
            rabbit.stop()
    print(f"scheduler_tick: {args.users:,} users with IMAP configs, median of {args.rounds} "
          f"rounds, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    for backend, r in results.items():
        ratio = r["tick"] / r["ceiling"]
        print(f"  {backend}")
        print(f"    ceiling: publish {args.users:,} with confirms  {r['ceiling']:7.2f} s"
              f"  ({args.users / r['ceiling']:,.0f} msg/s)")
        print(f"    tick: {args.users:,} tasks + jobs             {r['tick']:7.2f} s"
              f"  {ratio:.2f} × ceiling (goal ≤ 2)  {'OK' if ratio <= 2 else 'MISSED'}")
        print(f"    next tick: all {args.users:,} SKIPPED        {r['skipped_tick']:7.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
