"""`make run`: the whole Mailferry stack on one machine, in the foreground.

RabbitMQ (management UI on), Haraka with the mailferry plugin, the consumer and the scheduler,
on the embedded defaults (SQLite and folders under var/). RabbitMQ and Haraka are started with
the same native launchers the tests use (devstack/), with fixed ports and data kept in
var/ across runs. A consumer or scheduler that exits is restarted, with backoff. Ctrl-C stops
everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
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


def rabbitmq_for(var: Path) -> RabbitMQServer | None:
    """The node `make run` starts, or None when a broker already listens on the port."""
    if port_open(AMQP_PORT):
        print(f"RabbitMQ: already listening on 127.0.0.1:{AMQP_PORT}, using it")
        return None
    server = RabbitMQServer(var / "rabbitmq")
    # A name fixed for this var/ keeps the data of earlier runs; two checkouts (or a soak
    # beside a test) each get their own node instead of finding the other's.
    server.node = f"mailferry-{hashlib.sha1(str(var).encode()).hexdigest()[:8]}@localhost"
    server.amqp_port, server.management_port = AMQP_PORT, MANAGEMENT_PORT
    return server


class Stopping(Exception):
    """The first SIGINT or SIGTERM while the stack is still starting: it interrupts the
    start (a RabbitMQ node can take many seconds to come up)."""


class Signals:
    """Ctrl-C (SIGINT to the whole process group) or SIGTERM (to this process alone): the first
    stops the stack in order; a second, while that runs, kills what is left at once. Haraka
    runs in its own session, so only this process can stop it: it must never be skipped.

    Once the stack is up, a signal only sets ``stopping``: an exception raised between two
    bytecodes of ``Popen.poll()`` can leave its internal lock held, and the stop's own wait
    for that process would then block forever."""

    def __init__(self, stack: "Stack"):
        self.stack = stack
        self.stopping = threading.Event()
        self.starting = True
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self.handle)

    def handle(self, signum, frame) -> None:
        if not self.stopping.is_set():
            self.stopping.set()
            if self.starting:
                raise Stopping(signal.Signals(signum).name)
            return
        print("\nsecond signal: killing what is left", flush=True)
        self.stack.kill()
        os._exit(1)


class Stack:
    """What `make run` started. Stopped with Haraka first (no new mail) while the Python
    processes drain, all at once so the slowest sets the time, and RabbitMQ last."""

    STOP_TIMEOUT = 15.0  # seconds the Python processes get to drain before they are killed

    def __init__(self):
        self.rabbit: RabbitMQServer | None = None
        self.haraka: HarakaServer | None = None
        self.haraka_group: int | None = None  # kept apart: haraka.stop() forgets its process
        self.processes: list[Supervised] = []

    def stop(self) -> str:
        """Stop everything; returns how long each part took, for the last line printed (a
        slow stop then says which part was slow)."""
        took: dict[str, float] = {}
        t0 = time.monotonic()
        haraka = threading.Thread(target=self._timed, args=("Haraka", self.haraka, took))
        haraka.start()
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(max(0.1, t0 + self.STOP_TIMEOUT - time.monotonic()))
        took["Python processes"] = time.monotonic() - t0
        haraka.join()
        self._timed("RabbitMQ", self.rabbit, took)
        return ", ".join(f"{name} {seconds:.1f} s" for name, seconds in took.items())

    @staticmethod
    def _timed(name: str, part, took: dict) -> None:
        if part is not None:
            t0 = time.monotonic()
            part.stop()
            took[name] = time.monotonic() - t0

    def kill(self) -> None:
        for process in self.processes:
            process.kill()
        if self.haraka_group is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.haraka_group, signal.SIGKILL)
        if self.rabbit is not None:
            self.rabbit.kill()


def main() -> int:
    os.chdir(ROOT)
    settings = settings_or_exit()
    os.umask(0o077)  # var/, the database, the spool and the logs are this user's alone
    var = settings.var_dir.resolve()
    var.mkdir(parents=True, exist_ok=True, mode=0o700)
    stack = Stack()
    signals = Signals(stack)
    try:
        start(stack, settings, var)
        signals.starting = False
        while not signals.stopping.wait(0.5):
            for process in stack.processes:
                process.keep_running()
    except Stopping:
        pass
    finally:
        signals.starting = False
        signals.stopping.set()  # from here on a signal forces
        print("\nstopping …", flush=True)
        took = stack.stop()
        print(f"stopped ({took})", flush=True)
    return 0


def start(stack: Stack, settings, var: Path) -> None:
    print("starting RabbitMQ …", flush=True)
    stack.rabbit = rabbitmq_for(var)
    if stack.rabbit is not None:
        stack.rabbit.start()
    amqp_url = settings.amqp_url if stack.rabbit is None else stack.rabbit.amqp_url
    env = dict(os.environ, MAILFERRY_AMQP_URL=amqp_url, PYTHONPATH=str(ROOT))
    env.setdefault("MAILFERRY_MANAGEMENT_URL", f"http://guest:guest@127.0.0.1:{MANAGEMENT_PORT}")
    # The consumer declares the queues; Haraka's plugin only checks the exchange.
    subprocess.run([sys.executable, "-c", "from mailferry.app import bootstrap; "
                    "bootstrap(topology=True, quiet=True)"], env=env, check=True)
    for name in ("consumer", "scheduler", "relay", "consumer.webhook_worker", "api"):
        stack.processes.append(Supervised(name, [sys.executable, "-m", name], env))
    print("starting Haraka …", flush=True)
    stack.haraka = HarakaServer(var / "haraka", amqp_url, settings.resolved_spool_dir,
                                port=SMTP_PORT)
    stack.haraka.log_path = var / "haraka.log"
    stack.haraka.start()
    stack.haraka_group = stack.haraka.process.pid  # its own session: group id = its pid
    print_banner(settings, amqp_url)


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
        # Ctrl-C reaches the whole process group; a child still importing would die of it
        # with a KeyboardInterrupt traceback. Started with SIGINT ignored, each child stops on
        # the SIGTERM this supervisor sends, or on SIGINT once its own handler is in place.
        self.process = subprocess.Popen(self.argv, env=self.env, preexec_fn=_ignore_sigint)
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

    def wait(self, timeout: float) -> None:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"{self.name}: did not stop in time, killing it", flush=True)
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
