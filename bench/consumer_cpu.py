"""Where a consumer's CPU goes: per-process CPU per message during one drain.

Injects ``--count`` messages (the consumer benchmark's mix), starts ``--consumers`` consumer
processes, and reads ``/proc/<pid>/stat`` of each consumer, its parser process and fork
server, and RabbitMQ at the start and end of the drain, and of each thread of the first
consumer. ``--wrap SCRIPT`` runs the first consumer as ``python SCRIPT`` instead of ``python -m
consumer``: a script that starts it under a profiler or with timers (it must keep its work under
``if __name__ == "__main__"``: the parser process imports it).

    .venv/bin/python bench/consumer_cpu.py [--count 3000] [--consumers 1] [--wrap script.py]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, descendants, inject_backlog, message_mix, stop_consumers, wait_consuming

from mailferry.config import Settings
from mailferry.models import InboundReceipt
from devstack.rabbitmq import RabbitMQServer
from devstack.consumers import consumer_process, settings_env, wait_for

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str, which: slice = slice(11, 13)) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[which]) / TICK


def machine_cpu() -> dict[str, float]:
    """The machine's idle, iowait and steal time (all cores), in seconds."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return {"(machine idle)": int(fields[3]) / TICK, "(machine iowait)": int(fields[4]) / TICK,
            "(machine steal)": int(fields[7]) / TICK}


def snapshot(consumers: list[int], rabbit: int | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for n, pid in enumerate(consumers):
        out[f"consumer{n}"] = cpu_seconds(pid)
        out[f"consumer{n}/system"] = cpu_seconds(pid, slice(12, 13))
        for child in descendants(pid):
            out[f"consumer{n}.child{child}"] = cpu_seconds(child)
    if consumers:
        for task in Path(f"/proc/{consumers[0]}/task").iterdir():
            out[f"consumer0/thread{task.name}"] = cpu_seconds(f"{consumers[0]}/task/{task.name}")
    if rabbit is not None:
        out["rabbitmq"] = cpu_seconds(rabbit)
    out.update(machine_cpu())
    return out


def wrapped(script: str, settings: Settings, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, script], env=settings_env(settings),
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=ROOT)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--consumers", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=Settings().prefetch,
                        help="MAILFERRY_PREFETCH (default: its default)")
    parser.add_argument("--wrap", help="run consumer 0 as `python WRAP` instead of `-m consumer`")
    args = parser.parse_args()
    messages = message_mix(args.count)
    with tempfile.TemporaryDirectory(prefix="mf-cpu-") as tmp:
        tmp = Path(tmp)
        rabbit = RabbitMQServer(tmp / "rabbitmq").start()
        try:
            base = tmp / "run"
            settings = Settings(var_dir=base, amqp_url=rabbit.amqp_url, consumer_metrics_port=0,
                                prefetch=args.prefetch)
            inject_backlog(settings, messages)
            logs = [base / f"consumer{i}.log" for i in range(args.consumers)]
            processes = [wrapped(args.wrap, settings, logs[0]) if args.wrap and i == 0
                         else consumer_process(settings, log) for i, log in enumerate(logs)]
            try:
                wait_consuming(logs)
                before = snapshot([p.pid for p in processes], rabbit.beam_pid())
                started = time.perf_counter()
                wait_for(lambda: InboundReceipt.select().count() >= len(messages), timeout=900,
                         interval=0.02)
                elapsed = time.perf_counter() - started
                after = snapshot([p.pid for p in processes], rabbit.beam_pid())
            finally:
                stop_consumers(processes)
        finally:
            rabbit.stop()
    n = len(messages)
    print(f"{n} messages, {args.consumers} consumer(s): {elapsed:.2f} s, {n / elapsed:.0f} msg/s")
    total = 0.0
    for name in sorted(after):
        used = after[name] - before.get(name, 0.0)
        if not name.startswith("(") and "/" not in name:
            total += used
        if used > 0.005:
            print(f"  {name:<28} {used * 1000 / n:6.3f} ms/msg   {100 * used / elapsed:5.1f} % busy")
    print(f"  {'total':<28} {total * 1000 / n:6.3f} ms/msg   {100 * total / elapsed:5.1f} % of one core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
