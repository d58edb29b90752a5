"""Benchmark: IMAP IDLE — APPEND → stored latency, and how many mailboxes one consumer holds.

One run: a throwaway RabbitMQ and Dovecot (room for the connections), ``--mailboxes`` users
each with an IDLE mailbox, and one real consumer process (``python -m consumer``) on SQLite.

1. **Holding.** The consumer connects to every mailbox (at its connect rate) and syncs each
   once (their checkpoints are new). Reported: the time until every mailbox is held, the
   consumer's RSS and open file descriptors while it holds them all, and its CPU while they
   sit idle (the figure that does not depend on the machine's speed: CPU seconds per
   mailbox-hour).
2. **Latency.** ``--samples`` times, a random mailbox gets one APPEND (by a separate IMAP
   client) and the time until its message is in the database is taken. Reported: p50, p99,
   and beside them the server's own share: a second client IDLEs on the same mailbox and
   takes APPEND → EXISTS (Dovecot waits about half a second before it notifies).

Goals (issue #17): p99 < 2 s; 1,000 mailboxes with RSS < 300 MB.

    .venv/bin/python bench/imap_idle.py [--mailboxes 1000] [--samples 100] [--idle-seconds 30]

Root is needed (the test Dovecot). Dovecot watches a maildir with inotify, one instance per
IDLE connection; the kernel's default of 128 instances per user would make the rest poll
every 30 s, so the run raises ``fs.inotify.max_user_instances`` for its length and puts it back.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

from common import machine, percentile
from consumer_cpu import cpu_seconds

from imapclient import IMAPClient

from devstack.consumers import consumer_process, wait_for
from devstack.dovecot import DovecotServer
from devstack.rabbitmq import RabbitMQServer
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.mailbox_config import EmailConfigManager
from mailferry.models import EmailMessage, MailboxState, User, utcnow

PASSWORD = "bench-password"
INOTIFY = Path("/proc/sys/fs/inotify/max_user_instances")


def message(n: int) -> bytes:
    return (f"From: sender{n}@example.net\r\nTo: box@example.org\r\nSubject: idle {n}\r\n"
            f"Message-ID: <idle-bench-{n}@example.net>\r\nDate: Wed, 02 Dec 2026 10:00:00 +0000\r\n"
            f"\r\nHello {n}.\r\n").encode()


def status_of(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        out[name] = value.strip()
    return out


def logged_in(dovecot: DovecotServer, name: str) -> IMAPClient:
    client = IMAPClient(dovecot.host, dovecot.port, ssl=False, timeout=30)
    client.login(name, PASSWORD)
    return client


def idling(dovecot: DovecotServer, name: str) -> IMAPClient:
    client = logged_in(dovecot, name)
    client.select_folder("INBOX", readonly=True)
    client.idle()
    return client


def exists_after(client: IMAPClient, since: float) -> float:
    """Seconds from ``since`` until ``client`` (in IDLE) heard EXISTS; it is logged out."""
    try:
        while time.monotonic() - since < 30:
            if any(len(r) >= 2 and r[1] == b"EXISTS" for r in client.idle_check(timeout=1)):
                return time.monotonic() - since
        return float("nan")
    finally:
        client.idle_done()
        client.logout()


def held() -> int:
    return MailboxState.select().where(MailboxState.idle_until > utcnow()).count()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mailboxes", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"# {machine()}")
    inotify_before = int(INOTIFY.read_text())
    with tempfile.TemporaryDirectory(prefix="mf-bench-idle-") as tmp:
        base = Path(tmp)
        rabbit = RabbitMQServer(base / "rabbitmq").start()
        users = {f"box{n:04d}": PASSWORD for n in range(args.mailboxes)}
        dovecot = DovecotServer(base / "dovecot", users, ssl=False, max_clients=args.mailboxes + 50)
        consumer = None
        try:
            INOTIFY.write_text(str(max(inotify_before, args.mailboxes + 200)))
            dovecot.start()
            settings = Settings(var_dir=base / "var", amqp_url=rabbit.amqp_url,
                                consumer_metrics_port=0, imap_idle="all")
            settings.var_dir.mkdir()
            open_database(settings.resolved_database_url)
            configs = EmailConfigManager(settings)
            for name in users:
                user = User.create(email=f"{name}@example.org")
                configs.set_imap_config(user, {"host": dovecot.host, "port": dovecot.port,
                                               "username": name, "password": PASSWORD,
                                               "security": "none"})
            close_database()

            consumer = consumer_process(settings, base / "consumer.log")
            open_database(settings.resolved_database_url)
            started = time.monotonic()
            wait_for(lambda: held() >= args.mailboxes, timeout=600, interval=0.5,
                     message=f"{args.mailboxes} mailboxes held in IDLE")
            holding = time.monotonic() - started
            # Each mailbox's first sync (a new checkpoint) done: a checkpoint with a fetch.
            wait_for(lambda: MailboxState.select().where(MailboxState.last_fetch_at.is_null(False))
                     .count() >= args.mailboxes, timeout=600, interval=0.5, message="first syncs")
            settled = time.monotonic() - started
            time.sleep(2)
            cpu_before, wall_before = cpu_seconds(consumer.pid), time.monotonic()
            time.sleep(args.idle_seconds)
            idle_cpu = cpu_seconds(consumer.pid) - cpu_before
            idle_wall = time.monotonic() - wall_before
            status = status_of(consumer.pid)
            rss_mb = int(status["VmRSS"].split()[0]) / 1024
            fds = len(list(Path(f"/proc/{consumer.pid}/fd").iterdir()))
            threads = int(status["Threads"])

            latencies, notified = [], []
            rng = random.Random(7)
            names = list(users)
            for n in range(args.samples):
                name = rng.choice(names)
                client = logged_in(dovecot, name)
                watcher = idling(dovecot, name)  # the server's own share: APPEND → EXISTS
                raw = message(n)
                appended = time.monotonic()
                client.append("INBOX", raw)
                client.logout()
                notified.append(exists_after(watcher, appended))
                message_id = f"<idle-bench-{n}@example.net>"
                wait_for(lambda: EmailMessage.select().where(
                    EmailMessage.message_id == message_id).exists(), timeout=60, interval=0.005,
                    message=f"message {n} stored")
                latencies.append(time.monotonic() - appended)
                time.sleep(rng.uniform(0.05, 0.3))
            close_database()
        except BaseException:
            print((base / "consumer.log").read_text()[-6000:])
            raise
        finally:
            if consumer is not None:
                consumer.terminate()
                consumer.wait(timeout=60)
            dovecot.close()
            rabbit.stop()
            INOTIFY.write_text(str(inotify_before))

    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    per_hour = idle_cpu / idle_wall * 3600 / args.mailboxes
    rows = [
        ("mailboxes held in IDLE", f"{args.mailboxes}", f"all held after {holding:.1f} s, "
         f"first syncs done after {settled:.1f} s"),
        ("consumer RSS holding them", f"{rss_mb:.0f} MB", "goal < 300 MB"),
        ("consumer open files", f"{fds}", f"{threads} threads"),
        ("consumer CPU while they idle", f"{100 * idle_cpu / idle_wall:.2f} % of a core",
         f"{per_hour:.3f} CPU s per mailbox-hour"),
        ("APPEND → stored p50", f"{1000 * p50:.0f} ms", f"{args.samples} samples, mean "
         f"{1000 * statistics.mean(latencies):.0f} ms"),
        ("APPEND → stored p99", f"{1000 * p99:.0f} ms", "goal < 2,000 ms"),
        ("of which Dovecot's APPEND → EXISTS", f"{1000 * percentile(notified, 50):.0f} ms p50",
         f"p99 {1000 * percentile(notified, 99):.0f} ms (its notify delay), seen by a second "
         "IDLE client"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>16}  {note}")
    ok = p99 < 2.0 and rss_mb < 300
    print("goals met" if ok else "goal missed")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
