"""Benchmark: one consumer draining the same backlog into folders and into S3-compatible
object storage (SeaweedFS on loopback, fsync on), in interleaved rounds.

The figure that holds on any machine is CPU per stored message: Mailferry's own (the
consumer and its parser) with the S3 backend over the same with folders (goal ≤ 1.15 ×), and,
apart, what the object store itself spent. The drain rates are given too, as a ratio within
each round.

    .venv/bin/python bench/storage_backends.py [--count 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from common import machine, message_mix
from consumer_cpu import cpu_seconds
from consumer_throughput import backlog, drain
from devstack.rabbitmq import RabbitMQServer
from devstack.seaweedfs import SeaweedServer

GOAL = 1.15


def own_cpu_ms(result) -> float:
    """The consumer's and its parser's CPU ms per message."""
    return result.cpu_ms["parsers"] + result.cpu_ms["consumers"]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    messages = message_mix(args.count)
    with tempfile.TemporaryDirectory(prefix="mf-bench-storage-") as tmp:
        tmp = Path(tmp)
        rabbit = RabbitMQServer(tmp / "rabbitmq").start()
        weed = SeaweedServer(tmp / "seaweedfs").start()
        rows = []
        try:
            print(f"  injecting {3 * args.rounds} backlogs of {args.count} messages", flush=True)
            backlogs = []
            for n in range(args.rounds):
                folders = backlog(rabbit, tmp / f"folders-{n}", messages)
                s3 = backlog(rabbit, tmp / f"s3-{n}", messages).replace(**weed.settings(f"round-{n}"))
                bodies = backlog(rabbit, tmp / f"bodies-{n}", messages).replace(
                    **weed.settings(f"bodies-{n}"), body_storage="storage")
                backlogs.append([(folders, "folders"), (s3, "s3"), (bodies, "s3+bodies")])
            weed_pid = weed._process.pid
            for n, arms in enumerate(backlogs):
                results = {}
                for settings, name in arms[n % 3:] + arms[:n % 3]:  # each arm first in turn
                    before = cpu_seconds(weed_pid)
                    result = drain(settings, len(messages), 1, rabbit)
                    server_ms = (cpu_seconds(weed_pid) - before) * 1000 / len(messages)
                    results[name] = (result, own_cpu_ms(result), server_ms)
                    print(f"  round {n + 1} {name:<9}: {result.rate:,.0f} msg/s; {result.cpu}; "
                          f"object store CPU ms/msg {server_ms:.2f}", flush=True)
                rows.append(results)
        finally:
            weed.stop()
            rabbit.stop()
    cpu_ratio = statistics.median(r["s3"][1] / r["folders"][1] for r in rows)
    rate_ratio = statistics.median(r["s3"][0].rate / r["folders"][0].rate for r in rows)
    print(f"storage_backends: {args.count} messages, {args.rounds} rounds, {machine()}, SQLite, one consumer")
    print(f"  Mailferry CPU per stored message, S3 / folders: {cpu_ratio:.2f} × (goal ≤ {GOAL})")
    print(f"  Mailferry CPU ms/msg: folders {statistics.median(r['folders'][1] for r in rows):.2f}, "
          f"S3 {statistics.median(r['s3'][1] for r in rows):.2f}; SeaweedFS's own "
          f"{statistics.median(r['s3'][2] for r in rows):.2f}")
    bodies_ratio = statistics.median(r["s3+bodies"][1] / r["s3"][1] for r in rows)
    print(f"  with the bodies as objects too (body_storage = storage), S3+bodies / S3: "
          f"{bodies_ratio:.2f} × ({statistics.median(r['s3+bodies'][1] for r in rows):.2f} ms/msg; "
          f"SeaweedFS's own {statistics.median(r['s3+bodies'][2] for r in rows):.2f})")
    print(f"  drain rate, S3 / folders: {rate_ratio:.2f} × "
          f"({statistics.median(r['folders'][0].rate for r in rows):,.0f} and "
          f"{statistics.median(r['s3'][0].rate for r in rows):,.0f} msg/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
