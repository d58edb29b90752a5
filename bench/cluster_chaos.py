"""Benchmark of the fault drill (``devstack.cluster_drill``): two MX hosts on a three-node
RabbitMQ cluster, PostgreSQL and SeaweedFS, with a consumer, a RabbitMQ node and a whole host
killed while mail arrives; or, with ``--no-faults``, the same cluster and load without them.

It prints the drill's verdict (``tests/test_cluster_drill.py`` asserts it) and the figures:
SMTP 250 → stored p50 / p99 (goal p99 < 1 s at 50 msg/s, without the faults), how many
sends needed a retry, the webhooks posted.

    .venv/bin/python bench/cluster_chaos.py [--count 2000] [--rate 50] [--no-faults]

Exit status 1 when the drill found a problem.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import common  # noqa: F401 - puts the repository on sys.path
from devstack import cluster_drill

GOAL_P99 = 1.0  # seconds, 250 → stored
WARMUP = 2.0  # seconds of the run left out of the steady figure (the first batches, connections)


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] if ordered else float("nan")


def report(drill: cluster_drill.Drill) -> None:
    print(f"cluster_chaos: {drill.count} messages at {drill.rate:.0f} msg/s to 2 MX hosts, "
          "3 RabbitMQ nodes (quorum), PostgreSQL, SeaweedFS (raw sources, attachments, bodies)"
          + (", with the faults" if drill.faults else ", no faults"))
    for event in drill.events:
        print(f"  {event}")
    print(f"  accepted (250) {len(drill.accepted)} of {drill.count}; sends retried after a 4xx or "
          f"a lost connection {drill.retries}")
    print(f"  stored {drill.stored}; lost {len(drill.lost)}; stored twice {len(drill.doubled)}; "
          f"stored bytes not matching their sha256 {len(drill.unsound)}; dead-lettered {len(drill.dead)}")
    print(f"  message.stored webhooks: {drill.posts} POSTs; stored and never posted "
          f"{len(drill.unposted)}; posted under more than one id {len(drill.several_ids)}; "
          f"posted without their text {len(drill.bodiless)}")
    print(f"  raw sources read back through both hosts' APIs: {cluster_drill.API_SAMPLE} each; "
          f"not served as stored {len(drill.api_wrong)}")
    steady = [latency for at, latency in drill.latencies if at >= WARMUP]
    all_ = [latency for _, latency in drill.latencies]
    p99 = percentile(steady, 99)
    goal = f"goal p99 < {GOAL_P99 * 1000:.0f} ms: {'met' if p99 < GOAL_P99 else 'MISSED'}" \
        if not drill.faults else "the faults' pauses included"
    print(f"  250 → stored after the first {WARMUP:.0f} s: p50 {percentile(steady, 50) * 1000:.0f} ms, "
          f"p90 {percentile(steady, 90) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, max "
          f"{max(steady, default=0) * 1000:.0f} ms ({goal})")
    print(f"  250 → stored, the whole run: p99 {percentile(all_, 99) * 1000:.0f} ms, max "
          f"{max(all_, default=0) * 1000:.0f} ms")
    slow = [at for at, latency in drill.latencies if latency >= GOAL_P99]
    if slow:
        print(f"  {len(slow)} over {GOAL_P99 * 1000:.0f} ms, accepted between {slow[0]:.1f} s "
              f"and {slow[-1]:.1f} s into the run")
    for problem in drill.problems():
        print(f"  PROBLEM {problem}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--no-faults", action="store_true",
                        help="the same cluster and load without the faults: the steady 250 → stored")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mf-chaos-") as tmp:
        drill = cluster_drill.run(Path(tmp), args.count, args.rate, faults=not args.no_faults)
    report(drill)
    return 1 if drill.problems() else 0


if __name__ == "__main__":
    sys.exit(main())
