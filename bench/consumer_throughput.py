"""Benchmark: inject→stored throughput of the consumer, against the parse-only ceiling.

One run: (1) the parse-only rate of 5,000 messages in one process — the ceiling, since parsing
is the consumer's irreducible work; (2) the rate at which one consumer process drains the
5,000 injected messages into SQLite (from the moment it is consuming until the last receipt);
(3) the same with two consumer processes. Goals: one ≥ 0.85 × ceiling, two ≥ 1.5 × one, peak
RSS of a consumer under 200 MB.

    .venv/bin/python bench/consumer_throughput.py [--count 5000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import (inject_backlog, machine, message_mix, peak_rss_mb, stop_consumers,
                    wait_consuming)

from consumer.parse import parse_email
from mailferry.config import Settings
from mailferry.models import InboundReceipt
from tests.harness.rabbitmq import RabbitMQServer
from tests.pipeline import consumer_process, wait_for


PARSE_PROCESS = "auto"
PREFETCH = Settings().prefetch


def parse_ceiling(messages: list[bytes]) -> float:
    started = time.perf_counter()
    for raw in messages:
        parse_email(raw)
    return len(messages) / (time.perf_counter() - started)


def drain(base: Path, amqp_url: str, messages: list[bytes], consumers: int) -> tuple[float, float]:
    """Inject everything, then time ``consumers`` processes draining it. (rate, peak RSS MB)"""
    settings = Settings(var_dir=base, amqp_url=amqp_url, consumer_metrics_port=0, prefetch=PREFETCH,
                        parse_process=PARSE_PROCESS)
    inject_backlog(settings, messages)
    logs = [base / f"consumer{i}.log" for i in range(consumers)]
    processes = [consumer_process(settings, log) for log in logs]
    try:
        wait_consuming(logs)
        started = time.perf_counter()
        wait_for(lambda: InboundReceipt.select().count() >= len(messages), timeout=900, interval=0.05)
        elapsed = time.perf_counter() - started
        rss = max(peak_rss_mb(p.pid) for p in processes)
    finally:
        stop_consumers(processes)
    return len(messages) / elapsed, rss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (ceiling, one, two); medians are reported")
    parser.add_argument("--parse-process", choices=("auto", "on", "off"), default="auto",
                        help="MAILFERRY_PARSE_PROCESS of the consumers")
    parser.add_argument("--prefetch", type=int, default=Settings().prefetch,
                        help="MAILFERRY_PREFETCH (default: its default)")
    args = parser.parse_args()
    global PARSE_PROCESS, PREFETCH
    PARSE_PROCESS, PREFETCH = args.parse_process, args.prefetch
    messages = message_mix(args.count)
    megabytes = sum(map(len, messages)) / 1e6
    with tempfile.TemporaryDirectory(prefix="mf-bench-") as tmp:
        tmp = Path(tmp)
        rabbit = RabbitMQServer(tmp / "rabbitmq").start()
        ceilings, ones, twos, rss = [], [], [], []
        try:
            # Rounds interleave the three measurements, so a busy moment of the machine
            # weighs on all of them alike; medians are reported.
            for n in range(args.rounds):
                ceilings.append(parse_ceiling(messages))
                one, rss_one = drain(tmp / f"one-{n}", rabbit.amqp_url, messages, 1)
                two, rss_two = drain(tmp / f"two-{n}", rabbit.amqp_url, messages, 2)
                ones.append(one)
                twos.append(two)
                rss += [rss_one, rss_two]
                print(f"  round {n + 1}: ceiling {ceilings[-1]:.0f}, one {one:.0f}, two {two:.0f} msg/s",
                      flush=True)
        finally:
            rabbit.stop()
    ceiling, one, two = (statistics.median(v) for v in (ceilings, ones, twos))
    one_ratio = statistics.median(o / c for o, c in zip(ones, ceilings))
    two_ratio = statistics.median(t / o for t, o in zip(twos, ones))
    rows = [
        ("parse-only ceiling (1 process)", f"{ceiling:,.0f} msg/s", ""),
        ("1 consumer, inject→stored", f"{one:,.0f} msg/s", f"{one_ratio:.2f} × ceiling (goal ≥ 0.85)"),
        ("2 consumers, inject→stored", f"{two:,.0f} msg/s", f"{two_ratio:.2f} × one (goal ≥ 1.5)"),
        ("consumer peak RSS (with its parser)", f"{max(rss):.0f} MB", "goal < 200 MB"),
    ]
    print(f"consumer_throughput: {args.count} messages, {megabytes:.1f} MB, {machine()}, SQLite, "
          f"parse_process={args.parse_process}")
    for name, value, note in rows:
        print(f"  {name:<34} {value:>14}   {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
