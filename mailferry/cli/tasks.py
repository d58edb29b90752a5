"""`mailferry tasks`, `mailferry task ID`, `mailferry stats`: the task table for operators
(`mailferry cleanup` is the scheduler's: scheduler/cli.py)."""

from __future__ import annotations

from peewee import JOIN

from mailferry.cli.common import open_app, print_json, print_table
from mailferry.errors import PermanentError
from mailferry.models import EmailTask, TaskSource, TaskStatus, User


def register(sub) -> None:
    ls = sub.add_parser("tasks", help="list fetch tasks, newest first")
    ls.add_argument("--status", type=str.upper, choices=TaskStatus.ALL)
    ls.add_argument("--source", type=_source, metavar="SOURCE",
                    help=f"{', '.join(TaskSource.ALL)} (or imap, haraka)")
    ls.add_argument("--user", metavar="EMAIL")
    ls.add_argument("--limit", type=int, default=50, help="newest N (0: all; default 50)")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=tasks_command)

    show = sub.add_parser("task", help="one task with its execution log")
    show.add_argument("task_id", metavar="ID", help="task id (a unique prefix is enough)")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=task_command)

    stats = sub.add_parser("stats", help="task totals by status, running past timeout, "
                                         "failed in the last hour")
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=stats_command)


def _source(value: str) -> str:
    aliases = {"imap": TaskSource.IMAP, "haraka": TaskSource.HARAKA, "smtp": TaskSource.HARAKA}
    source = aliases.get(value.lower(), value.upper())
    if source not in TaskSource.ALL:
        raise ValueError(value)
    return source


def task_row(task: EmailTask, user_email: str | None = None) -> dict:
    return {
        "task_id": task.task_id, "source": task.email_source, "user_id": task.user_id,
        "user": user_email, "status": task.status, "created_at": task.created_at,
        "started_at": task.started_at, "completed_at": task.completed_at,
        "timeout_at": task.timeout_at, "timeout_seconds": task.timeout_seconds,
        "emails_fetched": task.emails_fetched, "emails_saved": task.emails_saved,
        "emails_failed": task.emails_failed, "emails_processed": task.emails_processed,
        "error_message": task.error_message, "details": task.details,
    }


def _short_time(value) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def tasks_command(args) -> int:
    open_app()
    query = (EmailTask.select(EmailTask, User.email.alias("user_email"))
             .join(User, join_type=JOIN.LEFT_OUTER, on=(EmailTask.user == User.id))
             .order_by(EmailTask.created_at.desc(), EmailTask.id.desc()).objects())
    if args.status:
        query = query.where(EmailTask.status == args.status)
    if args.source:
        query = query.where(EmailTask.email_source == args.source)
    if args.user:
        query = query.where(User.email == args.user.strip().lower())
    if args.limit:
        query = query.limit(args.limit)
    rows = [task_row(t, t.user_email) for t in query]
    if args.json:
        print_json(rows)
        return 0
    print_table(["TASK", "SOURCE", "USER", "STATUS", "CREATED", "FETCHED", "SAVED", "FAILED", "ERROR"],
                [[r["task_id"], r["source"].split("_")[0], r["user"] or "-", r["status"],
                  _short_time(r["created_at"]), r["emails_fetched"], r["emails_saved"],
                  r["emails_failed"], (r["error_message"] or "")[:60]] for r in rows])
    return 0


def find_task(prefix: str) -> EmailTask:
    matches = list(EmailTask.select().where(EmailTask.task_id.startswith(prefix.strip())).limit(2))
    if not matches:
        raise PermanentError(f"no task {prefix}")
    if len(matches) > 1 and matches[0].task_id != prefix:
        raise PermanentError(f"{prefix} names more than one task; give more of the id")
    return matches[0]


def task_command(args) -> int:
    from mailferry.tasks import execution_log
    open_app()
    task = find_task(args.task_id)
    user = User.get_or_none(User.id == task.user_id) if task.user_id else None
    row = task_row(task, user.email if user else None)
    entries = [{"timestamp": e.timestamp, "step": e.step, "level": e.level, "message": e.message}
               for e in execution_log(task.task_id)]
    if args.json:
        print_json({**row, "execution_log": entries})
        return 0
    for key, value in row.items():
        if value not in (None, {}, ""):
            print(f"{key + ':':<17} {value}")
    print("\nexecution log:" if entries else "\nexecution log: (empty)")
    for e in entries:
        print(f"  {_short_time(e['timestamp'])}  {e['level']:<7} {e['step']:<10} {e['message']}")
    return 0


def stats_command(args) -> int:
    from mailferry.tasks import get_task_metrics
    open_app()
    stats = get_task_metrics()
    if args.json:
        print_json(stats)
        return 0
    print_table(["STATUS", "TASKS"], [[s, n] for s, n in stats["by_status"].items()])
    print(f"\ntotal: {stats['total']}")
    print(f"running past timeout: {stats['running_past_timeout']}")
    print(f"failed in the last hour: {stats['failed_last_hour']}")
    if stats["oldest_pending_seconds"] is not None:
        print(f"oldest pending: {stats['oldest_pending_seconds']:.0f} s")
    return 0
