"""`mailferry status` (one screen for an operator) and `mailferry replay` (dead letters back to
their queues)."""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from mailferry import broker
from mailferry.cli.common import open_app, print_json, print_table
from mailferry.models import TaskSource, TaskStatus, utcnow

SHORT_SOURCE = {TaskSource.IMAP: "IMAP", TaskSource.HARAKA: "HARAKA"}


def register(sub) -> None:
    status = sub.add_parser(
        "status", help="queues, tasks, last successes, dead letters, unrouted and quarantined mail")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=status_command)

    replay = sub.add_parser(
        "replay", help=f"move dead-lettered messages from {broker.DEAD} back to the queue they "
                       "came from (quarantined inbound files back to spool/incoming)")
    replay.add_argument("--limit", type=_positive, metavar="N", help="at most N messages")
    replay.add_argument("--dry-run", action="store_true",
                        help="only show what would be replayed; nothing moves")
    replay.add_argument("--json", action="store_true")
    replay.set_defaults(func=replay_command)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return number


# -- status ---------------------------------------------------------------------------------


def collect_status(settings) -> dict:
    """Everything `mailferry status` shows; the management API part may be missing."""
    from mailferry.management import ManagementError, endpoint, list_queues
    from mailferry.overview import read_overview
    overview = read_overview(settings.resolved_spool_dir)
    queues, problem = None, None
    try:
        queues = [q.as_dict() for q in list_queues(settings)]
    except ManagementError as exc:
        problem = str(exc)
    dead = next((q["messages"] for q in queues or [] if q["name"] == broker.DEAD), None)
    return {
        "read_at": overview.read_at,
        "vhost": endpoint(settings).vhost,
        "queues": queues,
        "management_error": problem,
        "tasks": {
            "by_source": overview.tasks,
            "by_status": overview.tasks_by_status(),
            "running_past_timeout": overview.running_past_timeout,
            "failed_last_hour": overview.failed_last_hour,
            "oldest_pending_seconds": overview.oldest_pending_seconds,
        },
        "last_success": overview.last_success,
        "imap_mailboxes": overview.imap_mailboxes,
        "imap_idle": overview.imap_idle,
        "dead_lettered": dead,
        "unrouted": overview.unrouted,
        "quarantined": overview.quarantined,
        "quarantine_dir": str(settings.resolved_spool_dir / "failed"),
        "scheduler": {"lease_holder": overview.lease_holder,
                      "lease_expires_at": overview.lease_expires_at},
    }


def status_command(args) -> int:
    settings = open_app()
    status = collect_status(settings)
    if status["management_error"]:
        # One line on stderr; the database part still follows on stdout.
        print(f"mailferry status: {status['management_error']}", file=sys.stderr)
    if args.json:
        print_json(_jsonable(status))
    else:
        print_status(status)
    return 1 if status["management_error"] else 0


def print_status(status: dict) -> None:
    now = status["read_at"]
    print(f"Queues (vhost {status['vhost']})")
    if status["queues"] is None:
        print("  unknown: the RabbitMQ management API did not answer")
    else:
        print_table(["QUEUE", "TYPE", "MESSAGES", "READY", "UNACKED", "CONSUMERS"],
                    [[q["name"], q["type"], q["messages"], q["ready"], q["unacked"], q["consumers"]]
                     for q in status["queues"]])
    tasks = status["tasks"]
    print("\nTasks")
    print_table(["SOURCE", *TaskStatus.ALL],
                [[SHORT_SOURCE.get(source, source), *(counts.get(s, 0) for s in TaskStatus.ALL)]
                 for source, counts in sorted(tasks["by_source"].items())])
    oldest = tasks["oldest_pending_seconds"]
    print(f"running past timeout: {tasks['running_past_timeout']}    "
          f"failed in the last hour: {tasks['failed_last_hour']}    "
          f"oldest pending: {'-' if oldest is None else _age(oldest)}")
    print("\nLast success")
    print_table(["SOURCE", "WHEN", "AGO"],
                [[source, _when(when), _age((now - when).total_seconds()) + " ago" if when else ""]
                 for source, when in sorted(status["last_success"].items())])
    print()
    dead = status["dead_lettered"]
    print(f"dead-lettered:  {'unknown' if dead is None else dead} in {broker.DEAD}"
          + (" (`mailferry replay` once the cause is fixed)" if dead else ""))
    print(f"unrouted:       {status['unrouted']} in unrouted_message")
    print(f"quarantined:    {status['quarantined']} file(s) in {status['quarantine_dir']}")
    print(f"IMAP mailboxes: {status['imap_mailboxes']} ({status['imap_idle']} held in IDLE)")
    lease = status["scheduler"]
    if lease["lease_holder"]:
        print(f"scheduler:      {lease['lease_holder']} holds the lease until "
              f"{_when(lease['lease_expires_at'])}")
    else:
        print("scheduler:      no scheduler holds the lease")


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value else "never"


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _jsonable(value):
    """Datetimes (naive UTC in the database) as ISO-8601 with a Z."""
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds") + "Z"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


# -- replay ---------------------------------------------------------------------------------


def replay_command(args) -> int:
    import logging
    from mailferry.replay import Replayer
    settings = open_app()
    logging.getLogger("pika").setLevel(logging.CRITICAL)  # our own error line says it once
    items = Replayer(settings).run(limit=args.limit, dry_run=args.dry_run)
    kept = [i for i in items if i.action == "kept"]
    if args.json:
        print_json(_jsonable({"dry_run": args.dry_run, "at": utcnow(),
                              "messages": [i.as_dict() for i in items]}))
    else:
        if items:
            print_table(["MESSAGE", "BACK TO", "ACTION", "DEAD BECAUSE", "DETAIL"],
                        [[i.message_id or "-", i.origin or "?", i.action, i.reason[:70], i.detail]
                         for i in items])
        verb = "would replay" if args.dry_run else "replayed"
        done = sum(1 for i in items if i.action != "kept")
        print(f"{verb} {done} of {len(items)} message(s) from {broker.DEAD}"
              + (f"; {len(kept)} kept there" if kept else ""))
    return 1 if kept else 0
