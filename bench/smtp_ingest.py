"""Benchmark: SMTP ingest through Haraka with the mailferry plugin, against Postfix's durable
accept (the yardstick) and Haraka's queue/discard (a reference).

One run, on a throwaway RabbitMQ, SQLite in a temp folder, and one consumer process:

1. Throughput: Postfix's ``smtp-source`` sends ``--messages`` over ``--sessions`` concurrent SMTP
   sessions to a throwaway Postfix (devstack/postfix.py: its cleanup fsyncs each queue file
   before the 250, then the mail is discarded), to Haraka with ``queue/discard`` (Haraka
   without any queue work) and to the same Haraka with ``mailferry`` (spool + fsync +
   confirmed publish), in turn, ``--rounds`` times each; medians count. Two workloads: one message per connection with
   smtp-source's default small message (an inbound MX: every sender connects anew), and
   persistent sessions (``-d``) with a 4 KiB body (a relay pushing mail over open
   connections: Haraka's own cost per message is lowest, so the plugin's share is largest).
   The consumer is stopped during these rounds (the queue is purged after each), so both
   servers have the machine to themselves; one extra round with the consumer draining at the
   same time shows a single box running everything.
2. Steady load: Python smtplib sends ``--rate`` messages/s (open loop, 8 connections) for
   ``--seconds``, a tenth with a 100 KB attachment, with the consumer running: end-of-DATA→250
   (final ``.`` sent → 250 read) and 250→stored (250 read → the InboundReceipt row written in
   the consumer's committing transaction; one clock, one machine). End-of-DATA→250 is measured
   against queue/discard at the same rate too.

Goals (issue 24): plugin / discard ≥ 0.9 with one message per connection and ≥ 0.6 with
persistent sessions; plugin / Postfix ≥ 1.5 with persistent sessions (with one message per
connection Haraka's own discard / Postfix is the ceiling, printed beside it); end-of-DATA→250
p99 ≤ 10 ms and 250→stored p99 under 500 ms at the steady rate. Ratios are taken within each
round, then the median; CPU per accepted message (Haraka with the plugin and its threads,
RabbitMQ, the whole machine) is printed because it holds on any machine.

    .venv/bin/python bench/smtp_ingest.py [--messages 2000] [--sessions 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailferry import broker  # noqa: E402
from mailferry.users import add_user  # noqa: E402
from mailferry.config import Settings  # noqa: E402
from mailferry.db import close_database, open_database  # noqa: E402
from mailferry.models import InboundReceipt  # noqa: E402
from devstack import mailgen  # noqa: E402
from devstack.haraka import HarakaServer  # noqa: E402
from devstack.postfix import PostfixServer  # noqa: E402
from devstack.rabbitmq import RabbitMQServer  # noqa: E402
from devstack.consumers import consumer_process, queue_depth, wait_for  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
RCPT = "bob@example.org"
QUEUED_AS = re.compile(rb"queued as (\S+)")
STEADY_CONNECTIONS = 8
GOAL_EOD_P99_MS = 10.0  # end-of-DATA → 250 at the steady rate
GOAL_STORED_P99_MS = 500.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))]


# -- throughput (smtp-source) ----------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    options: tuple[str, ...]


WORKLOADS = (
    Workload("one message per connection, default message", ()),
    Workload("persistent sessions (-d), 4 KiB body", ("-d", "-l", "4096")),
)

# Lower bounds on the plugin's rate against each server, per workload (None: reported only;
# with one message per connection Haraka's own rate against Postfix is the plugin's ceiling).
GOALS = {
    WORKLOADS[0].name: {"postfix": None, "discard": 0.9},
    WORKLOADS[1].name: {"postfix": 1.5, "discard": 0.6},
}


def smtp_source(server: HarakaServer, workload: Workload, messages: int, sessions: int) -> float:
    """Send with smtp-source; return messages per second. Any non-2xx reply aborts it (no -A)."""
    command = [SMTP_SOURCE, *workload.options, "-s", str(sessions), "-m", str(messages),
               "-f", "sender@example.net", "-t", RCPT, "-M", "bench.example.net",
               f"{server.host}:{server.port}"]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or proc.stderr.strip():
        raise RuntimeError(f"smtp-source failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return messages / elapsed


def process_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system, every thread) used so far by these processes."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (stat fields 14 and 15)
    return total / CLOCK_TICKS


def machine_cpu() -> float:
    """CPU seconds the whole machine was busy (not idle, not waiting on I/O) so far."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


@dataclass
class Round:
    rate: float  # messages per second
    server_cpu: float  # ms of CPU per message: the SMTP server's processes (Haraka: and threads)
    broker_cpu: float  # ms per message: RabbitMQ
    machine_cpu: float  # ms per message: the whole machine, smtp-source included


def group_members(server) -> list[int]:
    """Haraka's processes (its own session: the group id is its pid); none for Postfix, whose
    smtpd processes come and go (its CPU shows in the machine's figure)."""
    if not isinstance(server, HarakaServer) or server.process is None:
        return []
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == server.process.pid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


def measured_round(server, workload: Workload, messages: int, sessions: int,
                   broker_pid: int | None) -> Round:
    pids, broker_pids = group_members(server), [broker_pid] if broker_pid else []
    before = (process_cpu(pids), process_cpu(broker_pids), machine_cpu())
    rate = smtp_source(server, workload, messages, sessions)
    after = (process_cpu(pids), process_cpu(broker_pids), machine_cpu())
    per_message = [(b - a) * 1000 / messages for a, b in zip(before, after)]
    return Round(rate, *per_message)


def clear_backlog(settings: Settings) -> None:
    """Throughput rounds with the consumer stopped leave messages and spool files: drop them."""
    connection = broker.connect(settings.amqp_url)
    try:
        connection.channel().queue_purge(broker.INBOUND)
    finally:
        connection.close()
    for path in (settings.resolved_spool_dir / "incoming").glob("*.eml"):
        path.unlink()


# -- steady load (smtplib) -------------------------------------------------------------------


@dataclass
class Steady:
    eod_to_250: list[float] = field(default_factory=list)  # seconds
    accepted_at: dict[str, float] = field(default_factory=dict)  # queue id -> time.time() at 250
    refused: list[bytes] = field(default_factory=list)
    late: int = 0  # sends that started more than 50 ms after their slot
    lock: threading.Lock = field(default_factory=threading.Lock)


def steady_message(n: int) -> bytes:
    if n % 10 == 0:
        raw = mailgen.with_attachment(n, f"file-{n}.bin", os.urandom(100_000), to=RCPT)
    else:
        raw = mailgen.plain(n, to=RCPT, message_id=f"<steady-{n}@example.net>")
    return re.sub(rb"\r?\n", b"\r\n", raw)


def send_timed(smtp: smtplib.SMTP, raw: bytes) -> tuple[int, bytes, float]:
    """One transaction; (code, reply, seconds from the final '.' sent to the reply read)."""
    for command, want in (("MAIL FROM:<sender@example.net>", 250), (f"RCPT TO:<{RCPT}>", 250), ("DATA", 354)):
        code, reply = smtp.docmd(command)
        if code != want:
            raise RuntimeError(f"{command} → {code} {reply!r}")
    smtp.send(smtplib._quote_periods(raw))  # raw ends with CRLF
    started = time.perf_counter()
    smtp.send(b".\r\n")
    code, reply = smtp.getreply()
    return code, reply, time.perf_counter() - started


def steady_load(server: HarakaServer, rate: float, seconds: float, first: int) -> Steady:
    total = int(rate * seconds)
    messages = [steady_message(first + n) for n in range(total)]
    result = Steady()
    start = time.perf_counter() + 0.5

    def sender(worker: int) -> None:
        smtp = smtplib.SMTP(server.host, server.port, timeout=60)
        # Without it Nagle holds the final ".\r\n" until the body is acked, and the server's
        # delayed ACK adds ~40 ms to every end-of-DATA→250 measured.
        smtp.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        smtp.ehlo("bench.example.net")
        try:
            for n in range(worker, total, STEADY_CONNECTIONS):
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                late = delay < -0.05
                code, reply, latency = send_timed(smtp, messages[n])
                accepted = time.time()
                with result.lock:
                    result.late += late
                    if code == 250:
                        result.eod_to_250.append(latency)
                        found = QUEUED_AS.search(reply)
                        if found:
                            result.accepted_at[found.group(1).decode()] = accepted
                    else:
                        result.refused.append(b"%d %s" % (code, reply))
        finally:
            smtp.quit()

    threads = [threading.Thread(target=sender, args=(w,)) for w in range(STEADY_CONNECTIONS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


def stored_latencies(accepted_at: dict[str, float]) -> list[float]:
    wait_for(lambda: InboundReceipt.select().where(InboundReceipt.queue_id.in_(list(accepted_at))).count()
             >= len(accepted_at), timeout=120, interval=0.1, message="steady messages stored")
    out = []
    for receipt in InboundReceipt.select().where(InboundReceipt.queue_id.in_(list(accepted_at))):
        stored = receipt.created_at.replace(tzinfo=dt.timezone.utc).timestamp()
        out.append(stored - accepted_at[receipt.queue_id])
    return out


# -- the run ---------------------------------------------------------------------------------


def haraka(base: Path, name: str, settings: Settings, queue_plugin: str, nodes: int) -> HarakaServer:
    server = HarakaServer(base / name, settings.amqp_url, settings.resolved_spool_dir,
                          queue_plugin=queue_plugin, nodes=nodes).start()
    if queue_plugin == "mailferry":
        server.wait_connected()
    return server


def start_consumer(settings: Settings, log: Path) -> subprocess.Popen:
    process = consumer_process(settings, log)
    wait_for(lambda: log.exists() and "consuming" in log.read_text(), timeout=60,
             message="the consumer consuming")
    return process


def stop_consumer(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


def verdict(value: float, goal: float | None) -> str:
    if goal is None:
        return ""
    return f">= {goal} {'ok' if value >= goal else 'MISSED'}"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per throughput round")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--nodes", type=int, default=0, help="Haraka cluster workers (0: one process)")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, spool)")
    args = parser.parse_args()
    load_before = load()

    with tempfile.TemporaryDirectory(prefix="mf-bench-smtp-") as tmp:
        base = args.keep or Path(tmp)
        rabbit = RabbitMQServer(base / "rabbitmq").start()
        discard = plugin = consumer = postfix = None
        try:
            settings = Settings(var_dir=base / "var", amqp_url=rabbit.amqp_url,
                                consumer_metrics_port=0, scheduler_metrics_port=0)
            settings.var_dir.mkdir(parents=True)
            open_database(settings.resolved_database_url)
            add_user(RCPT)
            broker.setup_topology(settings)  # mailferry.inbound exists: publishes are routable

            discard = haraka(base, "discard", settings, "queue/discard", args.nodes)
            plugin = haraka(base, "plugin", settings, "mailferry", args.nodes)
            postfix = PostfixServer(base).start()
            print(f"smtp-source: {args.rounds} rounds × {args.messages} messages over "
                  f"{args.sessions} sessions per server and workload; Haraka nodes={args.nodes}", flush=True)
            rounds: dict[tuple[str, str], list[Round]] = {}
            for workload in WORKLOADS:
                for round_ in range(1, args.rounds + 1):
                    for name, server in (("postfix", postfix), ("discard", discard), ("plugin", plugin)):
                        measured = measured_round(server, workload, args.messages, args.sessions,
                                                  rabbit.beam_pid())
                        rounds.setdefault((workload.name, name), []).append(measured)
                        rate = measured.rate
                        if name == "plugin":
                            depth = queue_depth(settings.amqp_url, broker.INBOUND)
                            assert depth == args.messages, f"{depth} published for {args.messages} accepted"
                            clear_backlog(settings)
                        print(f"  {workload.name}, round {round_}: {name:8} {rate:7.0f} msg/s", flush=True)

            consumer = start_consumer(settings, base / "consumer.log")
            busy = smtp_source(plugin, WORKLOADS[0], args.messages, args.sessions)
            print(f"  plugin with the consumer draining at the same time: {busy:.0f} msg/s", flush=True)
            wait_for(lambda: InboundReceipt.select().count() >= args.messages, timeout=300,
                     interval=0.2, message="the busy round stored")

            print(f"steady load: {args.rate:.0f} msg/s for {args.seconds:.0f} s", flush=True)
            ceiling_steady = steady_load(discard, args.rate, args.seconds, first=0)
            steady = steady_load(plugin, args.rate, args.seconds, first=100_000)
            stored = stored_latencies(steady.accepted_at)
        finally:
            if consumer is not None:
                stop_consumer(consumer)
            for server in (plugin, discard, postfix):
                if server is not None:
                    server.stop()
            close_database()
            rabbit.stop()

    problems = [f"{len(r.refused)} refused at {args.rate:.0f} msg/s ({name}): {r.refused[:3]}"
                for name, r in (("discard", ceiling_steady), ("plugin", steady)) if r.refused]
    rows = []
    for workload in WORKLOADS:
        got = {name: rounds[(workload.name, name)] for name in ("postfix", "discard", "plugin")}
        rate = {name: statistics.median(r.rate for r in got[name]) for name in got}
        # Each round runs the three servers back to back: ratios are taken within a round (the
        # machine's speed drifts between rounds), then the median of the rounds.
        ratio = {other: statistics.median(p.rate / o.rate for p, o in zip(got["plugin"], got[other]))
                 for other in ("postfix", "discard")}
        goals = GOALS[workload.name]
        rows += [
            (f"{workload.name}:", "", ""),
            ("  accepted, Postfix (durable accept, the yardstick)", f"{rate['postfix']:.0f} msg/s", ""),
            ("  accepted, Haraka + queue/discard (reference)", f"{rate['discard']:.0f} msg/s", ""),
            ("  accepted, Haraka + mailferry plugin", f"{rate['plugin']:.0f} msg/s", ""),
            ("  plugin / Postfix", f"{ratio['postfix']:.2f}", verdict(ratio["postfix"], goals["postfix"])),
            ("  plugin / discard", f"{ratio['discard']:.2f}", verdict(ratio["discard"], goals["discard"])),
            ("  discard / Postfix (Haraka's own ceiling)",
             f"{statistics.median(d.rate / p.rate for d, p in zip(got['discard'], got['postfix'])):.2f}", ""),
        ]
        for name in ("discard", "plugin"):
            rows.append((f"  CPU ms/msg, {name}: Haraka / RabbitMQ / machine",
                         " / ".join(f"{statistics.median(getattr(r, part) for r in got[name]):.2f}"
                                    for part in ("server_cpu", "broker_cpu", "machine_cpu")), ""))
        rows.append(("  CPU ms/msg, Postfix: machine",
                     f"{statistics.median(r.machine_cpu for r in got['postfix']):.2f}", ""))
    eod_p99 = percentile(steady.eod_to_250, 99)
    stored_p99 = percentile(stored, 99)
    rows += [
        ("accepted, plugin, consumer running alongside", f"{busy:.0f} msg/s", ""),
        (f"end-of-DATA→250 p50 / p99, plugin, {args.rate:.0f} msg/s",
         f"{ms(percentile(steady.eod_to_250, 50))} / {ms(eod_p99)} ms",
         f"p99 <= {GOAL_EOD_P99_MS:.0f} ms {'ok' if eod_p99 * 1000 <= GOAL_EOD_P99_MS else 'MISSED'}"),
        (f"end-of-DATA→250 p50 / p99, discard, {args.rate:.0f} msg/s",
         f"{ms(percentile(ceiling_steady.eod_to_250, 50))} / {ms(percentile(ceiling_steady.eod_to_250, 99))} ms", ""),
        (f"250→stored p50 / p99, {args.rate:.0f} msg/s",
         f"{ms(percentile(stored, 50))} / {ms(stored_p99)} ms",
         f"p99 < {GOAL_STORED_P99_MS:.0f} ms {'ok' if stored_p99 * 1000 < GOAL_STORED_P99_MS else 'MISSED'}"),
    ]
    print()
    print(f"SMTP ingest — {os.cpu_count()} cores, {args.sessions} sessions, {args.messages} messages "
          f"per round, median of {args.rounds} rounds; load average {load_before} before, {load()} after")
    print(f"{'measure':58} {'value':>17}  goal")
    for name, value, goal in rows:
        print(f"{name:58} {value:>17}  {goal}")
    for workload in WORKLOADS:
        print(f"rounds, {workload.name}: " + ", ".join(
            f"{name} {[round(r.rate) for r in rounds[(workload.name, name)]]}"
            for name in ("postfix", "discard", "plugin")))
    print(f"steady: {len(steady.eod_to_250)} plugin / {len(ceiling_steady.eod_to_250)} discard messages, "
          f"sends late by > 50 ms: {steady.late} / {ceiling_steady.late}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
