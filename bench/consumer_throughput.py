"""Benchmark: inject→stored throughput of the consumer, against the parse-only ceiling.

One round: (1) the parse-only rate of 5,000 messages in one process — the ceiling, since
parsing is the consumer's irreducible work; half of them are parsed just before (2) and half
just after it; (2) the rate at which one consumer process drains the 5,000 injected messages
into SQLite (from the moment it is consuming until the last receipt); (3) the same with two
consumer processes. Goals: one ≥ 0.85 × ceiling, two ≥ 1.6 × one, the parser busy ≥ 95 %
of the one consumer's drain, peak RSS of a consumer under 200 MB. Ratios are taken within a
round, and their medians over the rounds are reported.

Every drain's backlog is injected before the first round, each into a virtual host of its
own, so that the three measurements of a round run back to back: this machine's speed drifts
by a third within a minute (docs/BENCHMARKS.md), and a round with a pause for injecting
between its measurements compared one speed of the machine with another.

    .venv/bin/python bench/consumer_throughput.py [--count 5000] [--rounds 7]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import os
import statistics
import tempfile
import time
from pathlib import Path

from common import (descendants, inject_backlog, machine, message_mix, peak_rss_mb,
                    stop_consumers, wait_consuming)
from consumer_cpu import cpu_seconds, machine_cpu

from mailread.parse import parse_email
from mailferry.config import Settings
from mailferry.db import close_database, open_database
from mailferry.models import InboundReceipt
from devstack.rabbitmq import RabbitMQServer
from devstack.consumers import consumer_process, wait_for


PARSE_PROCESS = "auto"
PREFETCH = Settings().prefetch


def parse_seconds(messages: list[bytes]) -> float:
    """How long parsing ``messages`` one after another in this process takes."""
    started = time.perf_counter()
    for raw in messages:
        parse_email(raw)
    return time.perf_counter() - started


def backlog(rabbit: RabbitMQServer, base: Path, messages: list[bytes]) -> Settings:
    """A drain's own database, spool and virtual host, with ``messages`` injected."""
    vhost = base.name
    rabbit.rabbitmqctl("add_vhost", vhost)
    rabbit.rabbitmqctl("set_permissions", "-p", vhost, rabbit.username, ".*", ".*", ".*")
    settings = Settings(var_dir=base, amqp_url=rabbit.amqp_url_for(vhost), consumer_metrics_port=0,
                        prefetch=PREFETCH, parse_process=PARSE_PROCESS)
    inject_backlog(settings, messages)
    close_database()
    return settings


@dataclass
class Drain:
    rate: float  # messages per second, from consuming to the last receipt
    rss: float  # peak RSS (MB) of a consumer with its parser
    busy: float  # share of the drain's time each parser process spent on a CPU
    steady_busy: float  # … between the 10th and the 90th percent of the receipts
    cpu: str  # where the CPU went: ms per message, and how idle the machine was
    cpu_ms: dict[str, float]  # CPU ms per message: parsers, consumers, rabbitmq


def drain(settings: Settings, count: int, consumers: int, rabbit: RabbitMQServer) -> Drain:
    """Time ``consumers`` processes draining the backlog of ``settings``.

    The parser's busy fraction is its CPU time over the drain's wall time, per parser: the
    figure that says whether the parser ever waits, whatever the machine's speed. It is also
    taken between the 10 % and the 90 % receipt, without the start (the first batch on its
    way) and the end (the last batches committing after the last parse).
    """
    open_database(settings.resolved_database_url)
    logs = [settings.var_dir / f"consumer{i}.log" for i in range(consumers)]
    processes = [consumer_process(settings, log) for log in logs]
    try:
        wait_consuming(logs)
        before = cpu_snapshot(processes, rabbit)
        started = time.perf_counter()
        marks = {}  # 10 and 90 (% of receipts) -> (time, snapshot)

        def done() -> bool:
            stored = InboundReceipt.select().count()
            for mark in (10, 90):
                if mark not in marks and stored >= count * mark / 100:
                    marks[mark] = (time.perf_counter(), cpu_snapshot(processes, rabbit))
            return stored >= count

        wait_for(done, timeout=900, interval=0.02)
        elapsed = time.perf_counter() - started
        after = cpu_snapshot(processes, rabbit)
        rss = max(peak_rss_mb(p.pid) for p in processes)
    finally:
        stop_consumers(processes)
    used = {k: (after[k] - before.get(k, 0.0)) * 1000 / count for k in after}
    idle = 100 * (after["idle"] - before["idle"]) / (elapsed * (os.cpu_count() or 1))
    busy = (after["parsers"] - before["parsers"]) / elapsed / consumers
    (t10, at10), (t90, at90) = marks[10], marks[90]
    steady = (at90["parsers"] - at10["parsers"]) / (t90 - t10) / consumers if t90 > t10 else busy
    return Drain(count / elapsed, rss, busy, steady,
                 f"CPU ms/msg: parsers {used['parsers']:.2f}, consumers {used['consumers']:.2f}, "
                 f"RabbitMQ {used['rabbitmq']:.2f}; idle {idle:.0f} %; parser busy "
                 f"{100 * busy:.0f} % ({100 * steady:.0f} % from 10 to 90 % of the receipts)",
                 used)


def cpu_snapshot(processes, rabbit: RabbitMQServer) -> dict[str, float]:
    parsers = [child for p in processes for child in descendants(p.pid)]
    return {"parsers": sum(map(cpu_seconds, parsers)),
            "consumers": sum(cpu_seconds(p.pid) for p in processes),
            "rabbitmq": cpu_seconds(rabbit.beam_pid()),
            "idle": machine_cpu()["(machine idle)"]}


def main() -> int:
    global PARSE_PROCESS, PREFETCH
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7,
                        help="rounds of (ceiling, one, two); medians are reported")
    parser.add_argument("--parse-process", choices=("auto", "on", "off"), default="auto",
                        help="MAILFERRY_PARSE_PROCESS of the consumers")
    parser.add_argument("--prefetch", type=int, default=PREFETCH,
                        help="MAILFERRY_PREFETCH (default: its default)")
    args = parser.parse_args()
    PARSE_PROCESS, PREFETCH = args.parse_process, args.prefetch
    messages = message_mix(args.count)
    megabytes = sum(map(len, messages)) / 1e6
    with tempfile.TemporaryDirectory(prefix="mf-bench-") as tmp:
        tmp = Path(tmp)
        rabbit = RabbitMQServer(tmp / "rabbitmq").start()
        ceilings, ones, twos, rss, busies = [], [], [], [], []
        try:
            print(f"  injecting {2 * args.rounds} backlogs of {args.count} messages", flush=True)
            backlogs = [(backlog(rabbit, tmp / f"one-{n}", messages),
                         backlog(rabbit, tmp / f"two-{n}", messages)) for n in range(args.rounds)]
            half = len(messages) // 2
            # Rounds interleave the three measurements, so a busy moment of the machine
            # weighs on all of them alike; medians are reported.
            for n, (for_one, for_two) in enumerate(backlogs):
                # The ceiling parses the first half of the messages just before the one
                # consumer's drain and the second half just after it: it brackets the drain
                # it is compared with, rather than taking the machine's speed of one moment.
                parsing = parse_seconds(messages[:half])
                one = drain(for_one, len(messages), 1, rabbit)
                parsing += parse_seconds(messages[half:])
                ceilings.append(len(messages) / parsing)
                two = drain(for_two, len(messages), 2, rabbit)
                ones.append(one.rate)
                twos.append(two.rate)
                busies.append(one)
                rss += [one.rss, two.rss]
                print(f"  round {n + 1}: ceiling {ceilings[-1]:.0f}, one {one.rate:.0f}, two "
                      f"{two.rate:.0f} msg/s\n    one: {one.cpu}\n    two: {two.cpu}", flush=True)
        finally:
            rabbit.stop()
    ceiling, one, two = (statistics.median(v) for v in (ceilings, ones, twos))
    one_ratio = statistics.median(o / c for o, c in zip(ones, ceilings))
    two_ratio = statistics.median(t / o for t, o in zip(twos, ones))
    rows = [
        ("parse-only ceiling (1 process)", f"{ceiling:,.0f} msg/s", ""),
        ("1 consumer, inject→stored", f"{one:,.0f} msg/s", f"{one_ratio:.2f} × ceiling (goal ≥ 0.85)"),
        ("2 consumers, inject→stored", f"{two:,.0f} msg/s", f"{two_ratio:.2f} × one (goal ≥ 1.6)"),
        ("parser busy, 1 consumer's drain", f"{100 * statistics.median(d.busy for d in busies):.0f} %",
         f"{100 * statistics.median(d.steady_busy for d in busies):.0f} % from 10 to 90 % "
         "of the receipts (goal ≥ 95 %)"),
        ("consumer peak RSS (with its parser)", f"{max(rss):.0f} MB", "goal < 200 MB"),
    ]
    print(f"consumer_throughput: {args.count} messages, {megabytes:.1f} MB, {machine()}, SQLite, "
          f"parse_process={args.parse_process}")
    for name, value, note in rows:
        print(f"  {name:<34} {value:>14}   {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
