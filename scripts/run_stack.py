"""`make run`: the whole Mailferry stack on one machine, in the foreground.

RabbitMQ (management UI on), Haraka with the mailferry plugin, the consumer and the scheduler,
on the embedded defaults (SQLite and folders under var/). RabbitMQ and Haraka are started with
the same native launchers the tests use (devstack/), with fixed ports and data kept in
var/ across runs. A consumer or scheduler that exits is restarted, with backoff. Ctrl-C stops
everything.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mailferry.app import settings_or_exit  # noqa: E402
from mailferry.config import redact_url  # noqa: E402
from devstack.haraka import HarakaServer  # noqa: E402
from devstack.ports import port_open  # noqa: E402
from devstack.rabbitmq import RabbitMQServer  # noqa: E402

AMQP_PORT = int(os.environ.get("MAILFERRY_RUN_AMQP_PORT", "5672"))
MANAGEMENT_PORT = int(os.environ.get("MAILFERRY_RUN_MANAGEMENT_PORT", "15672"))
SMTP_PORT = int(os.environ.get("MAILFERRY_RUN_SMTP_PORT", "2525"))


def start_rabbitmq(var: Path) -> RabbitMQServer | None:
    if port_open(AMQP_PORT):
        print(f"RabbitMQ: already listening on 127.0.0.1:{AMQP_PORT}, using it")
        return None
    server = RabbitMQServer(var / "rabbitmq")
    # A name fixed for this var/ keeps the data of earlier runs; two checkouts (or a soak
    # beside a test) each get their own node instead of finding the other's.
    server.node = f"mailferry-{hashlib.sha1(str(var).encode()).hexdigest()[:8]}@localhost"
    server.amqp_port, server.management_port = AMQP_PORT, MANAGEMENT_PORT
    server.start()
    return server


def main() -> int:
    os.chdir(ROOT)
    settings = settings_or_exit()
    os.umask(0o077)  # var/, the database, the spool and the logs are this user's alone
    var = settings.var_dir.resolve()
    var.mkdir(parents=True, exist_ok=True, mode=0o700)
    print("starting RabbitMQ …", flush=True)
    rabbit = start_rabbitmq(var)
    amqp_url = settings.amqp_url if rabbit is None else rabbit.amqp_url
    env = dict(os.environ, MAILFERRY_AMQP_URL=amqp_url, PYTHONPATH=str(ROOT))
    env.setdefault("MAILFERRY_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{MANAGEMENT_PORT}")
    processes: list[tuple[str, subprocess.Popen]] = []
    haraka = None
    try:
        # The consumer declares the queues; Haraka's plugin only checks the exchange.
        subprocess.run([sys.executable, "-c", "from mailferry.app import bootstrap; "
                        "bootstrap(topology=True, quiet=True)"], env=env, check=True)
        for name in ("consumer", "scheduler", "relay", "consumer.webhook_worker", "api"):
            processes.append(Supervised(name, [sys.executable, "-m", name], env))
        print("starting Haraka …", flush=True)
        haraka = HarakaServer(var / "haraka", amqp_url, settings.resolved_spool_dir, port=SMTP_PORT)
        haraka.log_path = var / "haraka.log"
        haraka.start()
        print_banner(settings, amqp_url)
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        while not stop:
            for process in processes:
                process.keep_running()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("\nstopping …", flush=True)
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait()
        if haraka is not None:
            haraka.stop()
        if rabbit is not None:
            rabbit.stop()
    return 0


class Supervised:
    """A process of the stack that is restarted when it exits, after a growing pause (1 s,
    doubling to RESTART_BACKOFF_MAX, back to 1 s once it ran a minute): one crash must not
    stop the stack, and a crash loop must not spin."""

    RESTART_BACKOFF_MAX = 60.0
    STABLE_AFTER = 60.0

    def __init__(self, name: str, argv: list[str], env: dict):
        self.name, self.argv, self.env = name, argv, env
        self.backoff = 1.0
        self.restart_at: float | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen(self.argv, env=self.env)
        self.started = time.monotonic()
        self.restart_at = None

    def keep_running(self) -> None:
        if self.process.poll() is None:
            return
        now = time.monotonic()
        if self.restart_at is None:
            if now - self.started > self.STABLE_AFTER:
                self.backoff = 1.0
            self.restart_at = now + self.backoff
            print(f"{self.name} exited with {self.process.returncode}; restarting in "
                  f"{self.backoff:.0f} s", flush=True)
            self.backoff = min(self.backoff * 2, self.RESTART_BACKOFF_MAX)
        elif now >= self.restart_at:
            print(f"{self.name}: restarting", flush=True)
            self.start()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait(self) -> None:
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


def print_banner(settings, amqp_url: str) -> None:
    host = settings.metrics_host
    lines = [
        "",
        "Mailferry is running:",
        f"  SMTP (Haraka + plugin)   127.0.0.1:{SMTP_PORT}",
        f"  RabbitMQ                 {redact_url(amqp_url)}",
        f"  Management UI            http://127.0.0.1:{MANAGEMENT_PORT}  (guest / guest)",
        f"  Consumer metrics         http://{host}:{settings.consumer_metrics_port}/metrics",
        f"  Scheduler metrics        http://{host}:{settings.scheduler_metrics_port}/metrics",
        f"  Relay (events) metrics   http://{host}:{settings.relay_metrics_port}/metrics",
        f"  Webhook worker metrics   http://{host}:{settings.webhook_metrics_port}/metrics",
        f"  Read API (+ /docs)       {settings.resolved_api_base_url}  "
        "(token: .venv/bin/mailferry api-tokens create)",
        f"  Database                 {redact_url(settings.resolved_database_url)}",
        f"  Spool / storage          {settings.resolved_spool_dir} / {settings.resolved_storage_dir}",
        "",
        "Try it:",
        "  .venv/bin/mailferry users add bob@example.org",
        f"  swaks --server 127.0.0.1:{SMTP_PORT} --to bob@example.org --attach README.md",
        "  .venv/bin/mailferry messages",
        "",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
