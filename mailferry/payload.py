"""What an application gets for a stored message: one JSON shape for the webhook's
``message.stored`` and the API's ``GET /v1/messages/{id}``, shaped like the hosted
inbound-parse services' (Postmark, Mailgun): addresses, subject, bodies, the headers as a
list, attachments by URL only.

What Mailferry made of it (``mailread.understand``): ``reply_text`` (what the sender wrote,
quotes and signature cut), ``auto_reply``, ``bulk``, ``loop``, ``bounce`` (null, or the kind,
the original's Message-ID and each recipient's action and status) and ``thread_id``. A
message stored before these existed has them null (false) until ``mailferry reindex``.
"""

from __future__ import annotations

import email.parser
import email.policy
import logging

from mailferry import metrics
from mailferry.config import Settings
from mailferry.contracts import iso_utc
from mailferry.models import EmailAttachment, EmailMessage, User
from mailferry.storage import BlobStore, DamagedObject

HEADER_READ_LIMIT = 1024 * 1024  # bytes of a raw source read for its header block

log = logging.getLogger(__name__)


def message_payload(message: EmailMessage, settings: Settings, store: BlobStore) -> dict:
    base = f"{settings.resolved_api_base_url}/v1/messages/{message.id}"
    limit = settings.webhook_body_limit
    text, text_cut = _cut(body_of(store, message.text_path, message.text_content), limit)
    html, html_cut = _cut(body_of(store, message.html_path, message.html_content), limit)
    envelope = message.envelope or {}
    user = User.get_or_none(User.id == message.user_id)
    return {
        "id": message.id,
        "user": {"id": message.user_id, "email": user.email if user else None},
        "message_id": message.message_id,
        "source": message.source,
        "envelope": {"mail_from": envelope.get("mail_from"), "rcpt_to": envelope.get("rcpt_to", [])},
        "from": message.sender,
        "to": message.recipients,
        "cc": message.cc,
        "reply_to": message.reply_to,
        "subject": message.subject,
        "date": iso_utc(message.sent_at),
        "received_at": iso_utc(message.received_at),
        "plus_tag": message.plus_tag,
        "text": text,
        "html": html,
        "truncated": {"text": text_cut, "html": html_cut},
        "headers": headers_of(store, message.raw_path),
        "attachments": [attachment_payload(a, base) for a in _attachments(message)],
        "raw_url": f"{base}/raw",
        "size": message.size,
        "sha256": message.sha256,
        "status": message.status,
        "in_reply_to": message.in_reply_to,
        "references": message.references,
        "reply_text": message.reply_text,
        "auto_reply": message.auto_reply,
        "bulk": message.bulk,
        "loop": message.loop,
        "bounce": message.bounce,
        "thread_id": message.thread_id,
    }


def attachment_payload(attachment: EmailAttachment, base: str) -> dict:
    return {
        "position": attachment.position,
        "name": attachment.filename,
        "safe_name": attachment.safe_filename,
        "content_type": attachment.content_type,
        "size": attachment.file_size,
        "sha256": attachment.sha256,
        "content_id": attachment.content_id,
        "inline": attachment.is_inline,
        "enclosed_by": attachment.enclosed_by,
        "url": f"{base}/attachments/{attachment.position}",
    }


def _attachments(message: EmailMessage) -> list[EmailAttachment]:
    return list(EmailAttachment.select().where(EmailAttachment.email_message == message.id)
                .order_by(EmailAttachment.position, EmailAttachment.id))


def body_of(store: BlobStore, key: str | None, column: str | None) -> str:
    """A text or HTML body: the row's column, or (body_storage = storage) its object, checked
    against the hash its key names. An object that is gone, unreadable or damaged gives ""
    (the message is still delivered, with what is sound) and an error line; a damaged one is
    counted in mailferry_storage_integrity_failures."""
    if not key:
        return column or ""
    try:
        return store.read_sound(key).decode("utf-8", "replace")
    except DamagedObject:
        metrics.storage_integrity_failures.inc()
        log.error("storage: the body %s does not hash to its name: left out", key)
    except OSError as exc:
        log.error("storage: cannot read the body %s: %s", key, exc)
    return ""


def headers_of(store: BlobStore, relative: str) -> list[list[str]]:
    """The message's header fields, in order, as [name, decoded value] pairs; [] if the raw
    source is gone (retention) or unreadable."""
    try:
        head = store.open_raw(relative).head(HEADER_READ_LIMIT)
    except OSError:
        return []
    end = min((i for i in (head.find(b"\r\n\r\n"), head.find(b"\n\n")) if i >= 0), default=len(head))
    parsed = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(head[:end])
    out = []
    for name, value in parsed.raw_items():
        try:
            value = str(parsed.policy.header_factory(name, value))
        except Exception:  # noqa: BLE001 - a header nobody can decode is shown as it came
            value = str(value)
        out.append([name, value])
    return out


def _cut(text: str, limit: int) -> tuple[str, bool]:
    return (text[:limit], True) if limit and len(text) > limit else (text, False)
