"""Benchmark and fault drill: two MX hosts on a RabbitMQ cluster, PostgreSQL and S3 storage,
with faults injected while mail arrives.

Everything is real and on loopback: a three-node RabbitMQ cluster (quorum queues),
PostgreSQL, SeaweedFS (S3), and two "hosts" (MAILFERRY_NODE a and b), each a Haraka with the
plugin, its own spool and its own consumer process. Eight senders send ``--count`` messages
over SMTP at ``--rate`` msg/s, half to each host, retrying a 4xx or a lost connection as an
MTA would. Meanwhile:

1. at 20 % of the mail, host a's consumer is SIGKILLed and started again 3 s later;
2. at 40 %, one RabbitMQ node is stopped, and started again 10 s later;
3. at 60 %, the whole of host b (Haraka and consumer) is SIGKILLed, and both are started
   again 5 s later.

Afterwards: every message that got a 250 is stored exactly once, every stored raw source
is in object storage and hashes to its sha256, nothing is dead-lettered. Figures: SMTP 250 →
stored p50 / p99 (goal p99 < 1 s at 50 msg/s), and how many sends needed a retry.

    .venv/bin/python bench/cluster_chaos.py [--count 2000] [--rate 50]

Exit status 1 when a message was lost or doubled.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import re
import signal
import smtplib
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import wait_consuming  # (and the repository on sys.path)
from devstack import mailgen
from devstack.consumers import consumer_process, dead_letters
from devstack.haraka import HarakaServer
from devstack.postgres import PostgresServer
from devstack.rabbitmq import RabbitMQCluster
from devstack.seaweedfs import SeaweedServer
from mailferry import broker
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.storage import BlobStore
from mailferry.users import add_user

GOAL_P99 = 1.0  # seconds, 250 → stored
WARMUP = 2.0  # seconds of the run left out of the steady figure (the first batches, connections)
QUEUED = re.compile(rb"queued as (\S+)")


class Host:
    """One MX host: its Haraka (with the plugin) and its consumer process."""

    def __init__(self, name: str, base: Settings, tmp: Path):
        self.name = name
        self.settings = base.replace(node=name, spool_dir=tmp / name / "spool")
        self.tmp = tmp / name
        self.haraka = HarakaServer(self.tmp / "haraka", base.amqp_url, self.settings.resolved_spool_dir,
                                   mailferry_ini={"amqp": {"routing_key": broker.inbound_key(self.settings)}})
        self.consumer = None

    def start_consumer(self) -> None:
        self.consumer = consumer_process(self.settings, self.tmp / "consumer.log")

    def kill_consumer(self) -> None:
        self.consumer.send_signal(signal.SIGKILL)
        self.consumer.wait(10)

    def start(self) -> None:
        self.haraka.start()
        self.haraka.wait_connected()
        self.start_consumer()

    def kill(self) -> None:
        """The whole host at once: its Haraka and its consumer, SIGKILLed."""
        self.haraka.process.send_signal(signal.SIGKILL)
        self.haraka.process.wait(10)
        self.kill_consumer()

    def stop(self) -> None:
        if self.consumer is not None and self.consumer.poll() is None:
            self.consumer.terminate()
            self.consumer.wait(30)
        self.haraka.stop()


class Senders:
    def __init__(self, hosts: list[Host], count: int, rate: float):
        self.hosts, self.count, self.rate = hosts, count, rate
        self.accepted: dict[str, tuple[str, float]] = {}  # Message-ID -> (queue id, time of 250)
        self.retries = 0
        self.sent = 0  # messages handed out to a sender
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def run(self, workers: int = 8) -> None:
        threads = [threading.Thread(target=self._worker, args=(w,)) for w in range(workers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def _next(self) -> int | None:
        with self.lock:
            if self.sent >= self.count:
                return None
            n = self.sent
            self.sent += 1
        delay = self.started + n / self.rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return n

    def _worker(self, worker: int) -> None:
        while (n := self._next()) is not None:
            host = self.hosts[n % len(self.hosts)]
            raw = mailgen.plain(n, to="bob@example.org").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            message_id = f"<test-{n}@example.net>"
            deadline = time.monotonic() + 180
            while True:
                try:
                    with smtplib.SMTP(host.haraka.host, host.haraka.port, timeout=30) as smtp:
                        smtp.ehlo("client.example.net")
                        smtp.mail("sender@example.net")
                        smtp.rcpt("bob@example.org")
                        code, reply = smtp.data(raw)
                except (OSError, smtplib.SMTPException):
                    code, reply = 0, b""
                if code == 250:
                    found = QUEUED.search(reply)
                    with self.lock:
                        self.accepted[message_id] = (found.group(1).decode() if found else "", time.time())
                    break
                with self.lock:
                    self.retries += 1
                if time.monotonic() > deadline:
                    print(f"  gave up on {message_id}: {code} {reply[:80]!r}", flush=True)
                    break
                time.sleep(1.0)


def chaos(senders: Senders, hosts: list[Host], cluster: RabbitMQCluster, log: list[str]) -> list[threading.Thread]:
    """Start the three faults, each in its own thread at its share of the mail."""
    a, b = hosts

    def at(share: float, what: str, fault, then, pause: float) -> None:
        while senders.sent < senders.count * share:
            time.sleep(0.05)
        log.append(f"{senders.sent}: {what}")
        fault()
        time.sleep(pause)
        then()
        log.append(f"{senders.sent}: {what}: back")

    faults = [
        (0.2, "SIGKILL host a's consumer", a.kill_consumer, a.start_consumer, 3),
        (0.4, "stop RabbitMQ node 1", cluster.nodes[1].stop, cluster.nodes[1].start, 10),
        (0.6, "SIGKILL host b (Haraka and consumer)", b.kill, b.start, 5),
    ]
    threads = [threading.Thread(target=at, args=fault) for fault in faults]
    for thread in threads:
        thread.start()
    return threads


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--no-faults", action="store_true",
                        help="the same cluster and load without the faults: the steady 250 → stored")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mf-chaos-") as tmp:
        tmp = Path(tmp)
        cluster = RabbitMQCluster(tmp / "rabbitmq").start()
        postgres = PostgresServer(tmp / "postgres").start()
        weed = SeaweedServer(tmp / "seaweedfs").start()
        hosts: list[Host] = []
        try:
            base = Settings(var_dir=tmp / "var", amqp_url=cluster.amqp_url, queue_type="quorum",
                            database_url=postgres.create_database("chaos"), consumer_metrics_port=0,
                            **weed.settings("store"))
            open_database(base.resolved_database_url)
            add_user("bob@example.org")
            hosts = [Host(name, base, tmp) for name in ("a", "b")]
            for host in hosts:
                broker.setup_topology(host.settings)
                host.start()
            wait_consuming([host.tmp / "consumer.log" for host in hosts])  # then the clock starts
            senders = Senders(hosts, args.count, args.rate)
            events: list[str] = []
            drills = [] if args.no_faults else chaos(senders, hosts, cluster, events)
            senders.run()
            for drill in drills:
                drill.join()
            accepted = senders.accepted
            queue_ids = [q for q, _ in accepted.values()]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and InboundReceipt.select().where(
                    InboundReceipt.queue_id.in_(queue_ids)).count() < len(queue_ids):
                time.sleep(0.5)
            return report(args, base, senders, events)
        finally:
            for host in hosts:
                host.stop()
            close_database()
            weed.stop()
            postgres.close()
            cluster.stop()


def report(args, base: Settings, senders: Senders, events: list[str]) -> int:
    accepted = senders.accepted
    rows = {m.message_id: m for m in EmailMessage.select()}
    counts: dict[str, int] = {}
    for m in EmailMessage.select(EmailMessage.message_id):
        counts[m.message_id] = counts.get(m.message_id, 0) + 1
    lost = sorted(set(accepted) - set(rows))
    doubled = sorted(mid for mid, n in counts.items() if n > 1)
    store = BlobStore.of(base)
    unsound = [m.message_id for m in rows.values()
               if hashlib.sha256(store.read_raw(m.raw_path)).hexdigest() != m.sha256]
    receipts = {r.queue_id: r.created_at.replace(tzinfo=dt.timezone.utc).timestamp()
                for r in InboundReceipt.select()}
    timed = sorted((at, receipts[q] - at) for q, at in accepted.values() if q in receipts)
    latencies = [latency for _, latency in timed]
    slow = [(at - timed[0][0], latency) for at, latency in timed if latency >= GOAL_P99]
    dead = dead_letters(base.amqp_urls[1])
    print(f"cluster_chaos: {args.count} messages at {args.rate:.0f} msg/s to 2 MX hosts, "
          "3 RabbitMQ nodes (quorum), PostgreSQL, SeaweedFS"
          + (", no faults" if args.no_faults else ", with the faults"))
    for event in events:
        print(f"  after message {event}")
    steady = [latency for at, latency in timed if at - timed[0][0] >= WARMUP] if timed else []
    p50, p99 = percentile(steady, 50), percentile(steady, 99)
    print(f"  accepted (250) {len(accepted)} of {args.count}; sends retried after a 4xx or a lost "
          f"connection {senders.retries}")
    print(f"  stored {len(rows)}; lost {len(lost)}; stored twice {len(doubled)}; raw sources not "
          f"matching their sha256 {len(unsound)}; dead-lettered {len(dead)}")
    goal = f"goal p99 < {GOAL_P99 * 1000:.0f} ms: {'met' if p99 < GOAL_P99 else 'MISSED'}" \
        if args.no_faults else "the faults' pauses included"
    print(f"  250 → stored after the first {WARMUP:.0f} s: p50 {p50 * 1000:.0f} ms, p90 "
          f"{percentile(steady, 90) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max "
          f"{max(steady, default=0) * 1000:.0f} ms ({goal})")
    print(f"  250 → stored, the whole run: p99 {percentile(latencies, 99) * 1000:.0f} ms, max "
          f"{max(latencies, default=0) * 1000:.0f} ms")
    if slow:
        print(f"  {len(slow)} over {GOAL_P99 * 1000:.0f} ms, accepted between {slow[0][0]:.1f} s "
              f"and {slow[-1][0]:.1f} s into the run")
    for mid in (lost + doubled + unsound)[:10]:
        print(f"    {mid}")
    return 1 if lost or doubled or unsound or dead or len(accepted) < args.count else 0


if __name__ == "__main__":
    sys.exit(main())
