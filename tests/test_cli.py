"""The `mailferry` command line, run as an operator runs it (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

from devstack import mailgen
from tests.pipeline import ROOT, consumer_thread, settings_env, wait_for


def mailferry(settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mailferry.cli", *args], env=settings_env(settings),
                          capture_output=True, text=True, cwd=ROOT, input=stdin, timeout=60)


def test_users_and_aliases(settings):
    assert mailferry(settings, "users", "add", "Bob@Example.org").returncode == 0
    again = mailferry(settings, "users", "add", "bob@example.org")
    assert again.returncode == 1 and "exists already" in again.stderr
    assert mailferry(settings, "aliases", "add", "bob@example.org", "help@example.org").returncode == 0
    missing = mailferry(settings, "aliases", "add", "nobody@example.org", "x@example.org")
    assert missing.returncode == 1 and "no user nobody@example.org" in missing.stderr
    bad = mailferry(settings, "users", "add", "not an address")
    assert bad.returncode == 1 and "is not an email address" in bad.stderr
    listed = json.loads(mailferry(settings, "users", "list", "--json").stdout)
    assert listed == [{"id": listed[0]["id"], "email": "bob@example.org", "active": True,
                       "aliases": ["help@example.org"]}]
    table = mailferry(settings, "users", "list").stdout
    assert "bob@example.org" in table and "help@example.org" in table


def test_inject_then_messages_lists_what_was_stored(broker_settings, tmp_path):
    settings = broker_settings
    assert mailferry(settings, "users", "add", "bob@example.org").returncode == 0
    eml = tmp_path / "with-attachment.eml"
    eml.write_bytes(mailgen.with_attachment(1, "report.pdf", b"%PDF-1.4 test", content_type="application/pdf"))
    bcc = tmp_path / "plain.eml"
    bcc.write_bytes(mailgen.plain(2, to="someone@else.org"))
    injected = mailferry(settings, "inject", str(eml), str(bcc), "--rcpt", "bob@example.org")
    assert injected.returncode == 0, injected.stderr
    assert injected.stdout.count("queued as") == 2
    with consumer_thread(settings):
        rows = wait_for(lambda: (lambda out: out if len(out) == 2 else None)(
            json.loads(mailferry(settings, "messages", "--json").stdout)), timeout=30)
    by_subject = {row["subject"]: row for row in rows}
    attachment = by_subject["Attachment 1"]["attachments"][0]
    assert attachment["filename"] == "report.pdf" and attachment["safe_filename"] == "report.pdf"
    assert attachment["content_type"] == "application/pdf" and attachment["size"] == 13
    assert len(attachment["sha256"]) == 64
    assert by_subject["Test message 2"]["user"] == "bob@example.org"
    only_bob = json.loads(mailferry(settings, "messages", "--user", "BOB@example.org", "--json").stdout)
    assert len(only_bob) == 2
    assert "report.pdf" in mailferry(settings, "messages").stdout


def test_inject_without_recipients_says_why(broker_settings, tmp_path):
    eml = tmp_path / "no-rcpt.eml"
    eml.write_bytes(b"Subject: nobody\r\n\r\nbody")
    result = mailferry(broker_settings, "inject", str(eml))
    assert result.returncode == 1
    assert "no recipients" in result.stderr


def test_inject_with_the_broker_down_fails_and_leaves_no_spool_file(settings, tmp_path):
    eml = tmp_path / "m.eml"
    eml.write_bytes(mailgen.plain(1))
    result = mailferry(settings, "inject", str(eml))  # settings' broker URL points nowhere
    assert result.returncode == 1
    assert "RabbitMQ unreachable" in result.stderr
    assert list((settings.resolved_spool_dir / "incoming").glob("*.eml")) == []


def test_config_lists_settings_without_secrets(settings):
    env_settings = settings.replace(amqp_url="amqp://user:hunter2@127.0.0.1:5672/%2F")
    result = mailferry(env_settings, "config", "--json")
    rows = {row["variable"]: row["value"] for row in json.loads(result.stdout)}
    assert rows["MAILFERRY_AMQP_URL"] == "amqp://user:***@127.0.0.1:5672/%2F"
    assert "hunter2" not in result.stdout
