"""`mailferry inject` and `mailferry messages`: put mail in, see what was stored."""

from __future__ import annotations

import sys
import uuid
from email.parser import BytesHeaderParser
from email.policy import compat32
from email.utils import getaddresses
from pathlib import Path

from mailferry import broker
from mailferry.cli.common import open_app, print_json, print_table
from mailferry.config import Settings
from mailferry.contracts import InboundJob, now_iso, spool_path_for
from mailferry.errors import PermanentError
from mailferry.models import EmailAttachment, EmailMessage, User
from mailferry.spool import Spool


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


def header_recipients(raw: bytes) -> list[str]:
    headers = BytesHeaderParser(policy=compat32).parsebytes(raw)
    values = [str(v) for name in ("To", "Cc") for v in headers.get_all(name, [])]
    return [addr for _, addr in getaddresses(values) if "@" in addr]


class Injector:
    """Spools and publishes like the Haraka plugin; used by the CLI, tests and benchmarks."""

    def __init__(self, settings: Settings):
        self.spool = Spool(settings.resolved_spool_dir).ensure()
        self.publisher = broker.Publisher(settings, declare=True)

    def inject(self, raw: bytes, rcpt_to: list[str] | None = None, mail_from: str = "") -> str:
        recipients = rcpt_to or header_recipients(raw)
        if not recipients:
            raise PermanentError("no recipients: give --rcpt or a message with To/Cc")
        queue_id = str(uuid.uuid4()).upper()
        job = InboundJob(spool_path=spool_path_for(queue_id), queue_id=queue_id,
                         mail_from=mail_from, rcpt_to=recipients, size=len(raw),
                         received_at=now_iso(), remote_ip="127.0.0.1", helo="mailferry-inject")
        _, relative = self.spool.write_incoming(raw, queue_id, envelope=job.to_body())
        try:
            self.publisher.publish(broker.ROUTING_KEYS[broker.INBOUND], job.to_body(),
                                   message_id=queue_id)
        except Exception:
            self.spool.remove(self.spool.resolve(relative))  # as the plugin does
            raise
        return queue_id

    def close(self) -> None:
        self.publisher.close()


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


def _message_dict(m: EmailMessage, atts: list[EmailAttachment]) -> dict:
    return {
        "id": m.id, "user": m.user.email, "message_id": m.message_id, "subject": m.subject,
        "sender": m.sender, "recipients": m.recipients, "cc": m.cc,
        "received_at": m.received_at.isoformat(), "source": m.source, "size": m.size,
        "sha256": m.sha256, "raw_path": m.raw_path, "plus_tag": m.plus_tag, "status": m.status,
        "in_reply_to": m.in_reply_to, "text_length": len(m.text_content),
        "html_length": len(m.html_content),
        "attachments": [{"filename": a.filename, "safe_filename": a.safe_filename,
                         "content_type": a.content_type, "size": a.file_size, "sha256": a.sha256,
                         "is_inline": a.is_inline, "file_path": a.file_path,
                         "enclosed_by": a.enclosed_by}
                        for a in sorted(atts, key=lambda a: a.position)],
    }
