"""The fault drill of a cluster installation, run by ``tests/test_cluster_drill.py`` (its
verdict) and ``bench/cluster_chaos.py`` (its figures).

Everything is real and on loopback: a three-node RabbitMQ cluster (quorum queues),
PostgreSQL, SeaweedFS (S3, holding raw sources, attachments and bodies), and two hosts
(MAILFERRY_NODE a and b), each a Haraka with the plugin, its own spool, and its own
consumer, relay, webhook worker (all posting to one receiver), scheduler (one holds the
lease; each sweeps its own spool) and API process. Eight senders send ``count`` messages over
SMTP at ``rate`` msg/s, half to each host, retrying a 4xx or a lost connection as an MTA
would. Meanwhile, by share of the mail sent:

1. at 20 %, host a's consumer is SIGKILLed and started again 3 s later;
2. at 40 %, one RabbitMQ node is stopped, and started again 10 s later;
3. at 60 %, the whole of host b (Haraka and every process) is SIGKILLed, and
   it is all started again 5 s later.

``Drill.problems()`` lists what broke a promise: a message that got a 250 and is not stored,
one stored twice, a raw source or body that does not hash to its name, a dead letter, a stored
message never posted as ``message.stored`` or posted under more than one event id, a raw
source (of a sample) that either host's API does not serve as stored.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import signal
import smtplib
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from devstack import mailgen
from devstack.consumers import consumer_process, dead_letters, wait_consuming, wait_for
from devstack.haraka import HarakaServer
from devstack.ports import free_port, port_open
from devstack.postgres import PostgresServer
from devstack.rabbitmq import RabbitMQCluster
from devstack.seaweedfs import SeaweedServer
from devstack.webhook_receiver import Receiver
from mailferry import api_tokens, broker, webhooks
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.models import EmailMessage, InboundReceipt
from mailferry.storage import BlobStore, DamagedObject
from mailferry.users import add_user

QUEUED = re.compile(rb"queued as (\S+)")
OTHERS = ("relay", "consumer.webhook_worker", "scheduler", "api")  # each host's, besides the consumer
API_SAMPLE = 100  # stored messages whose raw source is read back through each host's API
SETTLE = 240  # seconds allowed, after the last 250, for every message to be stored and posted


class Host:
    """One MX host: Haraka (with the plugin), its consumer, its relay and its webhook worker."""

    def __init__(self, name: str, base: Settings, tmp: Path):
        self.name = name
        self.settings = base.replace(node=name, spool_dir=tmp / name / "spool", api_port=free_port())
        self.tmp = tmp / name
        self.haraka = HarakaServer(self.tmp / "haraka", base.amqp_url, self.settings.resolved_spool_dir,
                                   mailferry_ini={"amqp": {"routing_key": broker.inbound_key(self.settings)}})
        self.consumer = None
        self.others: list = []  # the relay, the webhook worker, the scheduler, the API

    def start_consumer(self) -> None:
        self.consumer = consumer_process(self.settings, self.tmp / "consumer.log")

    def kill_consumer(self) -> None:
        self.consumer.send_signal(signal.SIGKILL)
        self.consumer.wait(10)

    def start(self) -> None:
        self.haraka.start()
        self.haraka.wait_connected()
        self.start_consumer()
        self.others = [consumer_process(self.settings, self.tmp / f"{module}.log", module=module)
                       for module in OTHERS]

    def kill(self) -> None:
        """The whole host at once."""
        self.haraka.process.send_signal(signal.SIGKILL)
        self.haraka.process.wait(10)
        self.kill_consumer()
        for process in self.others:
            process.send_signal(signal.SIGKILL)
            process.wait(10)

    def stop(self) -> None:
        for process in [self.consumer, *self.others]:
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)
        self.haraka.stop()


class Senders:
    """``count`` messages at ``rate`` msg/s over eight SMTP clients, alternating hosts."""

    def __init__(self, hosts: list[Host], count: int, rate: float):
        self.hosts, self.count, self.rate = hosts, count, rate
        self.accepted: dict[str, tuple[str, float]] = {}  # Message-ID -> (queue id, time of 250)
        self.retries = 0
        self.gave_up: list[str] = []
        self.sent = 0  # messages handed out to a sender
        self.lock = threading.Lock()
        self.started = time.monotonic()

    def run(self, workers: int = 8) -> None:
        threads = [threading.Thread(target=self._worker) for _ in range(workers)]
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

    def _worker(self) -> None:
        while (n := self._next()) is not None:
            self._send(n, self.hosts[n % len(self.hosts)])

    def _send(self, n: int, host: Host) -> None:
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
                return
            with self.lock:
                self.retries += 1
            if time.monotonic() > deadline:
                with self.lock:
                    self.gave_up.append(f"{message_id}: {code} {reply[:80]!r}")
                return
            time.sleep(1.0)


@dataclass
class Drill:
    count: int
    rate: float
    faults: bool
    events: list[str] = field(default_factory=list)  # "after message n: what"
    accepted: dict[str, tuple[str, float]] = field(default_factory=dict)
    retries: int = 0
    gave_up: list[str] = field(default_factory=list)
    stored: int = 0
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    unsound: list[str] = field(default_factory=list)  # raw source or body not hashing to its name
    bodiless: list[str] = field(default_factory=list)  # posted without the text it was sent with
    dead: list = field(default_factory=list)
    posts: int = 0
    unposted: list[str] = field(default_factory=list)
    several_ids: list[str] = field(default_factory=list)
    api_wrong: list[str] = field(default_factory=list)  # "host: message": not served as stored
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, 250 → stored)

    def problems(self) -> list[str]:
        out = [f"{name}: {len(found)}, e.g. {found[:5]}" for name, found in (
            ("lost (250, not stored)", self.lost), ("stored twice", self.doubled),
            ("stored bytes not matching their sha256", self.unsound),
            ("posted without their text", self.bodiless), ("dead-lettered", self.dead),
            ("stored, never posted", self.unposted), ("posted under several ids", self.several_ids),
            ("raw sources an API did not serve as stored", self.api_wrong),
            ("never accepted", self.gave_up)) if found]
        if len(self.accepted) < self.count:
            out.append(f"accepted {len(self.accepted)} of {self.count}")
        return out


def run(tmp: Path, count: int, rate: float, *, faults: bool = True) -> Drill:
    """Start everything under ``tmp``, send, inject the faults, wait, and judge."""
    drill = Drill(count, rate, faults)
    cluster = RabbitMQCluster(tmp / "rabbitmq").start()
    postgres = PostgresServer(tmp / "postgres").start()
    weed = SeaweedServer(tmp / "seaweedfs").start()
    hosts: list[Host] = []
    receiver = Receiver([200]).__enter__()
    try:
        base = Settings(var_dir=tmp / "var", amqp_url=cluster.amqp_url, queue_type="quorum",
                        database_url=postgres.create_database("drill"), body_storage="storage",
                        consumer_metrics_port=0, relay_metrics_port=0, webhook_metrics_port=0,
                        scheduler_metrics_port=0, **weed.settings("store"))
        open_database(base.resolved_database_url)
        add_user("bob@example.org")
        webhooks.add_endpoint(base, receiver.url)
        hosts = [Host(name, base, tmp) for name in ("a", "b")]
        for host in hosts:
            broker.setup_topology(host.settings)
            host.start()
        wait_consuming([host.tmp / "consumer.log" for host in hosts])  # then the clock starts
        senders = Senders(hosts, count, rate)
        drills = _inject(senders, hosts, cluster, drill.events) if faults else []
        senders.run()
        for thread in drills:
            thread.join()
        drill.accepted, drill.retries, drill.gave_up = senders.accepted, senders.retries, senders.gave_up
        _settle(receiver, [q for q, _ in senders.accepted.values()])
        _judge(drill, base, receiver, senders.started)
        drill.api_wrong = _served_wrong(hosts)
        return drill
    finally:
        receiver.__exit__(None, None, None)
        for host in hosts:
            host.stop()
        close_database()
        weed.stop()
        postgres.close()
        cluster.stop()


def _inject(senders: Senders, hosts: list[Host], cluster: RabbitMQCluster,
            log: list[str]) -> list[threading.Thread]:
    """Start the three faults, each in its own thread at its share of the mail."""
    a, b = hosts

    def at(share: float, what: str, fault, then, pause: float) -> None:
        while senders.sent < senders.count * share:
            time.sleep(0.05)
        log.append(f"after message {senders.sent}: {what}")
        fault()
        time.sleep(pause)
        then()
        log.append(f"after message {senders.sent}: {what}: back")

    faults = [
        (0.2, "SIGKILL host a's consumer", a.kill_consumer, a.start_consumer, 3),
        (0.4, "stop RabbitMQ node 1", cluster.nodes[1].stop, cluster.nodes[1].start, 10),
        (0.6, "SIGKILL the whole of host b", b.kill, b.start, 5),
    ]
    threads = [threading.Thread(target=at, args=fault) for fault in faults]
    for thread in threads:
        thread.start()
    return threads


def _settle(receiver: Receiver, queue_ids: list[str]) -> None:
    """Until every accepted message is stored and posted, or SETTLE seconds."""
    deadline = time.monotonic() + SETTLE
    while time.monotonic() < deadline and InboundReceipt.select().where(
            InboundReceipt.queue_id.in_(queue_ids)).count() < len(queue_ids):
        time.sleep(0.5)
    while time.monotonic() < deadline and len(_stored_posts(receiver)) < len(queue_ids):
        time.sleep(0.5)


def _stored_posts(receiver: Receiver) -> dict[int, list[dict]]:
    """{stored message row id: the message.stored events posted for it}."""
    out: dict[int, list[dict]] = {}
    for delivery in receiver.got():
        event = delivery.event
        if event["type"] == "message.stored":
            out.setdefault(event["data"]["id"], []).append(event)
    return out


def _judge(drill: Drill, base: Settings, receiver: Receiver, started: float) -> None:
    rows = list(EmailMessage.select())
    by_id: dict[str, int] = {}
    for m in rows:
        by_id[m.message_id] = by_id.get(m.message_id, 0) + 1
    drill.stored = len(rows)
    drill.lost = sorted(set(drill.accepted) - set(by_id))
    drill.doubled = sorted(mid for mid, n in by_id.items() if n > 1)
    store = BlobStore.of(base)
    drill.unsound = [m.message_id for m in rows if not _sound(store, m)]
    drill.dead = dead_letters(base.amqp_urls[1])
    posts = _stored_posts(receiver)
    drill.posts = len(receiver.got())
    drill.unposted = [m.message_id for m in rows if m.id not in posts]
    drill.several_ids = [m.message_id for m in rows if len({e["id"] for e in posts.get(m.id, [])}) > 1]
    drill.bodiless = [m.message_id for m in rows if m.id in posts
                      and f"message number {_number(m.message_id)}." not in posts[m.id][0]["data"]["text"]]
    receipts = {r.queue_id: r.created_at.replace(tzinfo=dt.timezone.utc).timestamp()
                for r in InboundReceipt.select()}
    wall_start = time.time() - (time.monotonic() - started)
    drill.latencies = sorted((at - wall_start, receipts[q] - at)
                             for q, at in drill.accepted.values() if q in receipts)


def _served_wrong(hosts: list[Host]) -> list[str]:
    """Read API_SAMPLE raw sources back through each host's API process (both read the one
    object store): each must be the bytes its row's sha256 names."""
    _, token = api_tokens.create("drill")
    sample = list(EmailMessage.select().order_by(EmailMessage.id).limit(API_SAMPLE))
    wrong = []
    for host in hosts:
        port = host.settings.api_port
        try:
            wait_for(lambda: port_open(port), timeout=30, message=f"host {host.name}'s API listening")
        except AssertionError as exc:
            wrong.append(f"{host.name}: {exc}")
            continue
        for message in sample:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/messages/{message.id}/raw",
                                             headers={"Authorization": f"Bearer {token}"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    body = response.read()
            except OSError as exc:
                wrong.append(f"{host.name}: {message.message_id}: {exc}")
                continue
            if hashlib.sha256(body).hexdigest() != message.sha256:
                wrong.append(f"{host.name}: {message.message_id}: other bytes")
    return wrong


def _sound(store: BlobStore, message: EmailMessage) -> bool:
    """The raw source hashes to the row's sha256, and each body object to its key."""
    try:
        for key in message.storage_keys:
            store.read_sound(key)
    except DamagedObject:
        return False
    return (BlobStore.sha256_of_key(message.raw_path) == message.sha256
            and bool(message.text_path) and not message.text_content)  # the body is in storage


def _number(message_id: str) -> str:
    return message_id.split("-", 1)[1].split("@", 1)[0]
