"""Soak: the real stack (`make run`: RabbitMQ, Haraka with the plugin, the consumer, the
scheduler, on SQLite and folders under a fresh var/) under steady SMTP load for a long time.

A sender delivers unique messages at ``--rate`` per second over SMTP, as senders do: a
connection carries 1 to 20 messages, then QUIT and a new connection; a 4xx is retried later
(it is a deferral, not a loss). Every ``--sample`` seconds it records, for each process of the
stack, RSS and open file descriptors, and the queue depths, the spool's incoming files and
the storage's size. At the end it stops sending, waits for the backlog to drain, and counts:

- lost: accepted with 250 and never stored;
- doubled: stored more than once, and the deliveries the consumer saw a second time (a
  redelivery, a sweep) and absorbed as duplicates (its ``mailferry_emails_total``);
- the drift of each resource after warm-up: the least-squares line through the samples
  after the first ``--warm-up`` seconds, its change from the first to the last of them, as a
  share of where it started (goal: RSS and fds flat within ±10 %).

A PNG of the samples is written with ``--plot`` (matplotlib, the `bench` extra).

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 50] [--sample 60] [--plot docs/soak.png]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import smtplib
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import descendants  # noqa: E402
from devstack.ports import free_port  # noqa: E402

USER = "soak@example.org"
PROCESS_NAMES = {  # a word of the command line -> the name in the report (first match)
    "beam.smp": "rabbitmq", "parse_pool": "parser", "consumer.webhook_worker": "webhooks",
    "-m consumer": "consumer",
    "-m scheduler": "scheduler", "-m relay": "relay", "run_stack": "supervisor", "haraka": "haraka",
}


@dataclass
class Sample:
    at: float  # seconds since the load started
    rss: dict[str, float]  # MB by process name (summed over processes of that name)
    fds: dict[str, int]
    queues: dict[str, int]
    incoming: int  # files in spool/incoming: message files and segments not yet reclaimed
    storage_mb: float
    sent: int


@dataclass
class Sender:
    """Unique messages over SMTP at a steady rate, reconnecting now and then."""

    port: int
    rate: float
    accepted: list[str] = field(default_factory=list)  # Message-IDs answered 250
    accepted_at: dict[str, float] = field(default_factory=dict)  # … and when (monotonic)
    deferred: int = 0  # 4xx answers (retried)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        rng, number, retry = random.Random(7), 0, []
        started = time.monotonic()
        while not self.stop.is_set():
            try:
                smtp = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
            except OSError as exc:
                self.errors.append(f"connect: {exc}")
                time.sleep(1)
                continue
            try:
                for _ in range(rng.randint(1, 20)):
                    if self.stop.is_set():
                        break
                    if retry:
                        message_id = retry.pop()
                    else:
                        number += 1
                        message_id = f"<soak-{number}@soak.example>"
                    due = started + len(self.accepted) / self.rate
                    time.sleep(max(0.0, due - time.monotonic()))
                    try:
                        smtp.sendmail("sender@soak.example", [USER], message(message_id, number))
                        self.accepted.append(message_id)
                        self.accepted_at[message_id] = time.monotonic()
                    except smtplib.SMTPResponseException as exc:
                        if 400 <= exc.smtp_code < 500:
                            self.deferred += 1
                            retry.append(message_id)
                        else:
                            self.errors.append(f"{exc.smtp_code} {exc.smtp_error!r}")
                smtp.quit()
            except (smtplib.SMTPException, OSError) as exc:
                self.errors.append(f"session: {exc!r}")


def message(message_id: str, number: int) -> bytes:
    body = f"Soak message {number}.\r\n" + "The quick brown fox jumps over the lazy dog.\r\n" * (number % 40)
    attachment = ""
    if number % 10 == 0:  # a tenth carry a small attachment
        attachment = ("--b\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
                      "Content-Transfer-Encoding: base64\r\n\r\n" + "QUJD" * 2000 + "\r\n")
    return (f"From: sender@soak.example\r\nTo: {USER}\r\nSubject: soak {number}\r\n"
            f"Message-ID: {message_id}\r\nDate: {formatdate()}\r\nMIME-Version: 1.0\r\n"
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n"
            f"--b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n"
            f"{attachment}--b--\r\n").encode()


def stack_processes(root_pid: int, var: Path) -> dict[str, list[int]]:
    """The stack's processes by name: everything below `make run`, and the RabbitMQ node it
    started (which leaves its parent), found by its data folder under var/."""
    out: dict[str, list[int]] = {}
    nodes = [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and _runs(e, str(var))]
    for pid in sorted(set([root_pid] + descendants(root_pid) + nodes)):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        for word, name in PROCESS_NAMES.items():
            if word in command:
                out.setdefault(name, []).append(pid)
                break
    return out


def _runs(entry: Path, needle: str) -> bool:
    try:
        command = (entry / "cmdline").read_bytes()
    except OSError:
        return False
    return b"beam.smp" in command and needle.encode() in command


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def queue_depths(management_port: int) -> dict[str, int]:
    request = urllib.request.Request(f"http://127.0.0.1:{management_port}/api/queues")
    request.add_header("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")  # guest:guest
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return {q["name"]: int(q.get("messages", 0)) for q in json.load(reply)}
    except OSError:
        return {}


def folder_mb(path: Path) -> float:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total / 1e6


def sample(root_pid: int, var: Path, ports: dict, started: float, sender: Sender) -> Sample:
    processes = stack_processes(root_pid, var)
    return Sample(
        at=time.monotonic() - started,
        rss={name: sum(map(rss_mb, pids)) for name, pids in processes.items()},
        fds={name: sum(map(fd_count, pids)) for name, pids in processes.items()},
        queues={k: v for k, v in queue_depths(ports["management"]).items() if k.startswith("mailferry")},
        incoming=sum(1 for p in (var / "spool" / "incoming").iterdir() if p.suffix in (".eml", ".seg")),
        storage_mb=folder_mb(var / "storage"), sent=len(sender.accepted))


def drift(samples: list[Sample], warm_up: float, value) -> float | None:
    """Change of the least-squares line through the samples after ``warm_up`` seconds, from
    the first to the last of them, as a share of the line's start."""
    points = [(s.at, value(s)) for s in samples if s.at >= warm_up]
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in points) / var_t if var_t else 0.0
    start = mean_v + slope * (points[0][0] - mean_t)
    end = mean_v + slope * (points[-1][0] - mean_t)
    return (end - start) / start if start else None


def stored_ids(database: Path) -> tuple[int, set[str]]:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30) as conn:
        rows = [r[0] for r in conn.execute(
            "SELECT message_id FROM email_message WHERE message_id LIKE '<soak-%'")]
    return len(rows), set(rows)


def consumer_count(port: int, outcome: str) -> float:
    """``mailferry_emails_total{outcome=…}`` of the consumer's /metrics (smtp), all kinds."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    except OSError:
        return float("nan")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mailferry_emails_total{") and f'outcome="{outcome}"' in line
               and 'source="smtp"' in line)  # one series per kind


def plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    minutes = [s.at / 60 for s in samples]
    names = sorted({n for s in samples for n in s.rss})
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    for name in names:
        top.plot(minutes, [s.rss.get(name, 0) for s in samples], marker=".", label=name)
        middle.plot(minutes, [s.fds.get(name, 0) for s in samples], marker=".", label=name)
    top.set_ylabel("RSS (MB)")
    middle.set_ylabel("open fds")
    for queue in sorted({q for s in samples for q in s.queues}):
        bottom.plot(minutes, [s.queues.get(queue, 0) for s in samples], label=queue)
    bottom.plot(minutes, [s.incoming for s in samples], label="spool/incoming", linestyle="--")
    bottom.set_ylabel("messages waiting")
    bottom.set_xlabel("minutes")
    for axis in (top, middle, bottom):
        axis.grid(alpha=0.3)
        axis.legend(fontsize="small", loc="upper left")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=50, help="messages per second over SMTP")
    parser.add_argument("--sample", type=float, default=60, help="seconds between samples")
    parser.add_argument("--warm-up", type=float, default=300, help="seconds left out of the drift")
    parser.add_argument("--plot", type=Path, help="write a PNG of the samples here")
    args = parser.parse_args()
    with running_stack("soak-") as (stack, var, ports, env, log_path):
        return soak(args, stack, var, ports, env, log_path)


@contextlib.contextmanager
def running_stack(prefix: str):
    """`make run` on a fresh var/ and free ports, until it says it is running: (the make
    process, var, ports, its environment, its log). Stopped on the way out."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        var = Path(tmp) / "var"
        ports = {name: free_port() for name in ("amqp", "management", "smtp", "consumer",
                                                "scheduler", "relay", "webhooks")}
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
        env.update({
            "MAILFERRY_VAR_DIR": str(var), "MAILFERRY_RUN_AMQP_PORT": str(ports["amqp"]),
            "MAILFERRY_RUN_MANAGEMENT_PORT": str(ports["management"]),
            "MAILFERRY_RUN_SMTP_PORT": str(ports["smtp"]),
            "MAILFERRY_CONSUMER_METRICS_PORT": str(ports["consumer"]),
            "MAILFERRY_SCHEDULER_METRICS_PORT": str(ports["scheduler"]),
            "MAILFERRY_RELAY_METRICS_PORT": str(ports["relay"]),
            "MAILFERRY_WEBHOOK_METRICS_PORT": str(ports["webhooks"]),
        })
        log_path = Path(tmp) / "make-run.log"
        log = open(log_path, "w")
        stack = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "Mailferry is running" not in log_path.read_text(errors="replace"):
                if stack.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the stack did not start:\n" +
                                       log_path.read_text(errors="replace")[-3000:])
                time.sleep(0.5)
            yield stack, var, ports, env, log_path
        finally:
            os.killpg(stack.pid, signal.SIGTERM)
            try:
                stack.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(stack.pid, signal.SIGKILL)
            log.close()


def soak(args, stack: subprocess.Popen, var: Path, ports: dict, env: dict, log_path: Path) -> int:
    subprocess.run([sys.executable, "-m", "mailferry.cli", "users", "add", USER], cwd=ROOT,
                   env=dict(env, PYTHONPATH=str(ROOT)), check=True, capture_output=True)
    sender = Sender(ports["smtp"], args.rate)
    thread = threading.Thread(target=sender.run, daemon=True)
    started = time.monotonic()
    thread.start()
    samples = [sample(stack.pid, var, ports, started, sender)]
    end = started + args.minutes * 60
    while time.monotonic() < end:
        time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
        samples.append(sample(stack.pid, var, ports, started, sender))
        s = samples[-1]
        print(f"  {s.at / 60:5.1f} min: sent {s.sent}, RSS " +
              ", ".join(f"{n} {v:.0f}" for n, v in sorted(s.rss.items())) + " MB; fds " +
              ", ".join(f"{n} {v}" for n, v in sorted(s.fds.items())) +
              f"; incoming {s.incoming}; queues {sum(s.queues.values())}", flush=True)
    sender.stop.set()
    thread.join(60)
    sent = set(sender.accepted)
    database = var / "mailferry.db"
    drained_by = time.monotonic() + 300
    while True:
        rows, ids = stored_ids(database)
        if sent <= ids or time.monotonic() > drained_by:
            break
        time.sleep(1)
    lost, doubled = sorted(sent - ids), rows - len(ids)
    redelivered = consumer_count(ports["consumer"], "duplicate")
    seconds = samples[-1].at
    print(f"soak: {args.minutes:g} min at {args.rate:g} msg/s over SMTP: {len(sent)} accepted "
          f"({len(sent) / seconds:.1f} msg/s), {sender.deferred} deferred (4xx, retried), "
          f"{len(sender.errors)} sender errors")
    print(f"  lost {len(lost)}, stored twice {doubled} (goal: none); deliveries the consumer "
          f"saw again and absorbed as duplicates: {redelivered:g}")
    names = sorted({n for s in samples for n in s.rss})
    print(f"  drift after {args.warm_up:g} s of warm-up (least squares, first to last sample):")
    for name in names:
        r = drift(samples, args.warm_up, lambda s: s.rss.get(name, 0.0))
        f = drift(samples, args.warm_up, lambda s: s.fds.get(name, 0))
        last = samples[-1]
        print(f"    {name:<10} RSS {last.rss.get(name, 0):6.0f} MB  drift {_pct(r):>7}   "
              f"fds {last.fds.get(name, 0):4d}  drift {_pct(f):>7}")
    print(f"  spool/incoming at the end of the load {samples[-1].incoming}; storage "
          f"{samples[-1].storage_mb:.0f} MB; deepest queue "
          f"{max((max(s.queues.values(), default=0) for s in samples), default=0)}")
    if sender.errors:
        print("  first sender errors:", sender.errors[:5])
    if args.plot:
        plot(samples, args.plot, f"Mailferry soak: {args.minutes:g} min at {args.rate:g} msg/s")
        print(f"  plot: {args.plot}")
    return 0 if not lost and not doubled else 1


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f} %"


if __name__ == "__main__":
    raise SystemExit(main())
