"""Benchmark: events and webhooks.

1. **SMTP 250 → webhook received**: the real stack (`make run`: Haraka, RabbitMQ, the
   consumer with its webhook worker, the relay) on a fresh var/, one endpoint at a receiver
   in this process; unique messages over SMTP at ``--rate`` for ``--seconds``. The latency of
   a message is from the 250 its sender got to its ``message.stored`` POST arriving. Goal:
   p99 < 1 s at 50 msg/s.
2. **Deliveries per second**: ``--events`` events written into the same stack's outbox at
   once (each about a stored message, so each POST carries a whole payload); from the write
   to the last POST received.
3. **Consumer throughput with an endpoint**: `bench/consumer_throughput.py`'s one-consumer
   drain of ``--count`` messages, without and with one endpoint (the relay and the webhook
   worker running), interleaved over ``--rounds``. Goal: with ≥ 0.9 × without, in the same
   round.

    .venv/bin/python bench/events.py [--seconds 30] [--rate 50] [--events 2000] [--count 3000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine, message_mix, percentile
from consumer_throughput import backlog, drain
from soak import USER, Sender, running_stack

from devstack.consumers import consumer_process, wait_for
from devstack.rabbitmq import RabbitMQServer
from devstack.webhook_receiver import Receiver
from mailferry import outbox, webhooks
from mailferry.db import close_database, open_database
from mailferry.models import EmailMessage, db

ROOT = Path(__file__).resolve().parents[1]


def latency(args, env: dict, var: Path, ports: dict, receiver: Receiver) -> tuple[list[float], int]:
    """Send for ``args.seconds``; (latency of each accepted message in s, messages without
    a webhook after the wait)."""
    sender = Sender(ports["smtp"], args.rate)
    thread = threading.Thread(target=sender.run, daemon=True)
    thread.start()
    time.sleep(args.seconds)
    sender.stop.set()
    thread.join(60)
    sent = set(sender.accepted)

    def arrived() -> dict[str, float]:
        return {g.event["data"]["message_id"]: g.at for g in receiver.got()
                if g.event["type"] == "message.stored"}

    try:
        wait_for(lambda: sent <= set(arrived()), timeout=120, interval=0.2, message="every webhook")
    except AssertionError:
        pass  # reported as missing
    got = arrived()
    return [got[m] - sender.accepted_at[m] for m in sent if m in got], len(sent - set(got))


def deliveries_per_second(var: Path, receiver: Receiver, count: int) -> float:
    """Write ``count`` events about stored messages at once; their POSTs per second."""
    open_database(f"sqlite:///{var / 'mailferry.db'}")
    try:
        messages = [(m.id, m.user_id) for m in EmailMessage.select(EmailMessage.id, EmailMessage.user)]
        before = len(receiver.got())
        started = time.monotonic()
        with db.atomic():
            outbox.add([outbox.NewEvent(outbox.STORED, f"bench-{n}", {
                "message_id": messages[n % len(messages)][0],
                "user_id": messages[n % len(messages)][1]}, messages[n % len(messages)][1])
                for n in range(count)])
        wait_for(lambda: len(receiver.got()) >= before + count, timeout=600, interval=0.1,
                 message="every POST")
        return count / (receiver.got()[-1].at - started)
    finally:
        close_database()


def with_and_without(args) -> list[tuple[float, float, float]]:
    """(without, with, seconds from the last receipt to the last webhook) of each round."""
    messages = message_mix(args.count)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mf-events-") as tmp:
        tmp = Path(tmp)
        rabbit = RabbitMQServer(tmp / "rabbitmq").start()
        try:
            pairs = [(backlog(rabbit, tmp / f"plain-{n}", messages),
                      backlog(rabbit, tmp / f"hooked-{n}", messages)) for n in range(args.rounds)]
            for plain, hooked in pairs:
                plain_drain = drain(plain, len(messages), 1, rabbit)
                without = plain_drain.rate
                hooked = hooked.replace(relay_metrics_port=0, webhook_metrics_port=0)
                with Receiver([200]) as receiver:
                    open_database(hooked.resolved_database_url)
                    webhooks.add_endpoint(hooked, receiver.url)
                    close_database()
                    helpers = [consumer_process(hooked, hooked.var_dir / f"{m}.log", module=m)
                               for m in ("relay", "consumer.webhook_worker")]
                    try:
                        result = drain(hooked, len(messages), 1, rabbit)
                        during = len(receiver.got())
                        ended = time.monotonic()
                        wait_for(lambda: len(receiver.got()) >= len(messages), timeout=600,
                                 interval=0.1, message="every webhook")
                        lag = receiver.got()[-1].at - ended
                    finally:
                        for process in helpers:
                            process.terminate()
                            process.wait(40)
                rows.append((without, result.rate, lag))
                print(f"  round {len(rows)}: without {without:.0f} msg/s, with one endpoint "
                      f"{result.rate:.0f} msg/s ({result.rate / without:.2f} ×); "
                      f"{during} of {len(messages)} webhooks received by the last receipt, the "
                      f"last {max(0.0, lag):.1f} s after it\n    without: {plain_drain.cpu}\n"
                      f"    with:    {result.cpu}", flush=True)
        finally:
            rabbit.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--rate", type=float, default=50)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--throughput-only", action="store_true", help="only part 3")
    args = parser.parse_args()
    print(f"events: {machine()}", flush=True)
    if not args.throughput_only:
        stack_parts(args)
    rows = with_and_without(args)
    ratio = statistics.median(w / wo for wo, w, _ in rows)
    print(f"  consumer throughput with one endpoint / without (median of {len(rows)} rounds): "
          f"{ratio:.2f} (goal ≥ 0.9)")
    return 0


def stack_parts(args) -> None:
    """Parts 1 and 2, on the stack `make run` starts."""
    with Receiver([200]) as receiver, running_stack("mf-events-") as (_, var, ports, env, _log):
        cli = [sys.executable, "-m", "mailferry.cli"]
        run_env = dict(env, PYTHONPATH=str(ROOT))
        subprocess.run(cli + ["users", "add", USER], cwd=ROOT, env=run_env, check=True, capture_output=True)
        subprocess.run(cli + ["webhooks", "add", receiver.url], cwd=ROOT, env=run_env, check=True,
                       capture_output=True)
        times, missing = latency(args, env, var, ports, receiver)
        print(f"  SMTP 250 → webhook received, {len(times)} messages at {args.rate:g} msg/s: "
              f"p50 {1000 * percentile(times, 50):.0f} ms, p99 {1000 * percentile(times, 99):.0f} ms, "
              f"max {1000 * max(times):.0f} ms; {missing} without a webhook (goal p99 < 1 s)",
              flush=True)
        rate = deliveries_per_second(var, receiver, args.events)
        print(f"  deliveries: {args.events} events written at once, {rate:.0f} POSTs/s to one "
              "local receiver", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
