"""`mailferry imap set|show|test` and `mailferry fetch`, run in-process against real Dovecot."""

from __future__ import annotations

import io
import json
import sys

import pytest

from mailferry import tasks
from mailferry.cli import main
from mailferry.models import EmailMessage, EmailTask, Settings as SettingsRow, TaskSource, TaskStatus, User
from tests.imap_fixtures import append, generated


@pytest.fixture
def cli(settings, monkeypatch):
    """Run `mailferry …` on the test's settings; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("MAILFERRY_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("MAILFERRY_DATABASE_URL", settings.resolved_database_url)

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        monkeypatch.setattr(sys, "stdout", out)
        monkeypatch.setattr(sys, "stderr", err)
        code = main(list(argv))
        return code, out.getvalue(), err.getvalue()
    return run


@pytest.fixture
def bob(settings, imap_account):
    return User.create(email="bob@example.org"), imap_account


def set_args(account, *extra: str) -> list[str]:
    return ["imap", "set", "bob@example.org", "--host", account.host, "--port", str(account.port),
            "--username", account.username, "--password-stdin", "--security", "none", *extra]


def test_set_then_show_never_prints_the_password(cli, bob):
    user, account = bob
    code, out, _ = cli(*set_args(account, "--folder", "INBOX"), stdin=account.password + "\n")
    assert code == 0 and "password stored encrypted" in out

    code, out, _ = cli("imap", "show", "bob@example.org")
    assert code == 0
    assert account.host in out and account.username in out and "(set)" in out
    assert account.password not in out
    code, out, _ = cli("imap", "show", "bob@example.org", "--json")
    shown = json.loads(out)
    assert shown["imap_config"]["password"] == "(set)" and shown["imap_config"]["port"] == account.port
    stored = SettingsRow.get(SettingsRow.user == user).value
    assert account.password not in json.dumps(stored)


def test_set_refuses_an_invalid_configuration_naming_the_field(cli, bob):
    _, account = bob
    args = set_args(account)
    args[args.index("--port") + 1] = "70000"
    code, _, err = cli(*args, stdin="pw\n")
    assert code == 1 and "imap_config.port" in err and "65535" in err
    assert SettingsRow.select().count() == 0


def test_set_without_a_password_keeps_the_stored_one(cli, bob):
    _, account = bob
    cli(*set_args(account), stdin=account.password + "\n")
    args = [a for a in set_args(account, "--folder", "Archive") if a != "--password-stdin"]
    code, _, _ = cli(*args)
    assert code == 0
    code, out, _ = cli("imap", "show", "bob@example.org", "--json")
    assert json.loads(out)["imap_config"]["folder"] == "Archive"
    code, out, err = cli("imap", "test", "bob@example.org")
    assert code == 1 and "Archive" in err  # the folder does not exist; the login worked


def test_imap_test_logs_in_and_reports_the_folder(cli, bob):
    _, account = bob
    append(account, generated(0, 5))
    cli(*set_args(account), stdin=account.password + "\n")
    code, out, _ = cli("imap", "test", "bob@example.org")
    assert code == 0
    assert "folder INBOX: 5 message(s)" in out and "CONDSTORE" in out


def test_imap_test_with_a_wrong_password_says_so(cli, bob):
    _, account = bob
    cli(*set_args(account), stdin="wrong\n")
    code, _, err = cli("imap", "test", "bob@example.org")
    assert code == 1 and "login refused" in err


def test_fetch_runs_one_task_in_the_foreground_with_progress(cli, bob, settings):
    user, account = bob
    append(account, generated(0, 25))
    cli(*set_args(account), stdin=account.password + "\n")

    code, out, err = cli("fetch", "bob@example.org")

    assert code == 0
    assert "25/25" in err and "(100%)" in err
    assert "COMPLETED; fetched 25, saved 25, failed 0" in out
    assert EmailMessage.select().where(EmailMessage.user == user).count() == 25
    task = EmailTask.get()
    assert task.status == TaskStatus.COMPLETED and task.details["origin"] == "cli"
    code, _, err = cli("fetch", "bob@example.org")
    assert code == 0 and "nothing new" in err


def test_fetch_while_a_task_is_in_flight_is_refused(cli, bob):
    user, account = bob
    cli(*set_args(account), stdin=account.password + "\n")
    held = tasks.create_task(TaskSource.IMAP, user.id)
    code, _, err = cli("fetch", "bob@example.org")
    assert code == 1 and held.task_id in err
    assert EmailMessage.select().count() == 0


def test_set_idle_and_no_idle_and_left_to_the_consumers_default(cli, bob):
    _, account = bob
    seen = []
    for flag in ("--idle", "--no-idle", None):
        code, _, _ = cli(*set_args(account, *([flag] if flag else [])), stdin=account.password + "\n")
        assert code == 0
        code, out, _ = cli("imap", "show", "bob@example.org", "--json")
        seen.append(json.loads(out)["imap_config"]["idle"])
    assert seen == [True, False, None]
    from mailferry.mailbox_config import validate_imap_config  # None follows imap_idle:
    unset = validate_imap_config({"host": "h", "port": 143, "username": "u", "password": "p"})
    assert [unset.wants_idle(d) for d in ("off", "per-mailbox", "all")] == [False, False, True]
