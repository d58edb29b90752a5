"""The scheduler's commands, registered with the ``mailferry`` CLI through the
``mailferry.commands`` entry point (pyproject.toml), so that the core imports no process:
``mailferry scheduler`` (as ``python -m scheduler``) and ``mailferry cleanup``."""

from __future__ import annotations

from mailferry.cli.common import open_app, print_json, print_table
from scheduler.delivery_retention import cleanup_deliveries, retire_node
from scheduler.message_retention import cleanup_messages
from scheduler.retention import cleanup_tasks, retention_days


def register(sub, groups: dict) -> None:
    cmd = sub.add_parser("scheduler", help="run the scheduler (same as python -m scheduler)")
    cmd.set_defaults(func=lambda args: _run())

    cleanup = sub.add_parser("cleanup", help="delete ended tasks past their retention (an audit "
                                             "row each), published events, webhook attempts "
                                             "and inbound receipts past retention_event_days "
                                             "and, with "
                                             "retention_message_days set, stored mail past it "
                                             "(an audit row per batch)")
    cleanup.add_argument("--dry-run", action="store_true", help="only count what is due")
    cleanup.add_argument("--json", action="store_true")
    cleanup.add_argument("--retired-node", metavar="NODE",
                         help="first record that this MAILFERRY_NODE's spool is gone for good "
                              "(the host was retired), so its inbound receipts may go")
    cleanup.set_defaults(func=cleanup_command)


def _run() -> int:
    from mailferry.starting import stop_while_starting
    stop_while_starting()  # before the process's imports: a stop while starting is a clean stop
    from scheduler.main import main
    return main()


def cleanup_command(args) -> int:
    settings = open_app()
    if args.retired_node is not None and not args.dry_run:
        retire_node(args.retired_node)
    summary = cleanup_tasks(settings, dry_run=args.dry_run)
    mail = cleanup_messages(settings, dry_run=args.dry_run)
    deliveries = cleanup_deliveries(settings, dry_run=args.dry_run)
    if args.json:
        print_json({"dry_run": summary.dry_run, "deleted": summary.deleted, "total": summary.total,
                    "retention_days": retention_days(settings),
                    "messages": {"retention_days": settings.retention_message_days,
                                 "messages": mail.messages, "attachments": mail.attachments,
                                 "unrouted": mail.unrouted, "days": mail.days,
                                 "objects": mail.objects},
                    "deliveries": {"retention_days": settings.retention_event_days,
                                   "events": deliveries.events,
                                   "webhook_attempts": deliveries.attempts,
                                   "receipts": deliveries.receipts,
                                   "receipts_held_by": deliveries.held}})
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    days = retention_days(settings)
    print_table(["STATUS", "KEPT DAYS", verb.upper()],
                [[status, days[status], n] for status, n in summary.deleted.items()])
    print(f"{verb} {summary.total} task(s)" + ("" if args.dry_run else ", each with an audit row"))
    if not settings.retention_message_days:
        print("stored mail is kept for ever (retention_message_days = 0)")
    elif args.dry_run:
        print(f"would delete {mail.messages} message(s) and {mail.unrouted} unrouted, received over "
              f"{settings.retention_message_days} day(s) ago; object days due: "
              f"{', '.join(mail.days) or 'none'}")
    else:
        print(f"deleted {mail.messages} message(s) ({mail.attachments} attachment(s)) and "
              f"{mail.unrouted} unrouted, received over {settings.retention_message_days} day(s) "
              f"ago; {mail.objects} object(s) from storage, days {', '.join(mail.days) or 'none'}")
    if not settings.retention_event_days:
        print("published events, webhook attempts and receipts are kept for ever "
              "(retention_event_days = 0)")
        return 0
    print(f"{verb} {deliveries.events} published event(s), {deliveries.attempts} webhook "
          f"attempt(s) and {deliveries.receipts} inbound receipt(s) older than "
          f"{settings.retention_event_days} day(s)")
    for node, floor in deliveries.held.items():
        name = f"node {node!r}" if node else "this host (no MAILFERRY_NODE)"
        print(f"  receipts of {name} kept " + (
            "for ever: its spool sweep has not reported (a retired host: --retired-node)"
            if floor is None else f"from before {floor}: its spool still holds mail stored "
                                  "then, or its sweep stopped reporting then"))
    return 0
