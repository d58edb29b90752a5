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
from devstack.ports import free_port
from devstack.rabbitmq import rabbitmq_available
from tests.pipeline import ROOT, wait_for
from tests.test_hostile_input import HOSTILE_HEADERS, hostile
from tests.test_smtp_pipeline import crlf


@pytest.fixture
def stack(tmp_path):
    if not haraka_available():
        require_service("Haraka", "haraka_plugin/node_modules or node is missing")
    if not rabbitmq_available():
        require_service("RabbitMQ", "rabbitmq-server is not installed")
    ports = {name: free_port() for name in ("amqp", "management", "smtp", "consumer", "scheduler")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILFERRY_")}
    env.update({
        "MAILFERRY_VAR_DIR": str(tmp_path / "var"),
        "MAILFERRY_RUN_AMQP_PORT": str(ports["amqp"]),
        "MAILFERRY_RUN_MANAGEMENT_PORT": str(ports["management"]),
        "MAILFERRY_RUN_SMTP_PORT": str(ports["smtp"]),
        "MAILFERRY_CONSUMER_METRICS_PORT": str(ports["consumer"]),
        "MAILFERRY_SCHEDULER_METRICS_PORT": str(ports["scheduler"]),
        "MAILFERRY_SCHEDULE_INTERVAL": "5",
        "MAILFERRY_SPOOL_SWEEP_AGE": "10",
    })
    output: list[str] = []
    process = subprocess.Popen(["make", "--no-print-directory", "run"], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
    reader.start()
    try:
        wait_for(lambda: any("Mailferry is running" in line for line in output) or
                 process.poll() is not None, timeout=120, interval=0.5, message="make run up")
        assert process.poll() is None, "".join(output[-50:])
        yield env, ports, output, process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


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
    assert os.listdir(incoming) == []
    table = cli(env, "messages").stdout
    assert "\x1b" not in table and "\u202e" not in table and "\x07" not in table
    assert "\\x1b]0;owned\\x07\\x1b[31mred \\u202egpj.exe" in table  # shown, escaped
