"""`make run` survives hostile mail: the real stack (RabbitMQ, Haraka, consumer, scheduler on
SQLite and var/), driven over SMTP with the messages that used to stop it, still answers."""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.harness.fixtures import require_service
from devstack.haraka import haraka_available
from devstack.ports import free_port, listening, pids_with_env, terminate_pids
from devstack.rabbitmq import rabbitmq_available
from tests.pipeline import ROOT, wait_for
from tests.test_hostile_input import HOSTILE_HEADERS, hostile
from tests.test_smtp_pipeline import crlf


PORTS = {"amqp": "MAILFERRY_RUN_AMQP_PORT", "management": "MAILFERRY_RUN_MANAGEMENT_PORT",
         "smtp": "MAILFERRY_RUN_SMTP_PORT", "consumer": "MAILFERRY_CONSUMER_METRICS_PORT",
         "scheduler": "MAILFERRY_SCHEDULER_METRICS_PORT", "relay": "MAILFERRY_RELAY_METRICS_PORT",
         "webhook": "MAILFERRY_WEBHOOK_METRICS_PORT", "api": "MAILFERRY_API_PORT"}


def start_make_run(tmp_path):
    """The real `make run` on free ports and tmp_path/var, in its own process group (as a
    terminal's foreground job is); returns (env, ports, output lines, the make process)."""
    if not haraka_available():
        require_service("Haraka", "haraka_plugin/node_modules or node is missing")
    if not rabbitmq_available():
        require_service("RabbitMQ", "rabbitmq-server is not installed")
    ports = {name: free_port() for name in PORTS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
    env.update({variable: str(ports[name]) for name, variable in PORTS.items()})
    env.update({
        "MAILFERRY_VAR_DIR": str(tmp_path / "var"),
        "MAILFERRY_SCHEDULE_INTERVAL": "5",
        "MAILFERRY_SPOOL_SWEEP_AGE": "10",
    })
    output: list[str] = []
    process = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    wait_for(lambda: any("Mailferry is running" in line for line in output) or
             process.poll() is not None, timeout=120, interval=0.5, message="make run up")
    assert process.poll() is None, "".join(output[-50:])
    return env, ports, output, process


def started_by(env) -> list[int]:
    """Every process the stack started: each inherits its MAILFERRY_VAR_DIR (Haraka and
    RabbitMQ too, though they run in sessions of their own)."""
    return pids_with_env("MAILFERRY_VAR_DIR", env["MAILFERRY_VAR_DIR"])


def end(env, process) -> None:
    """Leave nothing behind, whatever the test did."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    terminate_pids(started_by(env), grace=5)


@pytest.fixture
def stack(tmp_path):
    env, ports, output, process = start_make_run(tmp_path)
    try:
        yield env, ports, output, process
    finally:
        end(env, process)


def cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailferry.cli", *args], cwd=ROOT,
                          env=dict(env, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=60)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_make_run_stores_hostile_mail_and_keeps_answering(stack):
    env, ports, output, process = stack
    added = cli(env, "users", "add", "bob@example.org")
    assert added.returncode == 0, added.stderr
    escape = (b"Subject: =?utf-8?q?=1B]0;owned=07=1B[31mred_=E2=80=AEgpj.exe?=\r\n"
              b"From: a@example.net\r\nTo: bob@example.org\r\n\r\nhi\r\n")
    messages = [escape]
    for n, name in enumerate(HOSTILE_HEADERS):
        messages += [hostile(name, n), b"Subject: good " + str(n).encode()
                     + b"\r\nFrom: a@example.net\r\nTo: bob@example.org\r\n\r\nhi\r\n"]
    smtp = smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30)
    try:
        for raw in messages:
            assert smtp.sendmail("sender@example.net", ["bob@example.org"], crlf(raw)) == {}
    finally:
        smtp.quit()
    wanted = len(messages)

    def stored():
        listed = cli(env, "messages", "--json")
        return listed.returncode == 0 and listed.stdout.count('"message_id"') >= wanted

    wait_for(stored, timeout=60, interval=1, message="every message stored")
    # Two scheduler ticks (sweeps included) after the mail: everyone still up and ready.
    time.sleep(12)
    assert process.poll() is None, "".join(output[-50:])
    assert not [line for line in output if "exited with" in line], "".join(output[-50:])
    assert ready(ports["consumer"]) and ready(ports["scheduler"])
    incoming = os.path.join(env["MAILFERRY_VAR_DIR"], "spool", "incoming")
    # Every message was stored (above); its segment stays until the sweep finds it unwritten
    # for spool_segment_idle, and nothing else waits in incoming/.
    assert [name for name in os.listdir(incoming) if not name.endswith(".seg")] == []
    table = cli(env, "messages").stdout
    assert "\x1b" not in table and "\u202e" not in table and "\x07" not in table
    assert "\\x1b]0;owned\\x07\\x1b[31mred \\u202egpj.exe" in table  # shown, escaped


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:120]
    except OSError:
        return f"{pid} (gone)"


def stopped(env, ports, process, output, timeout: float) -> float:
    """Seconds until `make run` exited and nothing it started runs or listens any more; a
    failure names what was left and shows the stack's last lines (the stop times among them)."""
    t0 = time.monotonic()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        pass

    def gone():
        return not started_by(env) and not any(listening(p) for p in ports.values())

    deadline = t0 + timeout
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    if not gone():
        left = [command_line(pid) for pid in started_by(env)]
        raise AssertionError(f"after {timeout} s still running: {left}; listening: "
                             f"{[n for n, p in ports.items() if listening(p)]}; last lines:\n"
                             + "".join(output[-15:]))
    return time.monotonic() - t0


@pytest.mark.parametrize("how", ["ctrl-c to the process group", "sigterm to make alone"])
def test_one_signal_stops_everything_make_run_started_without_a_traceback(tmp_path, how):
    env, ports, output, process = start_make_run(tmp_path)
    try:
        assert len(started_by(env)) >= 7  # five Python processes, Haraka, RabbitMQ
        if how.startswith("ctrl-c"):
            os.killpg(process.pid, signal.SIGINT)
        else:
            process.send_signal(signal.SIGTERM)
        assert stopped(env, ports, process, output, timeout=30) <= 30
        text = "".join(output)
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
        assert "stopped" in output[-1], text[-3000:]
    finally:
        end(env, process)


def test_a_second_signal_kills_what_is_left_at_once(tmp_path):
    env, ports, output, process = start_make_run(tmp_path)
    try:
        launcher = next(pid for pid in started_by(env) if b"run_stack.py" in
                        open(f"/proc/{pid}/cmdline", "rb").read())
        os.kill(launcher, signal.SIGTERM)
        wait_for(lambda: any("stopping" in line for line in output), timeout=10, interval=0.05,
                 message="the stop begun")
        os.kill(launcher, signal.SIGTERM)
        assert stopped(env, ports, process, output, timeout=15) <= 15
        assert any("second signal: killing what is left" in line for line in output)
        assert "Traceback" not in "".join(output), "".join(output)[-3000:]
    finally:
        end(env, process)
