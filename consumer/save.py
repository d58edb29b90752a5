"""Saving: one parsed message, for each of its users, as rows and content-addressed files.

Files go to storage (fsynced) before the transaction that references them, so a committed
row always points at a file; an aborted transaction leaves at most an unreferenced file,
which is harmless (the same bytes will be stored under the same name again). The unique key
(user, message_id) makes a repeat a counted duplicate, not a second copy.
"""

from __future__ import annotations

import logging
import re
import time
import unicodedata
from dataclasses import dataclass

import peewee

from consumer.parse import Limits, ParsedEmail, parse_email
from consumer.route import Route
from mailferry import metrics
from mailferry.errors import TransientError
from mailferry.models import EmailAttachment, EmailMessage, db, utcnow
from mailferry.storage import BlobStore

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^\w.\- ()\[\]@+,=]+", re.UNICODE)


@dataclass
class StoredFiles:
    raw_path: str
    attachment_paths: list[tuple[str, str]]  # (relative path, sha256), one per attachment


@dataclass
class SaveResult:
    stored: list[int]  # EmailMessage ids
    duplicates: int


def parse_and_store(store: BlobStore, raw: bytes, limits: Limits, *,
                    context: str) -> tuple[ParsedEmail, StoredFiles]:
    """Parse ``raw`` and write its blobs: what every worker does before its transaction.

    Raises EmailParseError (the caller quarantines the message) or TransientError (storage
    not writable). ``context`` starts the log lines ("queue_id=…", "user=… uid=…").
    """
    started = time.perf_counter()
    parsed = parse_email(raw, limits)
    metrics.parse_seconds.observe(time.perf_counter() - started)
    for warning in parsed.warnings:
        log.warning("%s message_id=%s: %s", context, parsed.message_id, warning)
    try:
        files = store_files(store, raw, parsed)
    except OSError as exc:
        raise TransientError(f"cannot write to storage: {exc.strerror}") from exc
    return parsed, files


def store_files(store: BlobStore, raw: bytes, parsed: ParsedEmail) -> StoredFiles:
    raw_path, _ = store.put(raw, parsed.sha256)
    return StoredFiles(raw_path, [store.put(a.data) for a in parsed.attachments])


def save_for_users(parsed: ParsedEmail, files: StoredFiles, routes: list[Route], *,
                   source: str, envelope: dict | None = None) -> SaveResult:
    """Insert the message for every routed user; call inside a transaction."""
    result = SaveResult([], 0)
    for route in routes:
        try:
            with db.atomic():  # a savepoint: a duplicate for one user spares the others
                message = EmailMessage.create(
                    user=route.user_id,
                    message_id=parsed.message_id,
                    subject=parsed.subject,
                    sender=parsed.sender,
                    recipients=parsed.to,
                    cc=parsed.cc,
                    reply_to=parsed.reply_to,
                    sent_at=parsed.date,
                    received_at=utcnow(),
                    text_content=parsed.text,
                    html_content=parsed.html,
                    raw_path=files.raw_path,
                    size=parsed.size,
                    sha256=parsed.sha256,
                    source=source,
                    envelope=envelope,
                    queue_id=(envelope or {}).get("queue_id"),
                    plus_tag=route.tag,
                    in_reply_to=parsed.in_reply_to,
                    references=parsed.references,
                    status="stored" if not parsed.warnings else "partial",  # see warnings in the log
                )
                _save_attachments(message, route.user_id, parsed, files)
        except peewee.IntegrityError:
            result.duplicates += 1
            continue
        result.stored.append(message.id)
    return result


def _save_attachments(message: EmailMessage, user_id: int, parsed: ParsedEmail,
                      files: StoredFiles) -> None:
    rows = []
    for index, (attachment, (path, digest)) in enumerate(zip(parsed.attachments, files.attachment_paths)):
        rows.append({
            "user": user_id,
            "email_message": message.id,
            "filename": attachment.filename,
            "safe_filename": safe_filename(attachment.filename, index, attachment.content_type),
            "content_type": attachment.content_type,
            "file_size": attachment.size,
            "file_path": path,
            "sha256": digest,
            "is_image": attachment.is_image,
            "is_inline": attachment.is_inline,
            "content_id": attachment.content_id,
        })
    if rows:
        EmailAttachment.insert_many(rows).execute()


def safe_filename(name: str, index: int = 0, content_type: str = "") -> str:
    """A name fit to offer in a download: no path, no control characters, bounded length."""
    name = unicodedata.normalize("NFC", name or "")
    name = name.replace("\\", "/").split("/")[-1]  # the last path component only
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")
    name = _UNSAFE.sub("_", name).strip(" ._")
    if not name:
        name = f"attachment-{index + 1}{_extension_for(content_type)}"
    if len(name.encode("utf-8")) > 200:
        stem, dot, ext = name.rpartition(".")
        ext = ext[:16] if dot else ""
        stem = (stem if dot else name).encode("utf-8")[:180].decode("utf-8", "ignore")
        name = f"{stem}.{ext}" if ext else stem
    return name


def _extension_for(content_type: str) -> str:
    return {
        "message/rfc822": ".eml", "text/plain": ".txt", "text/html": ".html",
        "image/png": ".png", "image/jpeg": ".jpg", "image/gif": ".gif",
        "application/pdf": ".pdf",
    }.get(content_type.split(";")[0].strip(), ".bin")
