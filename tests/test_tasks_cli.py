"""`mailferry tasks`, `task`, `cleanup` and `stats` on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from mailferry import tasks
from mailferry.cli import main
from mailferry.models import AuditLog, EmailTask, TaskSource, TaskStatus, User, utcnow

S = TaskStatus


@pytest.fixture
def cli(settings, monkeypatch, capsys):
    monkeypatch.setenv("MAILFERRY_VAR_DIR", str(settings.var_dir))
    monkeypatch.setenv("MAILFERRY_DATABASE_URL", settings.resolved_database_url)

    def run(*argv) -> tuple[int, str]:
        capsys.readouterr()
        code = main(list(argv))
        return code, capsys.readouterr().out
    return run


@pytest.fixture
def some_tasks(settings):
    ann = User.create(email="ann@example.org")
    done = tasks.start_task(tasks.create_task(TaskSource.IMAP, ann.id).task_id)
    tasks.add_execution_log(done.task_id, "fetch", "fetched 3 messages from INBOX")
    tasks.complete_task(done.task_id, fetched=3, saved=3)
    failed = tasks.start_task(tasks.create_task(TaskSource.IMAP, ann.id).task_id)
    tasks.fail_task(failed.task_id, "IMAP login refused")
    pending = tasks.create_task(TaskSource.IMAP, ann.id)
    skipped = tasks.create_task(TaskSource.IMAP, ann.id)
    sweep = tasks.create_task(TaskSource.HARAKA, None)
    return {"done": done, "failed": failed, "pending": pending, "skipped": skipped, "sweep": sweep}


def test_tasks_lists_and_filters(cli, some_tasks):
    code, out = cli("tasks", "--json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 5
    assert {r["task_id"] for r in rows} == {t.task_id for t in some_tasks.values()}
    assert {r["user"] for r in rows} == {"ann@example.org", None}

    _, out = cli("tasks", "--status", "failed", "--json")
    assert [r["task_id"] for r in json.loads(out)] == [some_tasks["failed"].task_id]
    _, out = cli("tasks", "--source", "haraka", "--json")
    assert [r["task_id"] for r in json.loads(out)] == [some_tasks["sweep"].task_id]
    _, out = cli("tasks", "--user", "ANN@example.org", "--limit", "2", "--json")
    assert len(json.loads(out)) == 2

    _, table = cli("tasks")
    assert "IMAP login refused" in table and some_tasks["skipped"].task_id in table


def test_task_shows_one_task_with_its_execution_log(cli, some_tasks):
    done = some_tasks["done"]
    code, out = cli("task", done.task_id[:8])
    assert code == 0
    assert f"task_id:          {done.task_id}" in out
    assert "status:           COMPLETED" in out and "emails_saved:     3" in out
    assert out.index("PENDING → RUNNING") < out.index("fetched 3 messages") < out.index("→ COMPLETED")

    _, out = cli("task", some_tasks["skipped"].task_id, "--json")
    data = json.loads(out)
    assert data["status"] == S.SKIPPED
    assert some_tasks["pending"].task_id in data["execution_log"][0]["message"]

    assert cli("task", "no-such-task")[0] == 1


def test_cleanup_dry_run_then_for_real(cli, some_tasks):
    old = utcnow() - dt.timedelta(days=10)
    EmailTask.update(completed_at=old).where(
        EmailTask.task_id.in_([some_tasks["done"].task_id, some_tasks["failed"].task_id])).execute()

    code, out = cli("cleanup", "--dry-run", "--json")
    assert code == 0
    assert json.loads(out)["deleted"] == {S.COMPLETED: 1, S.FAILED: 1, S.CANCELLED: 0, S.SKIPPED: 0}
    assert EmailTask.select().count() == 5

    code, out = cli("cleanup")
    assert code == 0 and "deleted 2 task(s)" in out
    assert EmailTask.select().count() == 3
    assert AuditLog.select().count() == 2


def test_stats_gives_totals_past_timeout_and_recent_failures(cli, some_tasks):
    code, out = cli("stats", "--json")
    assert code == 0
    stats = json.loads(out)
    assert stats["by_status"] == {S.PENDING: 2, S.RUNNING: 0, S.COMPLETED: 1, S.FAILED: 1,
                                  S.CANCELLED: 0, S.SKIPPED: 1}
    assert (stats["total"], stats["failed_last_hour"], stats["running_past_timeout"]) == (5, 1, 0)
    _, text = cli("stats")
    assert "failed in the last hour: 1" in text and "running past timeout: 0" in text
