"""`mailferry inject`, `mailferry messages` and `mailferry thread`: put mail in, see what was
stored, and one conversation."""

from __future__ import annotations

import sys
from pathlib import Path

from mailferry.cli.common import open_app, print_json, print_table
from mailferry.errors import PermanentError
from mailferry.inject import Injector
from mailferry.models import EmailAttachment, EmailMessage, User


def register(sub) -> None:
    inject = sub.add_parser(
        "inject", help="hand .eml files to the pipeline exactly as the Haraka plugin does")
    inject.add_argument("files", nargs="+", type=Path, metavar="FILE")
    inject.add_argument("--rcpt", action="append", default=[], metavar="ADDR",
                        help="envelope recipient (repeatable); default: the To and Cc headers")
    inject.add_argument("--mail-from", default="", metavar="ADDR")
    inject.set_defaults(func=inject_command)

    messages = sub.add_parser("messages", help="list stored messages with their attachments")
    messages.add_argument("--user", metavar="EMAIL")
    messages.add_argument("--limit", type=int, default=0, help="newest N only")
    messages.add_argument("--json", action="store_true")
    messages.set_defaults(func=messages_command)

    thread = sub.add_parser("thread", help="the messages of one conversation, oldest first")
    thread.add_argument("thread", metavar="ID", help="a thread_id, or a message's row id")
    thread.add_argument("--json", action="store_true")
    thread.set_defaults(func=thread_command)


def inject_command(args) -> int:
    settings = open_app()
    injector = Injector(settings)
    failures = 0
    try:
        for path in args.files:
            try:
                raw = path.read_bytes()
                queue_id = injector.inject(raw, args.rcpt, args.mail_from)
                print(f"{path}: queued as {queue_id}")
            except (OSError, PermanentError) as exc:
                failures += 1
                print(f"{path}: not injected: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
    finally:
        injector.close()
    return 1 if failures else 0


def messages_command(args) -> int:
    open_app()
    query = (EmailMessage.select(EmailMessage, User).join(User)
             .order_by(EmailMessage.received_at.desc(), EmailMessage.id.desc()))
    if args.user:
        query = query.where(User.email == args.user.strip().lower())
    if args.limit:
        query = query.limit(args.limit)
    messages = list(query)
    attachments: dict[int, list[EmailAttachment]] = {}
    ids = [m.id for m in messages]
    for start in range(0, len(ids), 500):
        for att in EmailAttachment.select().where(EmailAttachment.email_message.in_(ids[start:start + 500])):
            attachments.setdefault(att.email_message_id, []).append(att)
    rows = [_message_dict(m, attachments.get(m.id, [])) for m in messages]
    if args.json:
        print_json(rows)
    else:
        print_table(["ID", "USER", "RECEIVED", "FROM", "SUBJECT", "ATTACHMENTS"],
                    [[r["id"], r["user"], r["received_at"][:19], r["sender"][:30], r["subject"][:50],
                      ", ".join(a["safe_filename"] for a in r["attachments"])] for r in rows])
    return 0


def thread_command(args) -> int:
    open_app()
    thread_id = args.thread.strip()
    if thread_id.isdigit():  # a message's id: its thread
        message = EmailMessage.get_or_none(EmailMessage.id == int(thread_id))
        thread_id = message.thread_id if message else ""
    messages = list(EmailMessage.select(EmailMessage, User).join(User)
                    .where(EmailMessage.thread_id == thread_id)
                    .order_by(EmailMessage.sent_at, EmailMessage.received_at, EmailMessage.id))
    if not messages:
        print(f"no thread {args.thread!r}", file=sys.stderr)
        return 1
    rows = [{"id": m.id, "user": m.user.email, "message_id": m.message_id, "date": str(m.sent_at or ""),
             "from": m.sender, "subject": m.subject, "in_reply_to": m.in_reply_to,
             "reply_text": m.reply_text, "source": m.source} for m in messages]
    if args.json:
        print_json({"thread_id": thread_id, "messages": rows})
    else:
        print(f"thread {thread_id}: {len(rows)} messages")
        print_table(["ID", "DATE", "FROM", "SUBJECT", "SAID"],
                    [[r["id"], r["date"][:19], r["from"][:30], r["subject"][:40],
                      " ".join((r["reply_text"] or "").split())[:50]] for r in rows])
    return 0


def _message_dict(m: EmailMessage, atts: list[EmailAttachment]) -> dict:
    return {
        "id": m.id, "user": m.user.email, "message_id": m.message_id, "subject": m.subject,
        "sender": m.sender, "recipients": m.recipients, "cc": m.cc,
        "received_at": m.received_at.isoformat(), "source": m.source, "size": m.size,
        "sha256": m.sha256, "raw_path": m.raw_path, "plus_tag": m.plus_tag, "status": m.status,
        "in_reply_to": m.in_reply_to, "thread_id": m.thread_id, "reply_text": m.reply_text,
        "auto_reply": m.auto_reply, "bulk": m.bulk, "loop": m.loop, "bounce": m.bounce,
        "text_length": len(m.text_content),  # 0 for a body in storage (text_path)
        "html_length": len(m.html_content),
        "text_path": m.text_path, "html_path": m.html_path,
        "attachments": [{"filename": a.filename, "safe_filename": a.safe_filename,
                         "content_type": a.content_type, "size": a.file_size, "sha256": a.sha256,
                         "is_inline": a.is_inline, "file_path": a.file_path,
                         "enclosed_by": a.enclosed_by}
                        for a in sorted(atts, key=lambda a: a.position)],
    }
